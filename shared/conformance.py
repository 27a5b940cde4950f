"""``acestep-conformance VECTOR_DIR``: check our code against conformance vectors.

Runs every tensor case of ``VECTOR_DIR/manifest.json`` (DiT side) and every prompt vector of
``VECTOR_DIR/prompts.json`` (LM and DiT prompt strings), prints one line per case and ends with
``N passed, M failed``. Exit status 0 only when nothing failed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path


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


def run_all(vector_dir: Path) -> list[CaseResult]:
    """Every case the folder holds: tensor cases first, then prompt vectors."""
    results: list[CaseResult] = []
    if (vector_dir / "manifest.json").exists():
        from dit_service.conformance import run_tensor_cases

        results.extend(run_tensor_cases(vector_dir))
    if (vector_dir / "prompts.json").exists():
        from lm_service.conformance import run_prompt_cases

        results.extend(run_prompt_cases(vector_dir))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acestep-conformance", description=__doc__.splitlines()[0])
    parser.add_argument("vector_dir", type=Path, help="folder with manifest.json, checkpoint/, cases/, prompts.json")
    args = parser.parse_args(argv)
    if not args.vector_dir.is_dir():
        print(f"vector_dir {args.vector_dir} is not a folder", file=sys.stderr)
        return 2
    results = run_all(args.vector_dir)
    for result in results:
        print(result.line(), flush=True)
    num_failed = sum(not r.passed for r in results)
    print(f"{len(results) - num_failed} passed, {num_failed} failed")
    return 0 if results and num_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
