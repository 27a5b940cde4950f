"""``python -m http_service.bench``: the latency the HTTP edge adds (``make bench-http``).

Starts a stack on this machine (DiT + gateway + HTTP edge; tiny random-weight checkpoints in a
temporary folder unless ``--checkpoints`` is given; no LM, the songs skip it), then runs the same
song ``--runs`` times each way, alternating: gRPC ``Submit`` + ``Watch`` against the gateway, and
``POST /v1/generations`` + the SSE stream against the edge. Prints p50/p95 of the time from
submitting to the first progress event and to the result, and the difference (HTTP - gRPC).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc
import httpx

from devtools import tiny_checkpoints
from gateway import sdk
from gateway.serve import LocalStack
from http_service.sse_client import iter_sse
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc
from shared.types import GenerationConfig, GenerationParams


@dataclass(frozen=True)
class Run:
    first_progress_s: float
    result_s: float


def song(duration_s: float, steps: int, seed: int) -> tuple[GenerationParams, GenerationConfig]:
    params = GenerationParams(caption="lo-fi piano loop with soft drums", duration=duration_s, inference_steps=steps,
                              thinking=False, use_cot_metas=False, use_cot_caption=False, use_cot_language=False)
    return params, GenerationConfig(batch_size=1, seeds=[seed], audio_format="flac")


def through_grpc(stub, params: GenerationParams, config: GenerationConfig) -> Run:
    start = time.perf_counter()
    request_id = stub.Submit(sdk.build_request(params, config)).request_id
    first = math.nan
    for event in stub.Watch(gw.WatchRequest(request_id=request_id)):
        kind = event.WhichOneof("event")
        if kind == "progress" and math.isnan(first):
            first = time.perf_counter() - start
        if kind == "result":
            return Run(first, time.perf_counter() - start)
        if kind == "failed":
            raise RuntimeError(f"gRPC run failed: {event.failed.error.message}")
    raise RuntimeError("the Watch stream ended without a result")


def through_http(http: httpx.Client, params: GenerationParams, config: GenerationConfig) -> Run:
    body = {"params": {k: v for k, v in params.to_dict().items() if k not in ("src_audio", "reference_audio")},
            "config": config.to_dict()}
    start = time.perf_counter()
    reply = http.post("/v1/generations", json=body)
    reply.raise_for_status()
    first = math.nan
    with http.stream("GET", reply.json()["links"]["events"]) as stream:
        for message in iter_sse(stream.iter_lines()):
            if message.event == "progress" and math.isnan(first):
                first = time.perf_counter() - start
            if message.event == "result":
                return Run(first, time.perf_counter() - start)
            if message.event in ("failed", "error"):
                raise RuntimeError(f"HTTP run failed: {message.data}")
    raise RuntimeError("the SSE stream ended without a result")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)] if ordered else math.nan


def report(grpc_runs: list[Run], http_runs: list[Run]) -> str:
    lines = [f"{'':24}{'gRPC p50':>10}{'p95':>9}{'HTTP p50':>11}{'p95':>9}{'added p50':>12}{'p95':>9}"]
    for label, pick in (("first progress event", lambda r: r.first_progress_s), ("result", lambda r: r.result_s)):
        g = [pick(r) for r in grpc_runs]
        h = [pick(r) for r in http_runs]
        g50, g95, h50, h95 = percentile(g, 0.5), percentile(g, 0.95), percentile(h, 0.5), percentile(h, 0.95)
        lines.append(f"{label:24}{g50 * 1e3:8.1f}ms{g95 * 1e3:7.1f}ms{h50 * 1e3:9.1f}ms{h95 * 1e3:7.1f}ms"
                     f"{(h50 - g50) * 1e3:+10.1f}ms{(h95 - g95) * 1e3:+7.1f}ms")
    return "\n".join(lines)


def bench(address: str, http_url: str, runs: int, duration_s: float, steps: int) -> tuple[list[Run], list[Run]]:
    channel = grpc.insecure_channel(address)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    grpc_runs, http_runs = [], []
    with httpx.Client(base_url=http_url, timeout=600) as http:
        through_grpc(stub, *song(duration_s, steps, seed=0))  # warm-up: first-call costs on both paths
        through_http(http, *song(duration_s, steps, seed=0))
        for index in range(runs):
            params, config = song(duration_s, steps, seed=index + 1)
            grpc_runs.append(through_grpc(stub, params, config))
            http_runs.append(through_http(http, params, config))
            print(f"run {index + 1}/{runs}: gRPC {grpc_runs[-1].result_s:.3f}s, HTTP {http_runs[-1].result_s:.3f}s",
                  flush=True)
    channel.close()
    return grpc_runs, http_runs


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m http_service.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default=None, help="checkpoint folder (default: tiny random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--duration", type=float, default=10.0, help="song length in seconds")
    parser.add_argument("--steps", type=int, default=8, help="diffusion steps")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="acestep-bench-http-") as scratch:
        checkpoints = Path(args.checkpoints) if args.checkpoints else Path(scratch) / "checkpoints"
        if args.checkpoints is None:
            tiny_checkpoints.write_all(checkpoints, seed=0)
        with LocalStack(checkpoints, with_lm=False, with_http=True, device=args.device,
                        workdir=Path(scratch) / "stack") as stack:
            with stack.stop_on_signals():
                address = stack.start(timeout_s=600)
                print(f"stack up: gateway {address}, HTTP {stack.http_url}; {args.runs} runs of a "
                      f"{args.duration:g} s song, {args.steps} steps, each way", flush=True)
                grpc_runs, http_runs = bench(address, stack.http_url, args.runs, args.duration, args.steps)
    print(report(grpc_runs, http_runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
