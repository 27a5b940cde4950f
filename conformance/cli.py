"""``acestep-conformance VECTOR_DIR``: check our code against conformance vectors.

Runs every tensor case of ``VECTOR_DIR/manifest.json`` (DiT side), every prompt vector of
``VECTOR_DIR/prompts.json`` (LM and DiT prompt strings) and every LM generation case of
``VECTOR_DIR/lm/`` on each LM backend (transformers and vLLM), prints one line per case and ends with
``N passed, M failed``. Exit status 0 only when nothing failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conformance.lm_generation import BACKENDS
from conformance.results import CaseResult


def run_all(vector_dir: Path, lm_backends: tuple[str, ...] = BACKENDS) -> list[CaseResult]:
    """Every case the folder holds: tensor cases, prompt vectors, then LM generation cases."""
    results: list[CaseResult] = []
    if (vector_dir / "manifest.json").exists():
        from conformance.dit_tensors import run_tensor_cases

        results.extend(run_tensor_cases(vector_dir))
    if (vector_dir / "prompts.json").exists():
        from conformance.prompts import run_prompt_cases

        results.extend(run_prompt_cases(vector_dir))
    if (vector_dir / "lm" / "manifest.json").exists() and lm_backends:
        from conformance.lm_generation import run_lm_cases

        results.extend(run_lm_cases(vector_dir, lm_backends))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acestep-conformance", description=__doc__.splitlines()[0])
    parser.add_argument("vector_dir", type=Path, help="folder with manifest.json, checkpoint/, cases/, prompts.json")
    parser.add_argument("--lm-backend", action="append", choices=list(BACKENDS), dest="lm_backends",
                        help="LM backend for the generation cases (repeatable; default: all)")
    args = parser.parse_args(argv)
    if not args.vector_dir.is_dir():
        print(f"vector_dir {args.vector_dir} is not a folder", file=sys.stderr)
        return 2
    results = run_all(args.vector_dir, tuple(args.lm_backends or BACKENDS))
    for result in results:
        print(result.line(), flush=True)
    num_failed = sum(not r.passed for r in results)
    print(f"{len(results) - num_failed} passed, {num_failed} failed")
    return 0 if results and num_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
