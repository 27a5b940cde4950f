"""``make soak``: many concurrent clients against a local stack for a fixed time (or request count).

Prints requests done, errors by status code, p50/p95 latency and the peak memory of every
service. Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.

    python -m tests.load.soak --duration-s 120 --concurrency 8 [--checkpoints DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc

from gateway import sdk
from gateway.serve import LocalStack
from shared.types import GenerationConfig, GenerationParams


@dataclass
class LoadReport:
    latencies_s: list[float] = field(default_factory=list)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    rss_rounds: list[dict[str, float]] = field(default_factory=list)

    @property
    def num_done(self) -> int:
        return self.statuses["OK"]

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> str:
        lines = [f"requests done: {self.num_done}",
                 "status counts: " + ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())),
                 f"latency p50={self.percentile(0.5):.2f}s p95={self.percentile(0.95):.2f}s "
                 f"mean={statistics.fmean(self.latencies_s) if self.latencies_s else float('nan'):.2f}s"]
        return "\n".join(lines)


def request_params(index: int, duration_s: float) -> tuple[GenerationParams, GenerationConfig]:
    thinking = index % 2 == 0
    params = GenerationParams(caption=f"load test song {index}", lyrics="[Verse]\nla la la", duration=duration_s,
                              thinking=thinking, use_cot_caption=thinking, use_cot_language=thinking,
                              use_cot_metas=thinking, bpm=None if thinking else 120, shift=3.0)
    return params, GenerationConfig(batch_size=1 + index % 2, seeds=[index, index + 1], audio_format="wav")


async def one_request(client: sdk.AceStepClient, index: int, duration_s: float, report: LoadReport) -> None:
    params, config = request_params(index, duration_s)
    started = time.perf_counter()
    try:
        async for event in sdk.stream_generate(client, params, config, stream_pcm=False):
            if event.WhichOneof("event") == "result":
                report.latencies_s.append(time.perf_counter() - started)
                report.statuses["OK"] += 1
                return
        report.statuses["NO_RESULT"] += 1
    except grpc.aio.AioRpcError as error:
        report.statuses[error.code().name] += 1


async def run_load(address: str, *, concurrency: int, max_requests: int, duration_s: float,
                   song_s: float, timeout_s: float, stack: Optional[LocalStack] = None) -> LoadReport:
    """Keep ``concurrency`` clients busy until ``max_requests`` are sent or ``duration_s`` passed."""
    report = LoadReport()
    client = sdk.AceStepClient(address, timeout_s=timeout_s)
    deadline = time.monotonic() + duration_s
    counter = iter(range(max_requests))

    async def worker() -> None:
        for index in counter:
            if time.monotonic() > deadline:
                return
            await one_request(client, index, song_s, report)
            if stack is not None and index % max(1, concurrency) == 0:
                report.rss_rounds.append(stack.current_rss_mib())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=None)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--song-s", type=float, default=10.0)
    parser.add_argument("--num-dit", type=int, default=2)
    parser.add_argument("--num-lm", type=int, default=2)
    args = parser.parse_args(argv)
    checkpoints = Path(args.checkpoints) if args.checkpoints else Path(tempfile.mkdtemp(prefix="soak-ckpt-"))
    if not args.checkpoints:
        from shared.tiny_checkpoints import main as make_tiny

        make_tiny([str(checkpoints)])
    with LocalStack(checkpoints, num_dit=args.num_dit, num_lm=args.num_lm) as stack:
        address = stack.start()
        report = asyncio.run(run_load(address, concurrency=args.concurrency, max_requests=args.max_requests,
                                      duration_s=args.duration_s, song_s=args.song_s, timeout_s=300.0, stack=stack))
        print(report.summary())
        for name, peak in sorted(stack.peak_rss_mib().items()):
            print(f"peak memory {name}: {peak:.0f} MiB")
    return 0 if report.num_done > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
