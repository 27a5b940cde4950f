"""``python -m gateway.bench_overhead --checkpoints DIR``: what the gateway adds to a request.

Starts one DiT replica, the gateway and (unless ``--no-lm``) one LM on 127.0.0.1, then times the
same synthesis -- text2music with thinking off, one item, a fixed seed, WAV -- made directly to
the DiT's ``Synthesize`` and through the gateway's ``Generate``, alternating, after one warm-up
call each. Both clients read the whole stream (progress, file chunks, result); the difference of
the medians (and of the minimums, less sensitive to a busy host) is the gateway's overhead:
validation, admission, the replica pick and one more hop for every event. With the LM it also
times a few full requests (LM planning, then the DiT) end to end.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import grpc

from gateway import sdk
from gateway.serve import LocalStack
from shared import convert
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.dit.v1 import dit_pb2, dit_pb2_grpc
from shared.types import GenerationConfig, GenerationParams

SEED = 1234
END_TO_END_RUNS = 3
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 320 * 1024 * 1024)]


def synthesis_params(duration_s: float) -> GenerationParams:
    return GenerationParams(caption="lo-fi piano loop", duration=duration_s, thinking=False, use_cot_metas=False,
                            use_cot_caption=False, use_cot_language=False, shift=3.0)


def time_direct(stub: dit_pb2_grpc.DitServiceStub, params: GenerationParams) -> float:
    """Seconds for one Synthesize call straight to the DiT, stream read to the end."""
    request = dit_pb2.SynthesizeRequest(
        request_id=uuid.uuid4().hex, params=convert.params_to_pb(params), items=[dit_pb2.SynthesisItem(seed=SEED)],
        audio_format=common_pb2.AUDIO_FORMAT_WAV)
    started = time.perf_counter()
    for _ in stub.Synthesize(request):
        pass
    return time.perf_counter() - started


def time_gateway(client: sdk.AceStepClient, params: GenerationParams) -> tuple[float, dict[str, float]]:
    """Seconds for the same work as one Generate call through the gateway, and its time costs."""
    request = sdk.build_request(params, GenerationConfig(batch_size=1, seeds=[SEED], audio_format="wav"))
    costs: dict[str, float] = {}
    started = time.perf_counter()
    for event in client.stub().Generate(request):
        if event.HasField("result"):
            costs = dict(event.result.time_costs.seconds)
    return time.perf_counter() - started, costs


def measure(paths: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """One untimed warm-up call per path, then ``repeats`` timed rounds, alternating paths."""
    for run in paths.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            seconds[name].append(run())
    return seconds


def report(seconds: dict[str, list[float]]) -> None:
    for name, values in seconds.items():
        print(f"{name:<26} median {statistics.median(values):7.3f} s   mean {statistics.fmean(values):7.3f} s   "
              f"min {min(values):7.3f} s   max {max(values):7.3f} s   (n={len(values)})")
    direct, through = seconds["direct DiT Synthesize"], seconds["through the gateway"]
    for label, pick in (("median", statistics.median), ("min", min)):
        extra = pick(through) - pick(direct)
        print(f"{'gateway overhead':<26} {label:<6} {extra * 1000:+8.1f} ms  ({extra / pick(direct) * 100:+.1f} %)")


def time_end_to_end(client: sdk.AceStepClient, duration_s: float) -> None:
    """Full requests (LM metadata and codes, then the DiT): wall time and the stage costs of each."""
    params = GenerationParams(caption="upbeat synth-pop with a bright female vocal", duration=duration_s,
                              lyrics="[Verse]\nNeon lights are calling out my name\n", thinking=True, shift=3.0)
    for attempt in range(1, END_TO_END_RUNS + 1):
        elapsed, costs = time_gateway(client, params)
        print(f"{f'end-to-end with the LM #{attempt}':<26} {elapsed:7.3f} s   "
              + ", ".join(f"{key}={value:.3f}" for key, value in sorted(costs.items())))


def run(checkpoints: Path, repeats: int, duration_s: float, with_lm: bool, device: str) -> None:
    stack = LocalStack(checkpoints, num_dit=1, with_lm=with_lm, device=device)
    try:
        address = stack.start()
        dit = stack.services["dit0"]
        print(f"stack up: gateway {address}, DiT {dit.address}, LM {'on' if with_lm else 'off'}; "
              f"{duration_s:g} s songs, one item", flush=True)
        channel = grpc.insecure_channel(dit.address, CHANNEL_OPTIONS)
        client = sdk.AceStepClient(address)
        params = synthesis_params(duration_s)
        paths = {"direct DiT Synthesize": lambda: time_direct(dit_pb2_grpc.DitServiceStub(channel), params),
                 "through the gateway": lambda: time_gateway(client, params)[0]}
        report(measure(paths, repeats))
        if with_lm:
            time_end_to_end(client, duration_s)
        channel.close()
        client.close()
    finally:
        stack.stop()


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through run(), which stops the stack


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", required=True, help="checkpoints folder (e.g. the tiny ones)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--duration", type=float, default=10.0, help="song length in seconds (10..600)")
    parser.add_argument("--no-lm", action="store_true", help="skip the LM and the end-to-end request")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    run(Path(args.checkpoints), args.repeats, args.duration, not args.no_lm, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
