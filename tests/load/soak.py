"""``make soak``: many concurrent clients against a local stack for a fixed time (or request count).

Prints requests done, errors by status code, p50/p95 latency (end to end and to the first audio),
throughput, and the peak and start/end memory of every service (summed over the service's whole
process tree: the LM's vLLM engine core and worker are child processes). Traffic goes to the
gateway this module starts on 127.0.0.1 only; every loop is bounded in count and time, and every
call carries a deadline.

    python -m tests.load.soak --duration-s 120 --concurrency 8 [--checkpoints DIR]

``run_load`` is also the load generator of ``tests/reliability/test_load.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import grpc

from gateway import sdk
from gateway.serve import LocalStack
from shared.types import GenerationConfig, GenerationParams

OUTPUT_KINDS = ("audio", "file", "item_finished")


@dataclass(frozen=True)
class LoadShape:
    """What the clients send and how they behave."""

    concurrency: int = 8
    max_requests: int = 10_000
    duration_s: float = 60.0       # no new request starts after this
    song_s: float = 10.0
    thinking_every: int = 2        # every Nth request has thinking on (the LM plans metadata and codes)
    timeout_s: float = 300.0       # deadline of every call
    backoff_s: float = 0.5         # a client's pause after RESOURCE_EXHAUSTED before its next request


@dataclass(frozen=True)
class Outcome:
    """One finished request: its status code name ("OK" on success) and timings in seconds."""

    index: int
    code: str
    latency_s: float
    first_output_s: Optional[float] = None
    expected_items: int = 0
    item_durations_s: tuple[float, ...] = ()
    details: str = ""


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def statuses(self) -> collections.Counter:
        return collections.Counter(o.code for o in self.outcomes)

    @property
    def num_done(self) -> int:
        return self.statuses["OK"]

    def latencies(self, first_output: bool = False) -> list[float]:
        ok = [o for o in self.outcomes if o.code == "OK"]
        return [o.first_output_s if first_output else o.latency_s for o in ok
                if (o.first_output_s if first_output else o.latency_s) is not None]

    def summary(self) -> str:
        latencies, first = self.latencies(), self.latencies(first_output=True)
        songs = sum(len(o.item_durations_s) for o in self.outcomes if o.code == "OK")
        per_min = 60.0 * self.num_done / self.wall_s if self.wall_s else float("nan")
        return "\n".join([
            f"requests sent: {len(self.outcomes)} in {self.wall_s:.1f} s; done: {self.num_done} "
            f"({songs} songs, {per_min:.1f} requests/min)",
            "status counts: " + ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())),
            f"latency end to end: p50={percentile(latencies, 0.5):.2f}s p95={percentile(latencies, 0.95):.2f}s "
            f"mean={statistics.fmean(latencies) if latencies else float('nan'):.2f}s",
            f"latency to first audio: p50={percentile(first, 0.5):.2f}s p95={percentile(first, 0.95):.2f}s",
        ])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def request_params(index: int, song_s: float, thinking_every: int) -> tuple[GenerationParams, GenerationConfig]:
    """Request ``index``: thinking on for every ``thinking_every``-th, one or two items."""
    thinking = thinking_every > 0 and index % thinking_every == 0
    params = GenerationParams(caption=f"load test song {index}", lyrics="[Verse]\nla la la", duration=song_s,
                              thinking=thinking, use_cot_caption=thinking, use_cot_language=thinking,
                              use_cot_metas=thinking, bpm=None if thinking else 120, shift=3.0)
    batch_size = 1 + index % 2
    return params, GenerationConfig(batch_size=batch_size, seeds=[index, index + 1][:batch_size],
                                    audio_format="wav")


async def one_request(client: sdk.AceStepClient, index: int, shape: LoadShape) -> Outcome:
    """Send request ``index`` and wait for its end (result, error or deadline)."""
    params, config = request_params(index, shape.song_s, shape.thinking_every)
    started = time.perf_counter()
    first_output = None
    try:
        async for event in sdk.stream_generate(client, params, config, stream_pcm=False):
            kind = event.WhichOneof("event")
            if kind in OUTPUT_KINDS and first_output is None:
                first_output = time.perf_counter() - started
            if kind == "result":
                durations = tuple(item.duration_s for item in event.result.audios)
                return Outcome(index, "OK", time.perf_counter() - started, first_output, config.batch_size,
                               durations)
    except grpc.aio.AioRpcError as error:
        return Outcome(index, error.code().name, time.perf_counter() - started, first_output,
                       config.batch_size, details=error.details() or "")
    return Outcome(index, "NO_RESULT", time.perf_counter() - started, first_output, config.batch_size)


async def run_load(address: str, shape: LoadShape) -> LoadReport:
    """``shape.concurrency`` clients send requests until ``max_requests`` were sent or ``duration_s``
    passed, then wait for the ones in flight (each bounded by its deadline)."""
    report = LoadReport()
    client = sdk.AceStepClient(address, timeout_s=shape.timeout_s)
    started = time.monotonic()
    indices = iter(range(shape.max_requests))

    async def worker() -> None:
        for index in indices:
            if time.monotonic() - started > shape.duration_s:
                return
            outcome = await one_request(client, index, shape)
            report.outcomes.append(outcome)
            if outcome.code == "RESOURCE_EXHAUSTED":
                await asyncio.sleep(shape.backoff_s)

    await asyncio.gather(*(worker() for _ in range(shape.concurrency)))
    report.wall_s = time.monotonic() - started
    return report


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (Linux /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, ()))
    return tree


def tree_memory_mib(pid: int, field_name: str = "VmRSS") -> Optional[float]:
    """``field_name`` (VmRSS: now, VmHWM: peak) summed over the process tree; None when pid is gone."""
    total, found = 0.0, False
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(field_name + ":"):
                total += int(line.split()[1]) / 1024
                found = True
    return total if found else None


def services_memory_mib(stack: LocalStack, field_name: str = "VmRSS") -> dict[str, float]:
    """Memory of every live service of ``stack``, each summed over its process tree."""
    values = {}
    for name, service in stack.services.items():
        if service.process.poll() is None:
            value = tree_memory_mib(service.process.pid, field_name)
            if value is not None:
                values[name] = value
    return values


def memory_lines(start: dict[str, float], end: dict[str, float], peak: dict[str, float]) -> list[str]:
    lines = []
    for name in sorted(peak):
        lines.append(f"memory {name}: peak {peak[name]:.0f} MiB; rss {start.get(name, float('nan')):.0f} -> "
                     f"{end.get(name, float('nan')):.0f} MiB")
    return lines


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.load.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=None, help="checkpoints folder (default: fresh tiny ones)")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--song-s", type=float, default=10.0)
    parser.add_argument("--thinking-every", type=int, default=2, help="every Nth request has thinking on (0: none)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each request")
    parser.add_argument("--num-dit", type=int, default=2)
    parser.add_argument("--num-lm", type=int, default=2)
    parser.add_argument("--max-active", type=int, default=16, help="gateway admission: requests running")
    parser.add_argument("--max-queued", type=int, default=64, help="gateway admission: requests waiting")
    return parser.parse_args(argv)


def _fresh_checkpoints() -> Path:
    from devtools.tiny_checkpoints import main as make_tiny

    folder = Path(tempfile.mkdtemp(prefix="soak-ckpt-"))
    make_tiny([str(folder)])
    return folder


async def _sampled(load: asyncio.Future, sample: Callable[[], None], every_s: float) -> LoadReport:
    """Await ``load`` while calling ``sample`` every ``every_s`` seconds (memory of the services)."""
    while True:
        done, _ = await asyncio.wait({load}, timeout=every_s)
        sample()
        if done:
            return load.result()


def run_soak(args: argparse.Namespace, checkpoints: Path) -> LoadReport:
    shape = LoadShape(concurrency=args.concurrency, max_requests=args.max_requests, duration_s=args.duration_s,
                      song_s=args.song_s, thinking_every=args.thinking_every, timeout_s=args.timeout_s)
    gateway_args = ["--max-active", str(args.max_active), "--max-queued", str(args.max_queued)]
    with tempfile.TemporaryDirectory(prefix="soak-stack-") as workdir, \
            LocalStack(checkpoints, num_dit=args.num_dit, num_lm=args.num_lm, gateway_args=gateway_args,
                       workdir=Path(workdir)) as stack:
        started = time.perf_counter()
        address = stack.start()
        print(f"stack up in {time.perf_counter() - started:.1f} s ({args.num_lm} LM, {args.num_dit} DiT, "
              f"gateway {address}); load: {shape}", flush=True)
        start_rss = services_memory_mib(stack)
        peak: dict[str, float] = {}

        def sample() -> None:
            for name, value in services_memory_mib(stack, "VmHWM").items():
                peak[name] = max(peak.get(name, 0.0), value)

        async def soak() -> LoadReport:
            return await _sampled(asyncio.ensure_future(run_load(address, shape)), sample, every_s=5.0)

        report = asyncio.run(soak())
        print(report.summary())
        print("\n".join(memory_lines(start_rss, services_memory_mib(stack), peak)))
        dead = [name for name, s in stack.services.items() if s.process.poll() is not None]
        print(f"services alive at the end: {len(stack.services) - len(dead)}/{len(stack.services)}"
              + (f" (exited: {', '.join(dead)})" if dead else ""), flush=True)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    checkpoints = Path(args.checkpoints) if args.checkpoints else _fresh_checkpoints()
    try:
        report = run_soak(args, checkpoints)
    finally:
        if not args.checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    unexpected = set(report.statuses) - {"OK", "RESOURCE_EXHAUSTED"}
    return 0 if report.num_done > 0 and not unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
