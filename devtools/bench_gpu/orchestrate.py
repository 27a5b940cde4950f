"""``python -m devtools.bench_gpu`` (``make bench-gpu``): one run, one table, ours beside the reference.

1. Checkpoints: the PUBLISHED sizes with random bf16 weights (``devtools.published_checkpoints``,
   drawn on the device, written to ``--weights-dir`` on its disk, kept for reruns) or, with
   ``--size tiny``, the tiny ones (``devtools.tiny_checkpoints``).
2. Sections, each in its own process with a share of ``--budget-s``: ``dit`` (stage times, batch
   throughput, in-process first PCM tile, memory), ``lm`` (codes/s, 1 vs N plans, with and without
   CFG), ``stack`` (LM + DiT + gateway processes: first PCM chunk of a full request, songs/min at N
   concurrent requests, memory per service), ``reference`` (the same workload on ace-step/ACE-Step-1.5).
3. One table (ours, reference, ours/reference per line) printed and written as ``bench-gpu.json``
   and ``bench-gpu.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from devtools.bench_gpu import report
from devtools.bench_gpu.spec import BenchSpec, SectionResult

SECTIONS = ("dit", "lm", "stack", "reference")
SHARES = {"dit": 0.25, "lm": 0.25, "stack": 0.3, "reference": 0.2}  # of the budget left, among the sections left
TERM_GRACE_S = 20.0


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.bench_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--size", choices=["published", "tiny"], default="published")
    parser.add_argument("--checkpoints", type=Path, default=None, help="an existing checkpoint root (skips writing)")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="where the random checkpoints are written (default: <tmp>/acestep-bench-<size>)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for bench-gpu.json/.md")
    parser.add_argument("--durations", type=float, nargs="+", default=[30.0, 120.0, 240.0], help="song lengths, s")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--lm-codes", type=int, default=100, help="audio codes per plan (5 per second)")
    parser.add_argument("--lm-concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--stack-requests", type=int, default=16)
    parser.add_argument("--stack-duration", type=float, default=30.0, help="song length of the stack requests, s")
    parser.add_argument("--reference-dir", default=".reference/ACE-Step-1.5")
    parser.add_argument("--reference-src", default="", help="git dir or URL to create --reference-dir from if absent")
    parser.add_argument("--reference-rev", default="HEAD")
    parser.add_argument("--reference-model-code", default="", help="folder with the reference DiT's modeling files")
    parser.add_argument("--reference-requests", type=int, default=4, help="full requests the reference runs in turn")
    parser.add_argument("--reference-lm-concurrency", type=int, nargs="+", default=[],
                        help="plans at once on the reference LM (default: --lm-concurrency)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser.parse_args(argv)


def prepare_checkpoints(args: argparse.Namespace) -> tuple[Path, str, str]:
    """The checkpoint root, the LM folder in it, and what was done (written / kept / given)."""
    from devtools import tiny_checkpoints as tiny
    from devtools.published_checkpoints import LM_DIR, pad_tokenizer_vocab, retarget_special_ids

    lm_dir = tiny.LM_DIR if args.size == "tiny" else LM_DIR
    if args.checkpoints is not None:
        return args.checkpoints.resolve(), lm_dir, "given"
    root = (args.weights_dir or Path(tempfile.gettempdir()) / f"acestep-bench-{args.size}").resolve()
    if args.size == "tiny":
        steps = [step for step in tiny.WRITER_STEPS if step.folder in (tiny.LM_DIR, tiny.TEXT_ENCODER_DIR,
                                                                      tiny.VAE_DIR, tiny.TURBO_DIR)]
        if all((root / step.folder / "config.json").is_file() for step in steps):
            return root, lm_dir, "kept"
        tiny.write_all(root, seed=args.seed, steps=steps)
        # As in the published layout, the LM tokenizer gets as many ids as the model's vocabulary (the
        # reference sizes its masks by the tokenizer); the tiny writer pads only the model.
        lm_config = json.loads((root / lm_dir / "config.json").read_text(encoding="utf-8"))
        pad_tokenizer_vocab(root / lm_dir, lm_config["vocab_size"])
        retarget_special_ids(root / lm_dir)
        return root, lm_dir, "written"
    command = [sys.executable, "-m", "devtools.published_checkpoints", str(root), "--device", args.device,
               "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"writing the published-size checkpoints failed:\n{done.stdout}{done.stderr}")
    return root, lm_dir, " / ".join(sorted({line.rsplit(': ', 1)[-1] for line in done.stdout.splitlines()}))


def run_section(name: str, spec_path: Path, work: Path, timeout_s: float) -> tuple[Optional[SectionResult], str]:
    """Run one section process; returns what it measured (None if nothing) and what went wrong ("" if nothing)."""
    result_path, log_path = work / f"{name}.result.json", work / f"{name}.log"
    command = [sys.executable, "-m", f"devtools.bench_gpu.{name}", str(spec_path), str(result_path)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=max(1.0, timeout_s))
            problem = ""
        except subprocess.TimeoutExpired:
            _stop_group(process)
            problem = f"timed out after {timeout_s:.0f} s, lines measured before kept (log: {log_path})"
    if not problem and process.returncode != 0:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        problem = f"failed ({lines[-1].strip() if lines else f'exit {process.returncode}'}; log: {log_path})"
    partial = SectionResult.from_json(result_path.read_text(encoding="utf-8")) if result_path.is_file() else None
    return partial, problem


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the section's process group (a stack stops its services), SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _keep_log(log_path: Path, target: Path, max_bytes: int = 256 * 1024) -> None:
    """The end of a failed section's log next to the results (a one-shot run on a lent machine keeps it)."""
    if log_path.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(log_path.read_bytes()[-max_bytes:])


def hardware(device: str) -> str:
    if not device.startswith("cuda"):
        return f"CPU, {os.cpu_count()} cores"
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        names = "CUDA device (nvidia-smi unavailable)"
    return f"{names.splitlines()[0] if names else 'CUDA device'}, {os.cpu_count()} CPU cores"


def build_spec(args: argparse.Namespace, checkpoints: Path, lm_dir: str, work: Path) -> BenchSpec:
    return BenchSpec(device=args.device, size=args.size, checkpoints=str(checkpoints), lm_model=lm_dir,
                     durations_s=tuple(args.durations), batches=tuple(args.batches), lm_codes=args.lm_codes,
                     lm_concurrency=tuple(args.lm_concurrency), stack_requests=args.stack_requests,
                     stack_duration_s=args.stack_duration, reference_dir=args.reference_dir,
                     reference_model_code=args.reference_model_code, reference_requests=args.reference_requests,
                     reference_lm_concurrency=tuple(args.reference_lm_concurrency),
                     work_dir=str(work))


def ensure_reference(args: argparse.Namespace) -> str:
    """Create the reference checkout from ``--reference-src`` when it is absent; returns a note."""
    dest = Path(args.reference_dir)
    if (dest / "acestep").is_dir() or not args.reference_src:
        return ""
    from devtools.bench_gpu.reference_checkout import make_checkout

    skipped = make_checkout(args.reference_src, dest, args.reference_rev)
    return f"reference checkout made from {args.reference_src}" + (f" ({len(skipped)} files missing there)"
                                                                   if skipped else "")


def run_sections(args: argparse.Namespace, spec_path: Path, work: Path, deadline: float,
                 notes: list[str]) -> tuple[list[SectionResult], Optional[SectionResult]]:
    """Each section in turn with its share of the time left; returns ours and the reference's results."""
    ours: list[SectionResult] = []
    reference: Optional[SectionResult] = None
    for index, name in enumerate(args.sections):
        remaining = deadline - time.monotonic()
        share = SHARES[name] / sum(SHARES[later] for later in args.sections[index:])
        section_started = time.monotonic()
        result, problem = (None, "skipped: the budget is spent") if remaining < 5 else \
            run_section(name, spec_path, work, remaining * share)
        print(f"section {name}: {problem or 'done'} ({time.monotonic() - section_started:.0f} s)", flush=True)
        if problem:
            notes.append(f"section {name}: {problem}")
            _keep_log(work / f"{name}.log", args.out / f"{name}.log")
        if result is not None:
            notes += result.notes
            if name == "reference":
                reference = result
            else:
                ours.append(result)
    return ours, reference


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    checkpoints, lm_dir, weights_state = prepare_checkpoints(args)
    notes = [f"weights: {args.size} sizes, random, {checkpoints} ({weights_state})"]
    notes += [note for note in [ensure_reference(args)] if note]
    work = Path(tempfile.mkdtemp(prefix="acestep-bench-gpu-"))
    spec = build_spec(args, checkpoints, lm_dir, work)
    spec_path = work / "spec.json"
    spec_path.write_text(spec.to_json(), encoding="utf-8")
    ours, reference = run_sections(args, spec_path, work, started + args.budget_s, notes)
    lines = report.merge(ours, reference)
    unavailable = reference.unavailable if reference else {}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = hardware(args.device)
    title = f"bench-gpu, {date}, {machine}, {args.size} random weights"
    notes.append(f"whole run: {time.monotonic() - started:.0f} s")
    print(f"\n{title}\n")
    print(report.text_table(lines, unavailable))
    print("\n" + "\n".join(report.footnotes(unavailable, notes)))
    meta = {"title": title, "date": date, "hardware": machine, "spec": json.loads(spec.to_json())}
    json_path, md_path = report.write_outputs(args.out, title, lines, unavailable, notes, meta)
    print(f"\nwritten: {json_path}, {md_path}")
    return 0
