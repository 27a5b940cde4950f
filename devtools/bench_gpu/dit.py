"""Our DiT pipeline in process: per-stage times, batch throughput, first PCM tile and peak memory.

For every song length and batch of the spec it times, on the device with synchronisation at each
boundary: the text encoder (captions + lyric embeddings), the condition encoders, the diffusion
loop and the tiled VAE decode (and when its first tile is out, the in-process first PCM chunk).
bf16 on CUDA, float32 on CPU (the services' defaults).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from devtools.bench_gpu.spec import (
    CAPTION, DIT_STAGES, DIT_THROUGHPUT, FIRST_PCM, LYRICS, MEMORY, METADATA, BenchSpec, SectionResult,
    memory_metric, peak_host_rss_gib, section_main, stage_workload,
)


@dataclass(frozen=True)
class StageTimes:
    """Seconds of one batch, per stage; ``first_tile_s`` counts from the start of the batch."""

    text_encode_s: float
    conditioning_s: float      # the whole prepare step (text encoder included)
    diffusion_s: float
    decode_s: float
    first_tile_s: float
    one_tile_s: float

    @property
    def total_s(self) -> float:
        return self.conditioning_s + self.diffusion_s + self.decode_s


class _TimedTextEncoder:
    """The pipeline's text encoder with the seconds of its two calls summed (device-synchronised)."""

    def __init__(self, encoder: Any, sync) -> None:
        self._encoder, self._sync, self.seconds = encoder, sync, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def _timed(self, method, prompts):
        self._sync()
        started = time.perf_counter()
        out = method(prompts)
        self._sync()
        self.seconds += time.perf_counter() - started
        return out

    def encode_captions(self, prompts):
        return self._timed(self._encoder.encode_captions, prompts)

    def embed_lyrics(self, prompts):
        return self._timed(self._encoder.embed_lyrics, prompts)


def _sync_of(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def run_batch(pipeline, timed_text: _TimedTextEncoder, batch: int, duration_s: float) -> StageTimes:
    """``batch`` text2music items of ``duration_s`` through prepare, denoise and decode."""
    from dit_service.planning import RowSpec, Sources, plan_request
    from shared.types import GenerationParams

    params = GenerationParams(caption=CAPTION, lyrics=LYRICS, duration=duration_s, bpm=METADATA["bpm"],
                              keyscale=METADATA["keyscale"], timesignature=METADATA["timesignature"],
                              vocal_language=METADATA["language"], inference_steps=8)
    plan = plan_request(params, Sources(), has_codes=False, is_turbo=pipeline.is_turbo, model_name=pipeline.name,
                        vae_seed=0)
    rows = [RowSpec(plan, index, seed=index) for index in range(batch)]
    sync, live = _sync_of(pipeline.device), (lambda: list(range(batch)))
    timed_text.seconds = 0.0
    sync()
    started = time.perf_counter()
    prepared = pipeline.prepare(rows)
    sync()
    conditioned = time.perf_counter()
    latents = pipeline.denoise(prepared, live_rows=live)
    sync()
    denoised = time.perf_counter()
    first_tile = None
    for _ in pipeline.decode_tiles(latents, prepared.num_frames, live):
        if first_tile is None:
            sync()
            first_tile = time.perf_counter()
    sync()
    decoded = time.perf_counter()
    return StageTimes(text_encode_s=timed_text.seconds, conditioning_s=conditioned - started,
                      diffusion_s=denoised - conditioned, decode_s=decoded - denoised,
                      first_tile_s=first_tile - started, one_tile_s=first_tile - denoised)


def _add_stage_lines(result: SectionResult, workload: str, times: StageTimes) -> None:
    result.add(DIT_STAGES, workload, "text encode s", times.text_encode_s)
    result.add(DIT_STAGES, workload, "condition encoders s", times.conditioning_s - times.text_encode_s)
    result.add(DIT_STAGES, workload, "diffusion s", times.diffusion_s)
    result.add(DIT_STAGES, workload, "VAE decode s", times.decode_s)
    result.add(DIT_STAGES, workload, "total s", times.total_s)


def run(spec: BenchSpec, result: SectionResult) -> None:
    from dit_service.pipeline import DitPipeline

    device = torch.device(spec.device)
    dtype = torch.bfloat16 if spec.is_cuda else torch.float32
    pipeline = DitPipeline.load(spec.checkpoints, spec.dit_model, spec.device, dtype)
    timed_text = _TimedTextEncoder(pipeline.text_encoder, _sync_of(device))
    pipeline.text_encoder = timed_text
    result.notes.append(
        f"DiT: {spec.dit_model} ({spec.size}) on {spec.device}, {str(dtype).removeprefix('torch.')}, "
        "attention: torch SDPA with a dense additive mask (sliding layers: |i - j| <= sliding_window, "
        "plus key padding), turbo: 8 steps")
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if spec.is_cuda else None
    run_batch(pipeline, timed_text, 1, min(spec.durations_s))  # warm-up: allocations, kernel choice
    if spec.is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for duration_s in spec.durations_s:
        rates: dict[int, float] = {}
        for batch in spec.batches:
            times = run_batch(pipeline, timed_text, batch, duration_s)
            workload = stage_workload(duration_s, batch)
            print(f"dit: {workload}: {times}", flush=True)
            _add_stage_lines(result, workload, times)
            rates[batch] = batch / times.total_s
            result.add(DIT_THROUGHPUT, workload, "items/s", rates[batch])
            if batch == 1:
                result.add(FIRST_PCM, f"{duration_s:g} s song, DiT in process", "first PCM chunk s", times.first_tile_s)
                result.add(FIRST_PCM, f"{duration_s:g} s song, DiT in process", "one VAE tile s", times.one_tile_s)
        low, high = min(spec.batches), max(spec.batches)
        if high != low:
            result.add(DIT_THROUGHPUT, f"{duration_s:g} s song", f"batch {high} / batch {low} items/s x",
                       rates[high] / rates[low])
    if spec.is_cuda:
        result.add(MEMORY, "DiT service (in process)", "weights GiB", weights_gib)
        result.add(MEMORY, "DiT service (in process)", memory_metric(True), torch.cuda.max_memory_allocated(device) / 2**30)
    else:
        result.add(MEMORY, "DiT service (in process)", memory_metric(False), peak_host_rss_gib())


if __name__ == "__main__":
    raise SystemExit(section_main(run))
