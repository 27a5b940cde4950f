"""``make demo``: the whole stack end to end.

Writes tiny random-weight checkpoints when none are given, starts LM, DiT and gateway with
``acestep serve``'s launcher, generates one song with lyrics through the gateway (LM planning
then DiT), prints the progress and the written file, then renders the same song (its LM codes and
seed) again through a LoRA adapter (the tiny ``tiny-attn`` one, or ``--lora ID`` / the first
adapter found with real checkpoints) and stops the stack. Random weights make noise, not music:
the demo shows the serving path, real checkpoints make real songs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

from gateway import sdk
from gateway.cli import StageBar
from gateway.serve import LocalStack
from shared.types import GenerationConfig, GenerationParams

LYRICS = """[Verse 1]
Neon lights are calling out my name
Every city street is burning like a flame

[Chorus]
We run, we run, into the night
"""


def ensure_tiny_checkpoints(folder: Path) -> Path:
    from devtools.tiny_checkpoints import main as make_tiny

    from devtools.tiny_checkpoints import LORA_DIR, write_loras

    if not (folder / "acestep-v15-turbo" / "model.safetensors").exists():
        print(f"writing tiny random-weight checkpoints to {folder}", flush=True)
        make_tiny([str(folder)])
    elif not (folder / LORA_DIR).is_dir():  # checkpoints written before adapters were part of them
        write_loras(folder / LORA_DIR, seed=0)
    return folder


def with_adapter(client: sdk.AceStepClient, first: sdk.GenerationResult, lora_id: Optional[str],
                 config: GenerationConfig, out_dir: str) -> None:
    """The first song again (same LM codes and seed, no LM call) through the adapter ``lora_id``."""
    if lora_id is None:
        known = sdk.list_loras(client)
        if not known:
            print("no LoRA adapter under <checkpoints>/loras: skipping the adapter rendition")
            return
        lora_id = known[0]["lora_id"]
    plain = first.audios[0]
    params = dataclasses.replace(GenerationParams(**plain.params), thinking=False, use_cot_metas=False,
                                 use_cot_caption=False, use_cot_language=False, lora_id=lora_id, lora_scale=1.0)
    result = sdk.generate_music(client, params, config, save_dir=out_dir)
    if not result.success:
        print(f"generation with adapter {lora_id!r} failed: {result.error}")
        return
    styled = result.audios[0]
    frames = min(plain.tensor.shape[-1], styled.tensor.shape[-1])
    change = float((styled.tensor[:, :frames] - plain.tensor[:, :frames]).pow(2).mean().sqrt())
    print(f"wrote {styled.path} (the same song through LoRA adapter {lora_id!r}; RMS change {change:.4f} "
          f"against {plain.path})")


def run(checkpoints: Optional[str], out_dir: str, duration_s: float, device: str,
        lora_id: Optional[str] = None) -> int:
    folder = Path(checkpoints) if checkpoints else ensure_tiny_checkpoints(Path(".checkpoints/tiny"))
    if checkpoints:
        stack = LocalStack(folder, device=device)
    else:
        from devtools.tiny_checkpoints import TINY_LM_ENV

        stack = LocalStack(folder, device=device, extra_env=dict(TINY_LM_ENV))
    started = time.perf_counter()
    try:
        address = stack.start()
        print(f"stack up in {time.perf_counter() - started:.1f} s; gateway at {address}", flush=True)
        params = GenerationParams(caption="upbeat synth-pop with a bright female vocal", lyrics=LYRICS,
                                  duration=duration_s, thinking=True, shift=3.0, vocal_language="en")
        config = GenerationConfig(batch_size=1, audio_format="flac", seeds=[42])
        bar = StageBar(stream=sys.stdout)

        def show(event) -> None:
            if event.WhichOneof("event") == "progress":
                bar.update(event.progress)

        t0 = time.perf_counter()
        client = sdk.AceStepClient(address)
        result = sdk.generate_music(client, params, config, save_dir=out_dir, on_event=show)
        bar.close()
        if not result.success:
            print(f"generation failed: {result.error}")
            return 1
        for audio in result.audios:
            seconds = audio.tensor.shape[-1] / audio.sample_rate
            print(f"wrote {audio.path} ({seconds:.1f} s, {audio.sample_rate} Hz, key {audio.key}, "
                  f"seed {audio.params['seed']})")
        costs = result.extra_outputs["time_costs"]
        print(f"end-to-end {time.perf_counter() - t0:.2f} s; "
              + ", ".join(f"{k}={v:.2f}s" for k, v in sorted(costs.items())))
        with_adapter(client, result, lora_id if checkpoints else (lora_id or "tiny-attn"), config, out_dir)
        return 0
    finally:
        stack.stop()
        print("stack stopped", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=None, help="real checkpoints folder (default: tiny ones)")
    parser.add_argument("--out", default="out")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 when available)")
    parser.add_argument("--lora", default=None, help="adapter id for the second rendition (default: tiny-attn "
                                                     "on the tiny checkpoints, else the first one listed)")
    args = parser.parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    return run(args.checkpoints, args.out, args.duration, device, args.lora)


if __name__ == "__main__":
    sys.exit(main())
