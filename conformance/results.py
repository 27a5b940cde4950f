"""The outcome of one conformance case, shared by every part of the runner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CaseResult:
    """Outcome of one conformance case."""

    name: str
    passed: bool
    max_abs_error: float = 0.0
    tolerance: float = 0.0
    detail: str = ""

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        text = f"{self.name:<48} {verdict}  max_abs_err={self.max_abs_error:.3e}  tol={self.tolerance:.1e}"
        return f"{text}  {self.detail}" if self.detail else text
