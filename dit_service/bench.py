"""``python -m dit_service.bench``: DiT stage timings and batch throughput (``make bench-dit``).

By default it writes the tiny random-weight checkpoints to a temporary folder and runs on the CPU:
per-stage times (conditioning, each diffusion step, VAE decode) of 30 s, 120 s and 240 s songs at
batch 1, then throughput at batch 1, 2, 4 and 8 (items per second and the ratio to batch 1).

``--real-size`` (CUDA) builds the published 2B DiT, Qwen3-Embedding-0.6B and VAE shapes with
random weights directly on the device (bf16), so the numbers reflect the real model's cost; only
the tokenizer is the tiny one (token counts are similar for short prompts).

``--stream`` instead measures the engine under a steady stream of requests (closed loop: every
client sends its next one-item request as soon as the previous one finished) at batch 4, with
the VAE decode pipelined on its own thread and inline, back to back: items per second and ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dit_service.pipeline import DitPipeline
from dit_service.planning import RowSpec, Sources, plan_request
from devtools import tiny_checkpoints as tc
from shared.types import GenerationParams

CAPTION = "An upbeat synth-pop track with a bright female vocal and a steady four-on-the-floor beat."
LYRICS = "[Verse]\nNeon lights are calling, calling out your name\n[Chorus]\nSing it loud tonight"
REAL_DIT_OVERRIDES = {
    "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "text_hidden_dim": 1024,
    "num_lyric_encoder_hidden_layers": 8, "num_timbre_encoder_hidden_layers": 4,
    "num_attention_pooler_hidden_layers": 2, "fsq_dim": 2048, "dtype": "bfloat16",
}
REAL_VAE = {"encoder_hidden_size": 128, "downsampling_ratios": [2, 4, 4, 6, 10], "channel_multiples": [1, 2, 4, 8, 16],
            "decoder_channels": 128, "decoder_input_channels": 64, "audio_channels": 2, "sampling_rate": 48_000}
REAL_TEXT = {"vocab_size": 151_669, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


@dataclass(frozen=True)
class Timing:
    """Seconds spent on one batch, per stage."""

    batch: int
    length_s: float
    conditioning_s: float
    step_s: tuple[float, ...]
    decode_s: float

    @property
    def diffusion_s(self) -> float:
        return sum(self.step_s)

    @property
    def total_s(self) -> float:
        return self.conditioning_s + self.diffusion_s + self.decode_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batch(pipeline: DitPipeline, batch: int, length_s: float, steps: int) -> Timing:
    """Conditioning, denoising and VAE decode of ``batch`` text2music items of ``length_s`` seconds."""
    params = GenerationParams(caption=CAPTION, lyrics=LYRICS, duration=length_s, inference_steps=steps)
    plan = plan_request(params, Sources(), has_codes=False, is_turbo=pipeline.is_turbo, model_name=pipeline.name,
                        vae_seed=0)
    rows = [RowSpec(plan, index, seed=index) for index in range(batch)]
    device, live = pipeline.device, (lambda: list(range(batch)))
    _sync(device)
    started = time.perf_counter()
    prepared = pipeline.prepare(rows)
    _sync(device)
    conditioned = last = time.perf_counter()
    step_s: list[float] = []

    def on_step(step: int, num_steps: int) -> None:
        nonlocal last
        _sync(device)
        now = time.perf_counter()
        step_s.append(now - last)
        last = now

    latents = pipeline.denoise(prepared, live_rows=live, on_step=on_step)
    _sync(device)
    decode_started = time.perf_counter()
    for _ in pipeline.decode_tiles(latents, prepared.num_frames, live):
        pass
    decode_s = time.perf_counter() - decode_started
    return Timing(batch, length_s, conditioned - started, tuple(step_s), decode_s)


def tiny_pipeline(variant: str, device: str, checkpoints: Optional[Path]) -> DitPipeline:
    """The tiny checkpoints (written to a temporary folder unless ``checkpoints`` is given)."""
    folder = tc.TURBO_DIR if variant == "turbo" else tc.BASE_DIR
    root = checkpoints or Path(tempfile.mkdtemp(prefix="acestep-bench-"))
    if checkpoints is None:
        tc.write_all(root, seed=0, steps=[step for step in tc.WRITER_STEPS if step.folder != tc.LM_DIR])
    return DitPipeline.load(root, folder, device, torch.float32)


def real_size_pipeline(variant: str, device: str, dtype: torch.dtype) -> DitPipeline:
    """Published 2B / Qwen3-Embedding-0.6B / VAE shapes with random weights, built on ``device``."""
    from diffusers import AutoencoderOobleck
    from transformers import Qwen3Config, Qwen3Model

    from dit_service.model.acestep import AceStepConditionGenerationModel
    from dit_service.model.config import DiTConfig
    from dit_service.model.weights import LoadedDiT
    from dit_service.text_encoder import TextEncoder
    from dit_service.vae import Vae
    from shared.tiny_tokenizers import build_text_encoder_tokenizer

    config = DiTConfig.from_dict({**tc.tiny_dit_config(variant), **REAL_DIT_OVERRIDES})
    with torch.device(device):
        model = AceStepConditionGenerationModel(config)  # PyTorch's default random init, on the device
    model = model.to(dtype).eval().requires_grad_(False)
    model.tokenizer.quantizer.float()
    silence = torch.randn(1, 15000, config.audio_acoustic_hidden_dim, device=device, dtype=dtype)
    tokenizer = build_text_encoder_tokenizer(tempfile.mkdtemp(prefix="acestep-bench-tok-"))
    with torch.device(device):
        text_model = Qwen3Model(Qwen3Config(**REAL_TEXT)).to(dtype)
        vae_model = AutoencoderOobleck(**REAL_VAE).to(dtype)
    return DitPipeline(LoadedDiT(model, config, silence), TextEncoder(tokenizer, text_model), Vae(vae_model),
                       name=f"real-size-{variant}")


def _row(values: Sequence[object], widths: Sequence[int]) -> str:
    return "  ".join(str(v).rjust(w) for v, w in zip(values, widths))


def print_stage_table(timings: Sequence[Timing]) -> None:
    header = ("length_s", "conditioning_s", "step_mean_s", "step_max_s", "steps", "diffusion_s", "decode_s",
              "total_s", "x_realtime")
    widths = [max(10, len(h)) for h in header]
    print(_row(header, widths))
    for t in timings:
        print(_row((f"{t.length_s:g}", f"{t.conditioning_s:.3f}", f"{statistics.mean(t.step_s):.4f}",
                    f"{max(t.step_s):.4f}", len(t.step_s), f"{t.diffusion_s:.3f}", f"{t.decode_s:.3f}",
                    f"{t.total_s:.3f}", f"{t.length_s * t.batch / t.total_s:.1f}"), widths))


def print_throughput_table(timings: Sequence[Timing]) -> None:
    header = ("batch", "total_s", "items_per_s", "vs_batch_1", "step_mean_s", "decode_s")
    widths = [max(10, len(h)) for h in header]
    base_rate = timings[0].batch / timings[0].total_s
    print(_row(header, widths))
    for t in timings:
        rate = t.batch / t.total_s
        print(_row((t.batch, f"{t.total_s:.3f}", f"{rate:.3f}", f"{rate / base_rate:.2f}",
                    f"{statistics.mean(t.step_s):.4f}", f"{t.decode_s:.3f}"), widths))


async def stream_items_per_s(pipeline: DitPipeline, *, vae_queue_batches: int, batch: int, clients: int,
                             num_items: int, length_s: float, steps: int) -> float:
    """Items per second of ``clients`` closed-loop clients sending one-item requests until ``num_items`` are done."""
    from dit_service.engine import DitEngine, EngineConfig
    from dit_service.events import SynthesisItem, SynthesisRequest

    engine = DitEngine(pipeline, EngineConfig(max_batch_items=batch, batch_window_s=0.05,
                                              vae_queue_batches=vae_queue_batches))
    await engine.start()
    params = GenerationParams(caption=CAPTION, lyrics=LYRICS, duration=length_s, inference_steps=steps, thinking=False)
    remaining = num_items

    async def client(name: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            request = SynthesisRequest(f"stream-{name}-{remaining}", params, (SynthesisItem(seed=remaining),),
                                       audio_format="wav", stream_pcm=True)
            async for _ in engine.submit(request):
                pass

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        await engine.stop()
    return num_items / (time.perf_counter() - started)


def print_stream_table(pipeline: DitPipeline, args: argparse.Namespace, label: str) -> None:
    """Pipelined vs inline VAE decode, back to back on the same pipeline."""
    runs = {}
    for name, queue_batches in (("inline", 0), ("pipelined", 1)):
        runs[name] = asyncio.run(stream_items_per_s(
            pipeline, vae_queue_batches=queue_batches, batch=args.stream_batch, clients=2 * args.stream_batch,
            num_items=args.stream_items, length_s=args.throughput_length, steps=args.steps))
    print(f"Steady stream, batch {args.stream_batch}, {args.stream_items} one-item requests of "
          f"{args.throughput_length:g} s, {label}")
    header = ("vae_decode", "items_per_s", "vs_inline")
    widths = [max(12, len(h)) for h in header]
    print(_row(header, widths))
    for name, rate in runs.items():
        print(_row((name, f"{rate:.3f}", f"{rate / runs['inline']:.2f}"), widths))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dit_service.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["turbo", "base"], default="turbo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--real-size", action="store_true", help="2B shapes, random bf16 weights (needs CUDA)")
    parser.add_argument("--checkpoints", type=Path, default=None, help="existing tiny checkpoint root")
    parser.add_argument("--lengths", type=float, nargs="+", default=[30.0, 120.0, 240.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--throughput-length", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=8, help="base models: diffusion steps (turbo: always 8)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch default)")
    parser.add_argument("--stream", action="store_true",
                        help="only the steady-stream figure: VAE decode pipelined vs inline")
    parser.add_argument("--stream-batch", type=int, default=4)
    parser.add_argument("--stream-items", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real_size:
        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            print("--real-size needs a CUDA device", file=sys.stderr)
            return 2
        pipeline = real_size_pipeline(args.variant, args.device, torch.bfloat16)
    else:
        pipeline = tiny_pipeline(args.variant, args.device, args.checkpoints)
    run_batch(pipeline, 1, 10.0, args.steps)  # warm-up: first-call allocations and kernel selection
    label = f"{pipeline.name} on {args.device} ({pipeline.dtype}, {torch.get_num_threads()} CPU threads)"
    if args.stream:
        print_stream_table(pipeline, args, label)
        return 0
    print(f"DiT stage timings, batch 1, {label}")
    print_stage_table([run_batch(pipeline, 1, length, args.steps) for length in args.lengths])
    print(f"\nThroughput, {args.throughput_length:g} s songs, {label}")
    print_throughput_table([run_batch(pipeline, batch, args.throughput_length, args.steps) for batch in args.batches])
    return 0


if __name__ == "__main__":
    sys.exit(main())
