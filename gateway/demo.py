"""``make demo``: the whole stack end to end.

Writes tiny random-weight checkpoints when none are given, starts LM, DiT and gateway with
``acestep serve``'s launcher, generates one song with lyrics through the gateway (LM planning
then DiT), prints the progress and the written file, and stops the stack. Random weights make
noise, not music: the demo shows the serving path, real checkpoints make real songs.
"""

from __future__ import annotations

import argparse
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

    if not (folder / "acestep-v15-turbo" / "model.safetensors").exists():
        print(f"writing tiny random-weight checkpoints to {folder}", flush=True)
        make_tiny([str(folder)])
    return folder


def run(checkpoints: Optional[str], out_dir: str, duration_s: float, device: str) -> int:
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
        result = sdk.generate_music(sdk.AceStepClient(address), params, config, save_dir=out_dir, on_event=show)
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
    args = parser.parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    return run(args.checkpoints, args.out, args.duration, device)


if __name__ == "__main__":
    sys.exit(main())
