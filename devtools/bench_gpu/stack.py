"""The whole stack as processes (``gateway.serve.LocalStack`` on the spec's device): time to the first
PCM chunk through the gateway, songs per minute with N concurrent requests, memory per service.

Every request is a full one: the LM plans the codes (all metadata given, so its chain of thought is
skipped), the DiT renders and decodes them, the gateway streams the WAV back. GPU memory per
service comes from ``nvidia-smi`` (the processes of each service's process group); on CPU, the
services' peak resident memory.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from devtools.bench_gpu.spec import (
    CAPTION, END_TO_END, FIRST_PCM, LYRICS, MEMORY, METADATA, BenchSpec, SectionResult, memory_metric, section_main,
)

START_TIMEOUT_S = 900.0


def song_params(duration_s: float):
    from shared.types import GenerationParams

    return GenerationParams(caption=CAPTION, lyrics=LYRICS, duration=duration_s, bpm=METADATA["bpm"],
                            keyscale=METADATA["keyscale"], timesignature=METADATA["timesignature"],
                            vocal_language=METADATA["language"], thinking=True, use_cot_caption=False,
                            use_cot_language=False, inference_steps=8)


def one_request(client, params, seed: int, stream_pcm: bool) -> tuple[float, Optional[float], dict[str, float]]:
    """One Generate call read to the end: (seconds, seconds to the first PCM chunk, the result's time costs)."""
    from gateway import sdk
    from shared.types import GenerationConfig

    config = GenerationConfig(batch_size=1, use_random_seed=False, seeds=[seed], audio_format="wav")
    started = time.perf_counter()
    first_pcm: Optional[float] = None
    costs: dict[str, float] = {}
    for event in client.stub().Generate(sdk.build_request(params, config, stream_pcm=stream_pcm)):
        kind = event.WhichOneof("event")
        if kind == "audio" and first_pcm is None:
            first_pcm = time.perf_counter() - started
        elif kind == "result":
            costs = dict(event.result.time_costs.seconds)
        elif kind == "failed":
            raise RuntimeError(f"request failed: {event.failed.error.message}")
    return time.perf_counter() - started, first_pcm, costs


def gpu_memory_by_service(stack) -> dict[str, float]:
    """GiB per service from ``nvidia-smi --query-compute-apps`` (a service's engine processes count
    with it: they share its process group). Empty when nvidia-smi lists no processes."""
    try:
        listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    groups = {service.process.pid: name for name, service in stack.services.items()}
    used: dict[str, float] = {}
    for row in listing.strip().splitlines():
        pid_text, _, mib_text = row.partition(",")
        try:
            name = groups.get(os.getpgid(int(pid_text)))
        except (ValueError, ProcessLookupError, PermissionError):
            continue
        if name is not None:
            used[name] = used.get(name, 0.0) + float(mib_text) / 1024
    return used


def _stack_env(spec: BenchSpec) -> dict[str, str]:
    from devtools.tiny_checkpoints import TINY_LM_ENV

    env = {"TOKENIZERS_PARALLELISM": "false"}
    return {**env, **TINY_LM_ENV} if spec.size == "tiny" else env


def _measure(spec: BenchSpec, stack, result: SectionResult) -> None:
    from gateway import sdk

    client = sdk.AceStepClient(stack.services["gateway"].address)
    params = song_params(spec.stack_duration_s)
    one_request(client, params, 0, stream_pcm=True)  # warm-up through every hop
    elapsed, first_pcm, costs = one_request(client, params, 1, stream_pcm=True)
    workload = f"{spec.stack_duration_s:g} s song, 1 full request"
    result.add(FIRST_PCM, workload, "first PCM chunk s", first_pcm)
    result.add(FIRST_PCM, workload, "whole request s", elapsed)
    for key in ("lm_total_time", "dit_conditioning_time", "dit_diffusion_time", "dit_decode_time"):
        result.add(FIRST_PCM, workload, f"{key} s", costs.get(key))
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=spec.stack_requests) as pool:
        runs = list(pool.map(lambda seed: one_request(client, params, seed, stream_pcm=False),
                             range(100, 100 + spec.stack_requests)))
    wall_s = time.perf_counter() - started
    workload = f"{spec.stack_requests} concurrent requests, {spec.stack_duration_s:g} s songs"
    result.add(END_TO_END, workload, "songs/min", 60.0 * spec.stack_requests / wall_s)
    result.add(END_TO_END, workload, "request latency s (p50)", statistics.median(r[0] for r in runs))
    client.close()


def run(spec: BenchSpec, result: SectionResult) -> None:
    from gateway.serve import LocalStack

    workdir = Path(tempfile.mkdtemp(prefix="acestep-bench-stack-", dir=spec.work_dir or None))
    stack = LocalStack(Path(spec.checkpoints), lm_model=spec.lm_model, dit_model=spec.dit_model, device=spec.device,
                       extra_env=_stack_env(spec), workdir=workdir)
    try:
        started = time.perf_counter()
        stack.start(timeout_s=START_TIMEOUT_S)
        result.notes.append(f"stack: LM + DiT + gateway processes on {spec.device}, up in "
                            f"{time.perf_counter() - started:.1f} s (logs: {workdir})")
        _measure(spec, stack, result)
        if spec.is_cuda:
            per_service = gpu_memory_by_service(stack)
            if not per_service:
                result.notes.append("stack GPU memory: nvidia-smi lists no processes here")
            for name, gib in sorted(per_service.items()):
                result.add(MEMORY, f"{name} service (stack, nvidia-smi)", "GPU memory used GiB", gib)
        else:
            for name, mib in sorted(stack.peak_rss_mib().items()):
                result.add(MEMORY, f"{name} service (stack)", memory_metric(False), mib / 1024)
    finally:
        stack.stop()


if __name__ == "__main__":
    raise SystemExit(section_main(run))
