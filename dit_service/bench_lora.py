"""``python -m dit_service.bench_lora``: the cost of per-row LoRA adapters (``make bench-lora``).

Runs a batch of 8 text2music items with no adapter, with one adapter shared by every row and with
eight different adapters (one per row), and prints items per second through conditioning and
diffusion (the VAE decode, which adapters do not touch, is left out), the mean diffusion step and
each case's ratio to the no-adapter batch; then the time to load one adapter from disk onto the
device. Adapters are written in the PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``) with random factors and loaded through the service's loader.

``--size tiny`` (default) uses the tiny checkpoints on the CPU; ``--size 2b`` (CUDA) builds the
published 2B DiT shapes with random bf16 weights (``dit_service.bench --real-size``), with rank-64
adapters on the attention projections (the reference trainer's targets) unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from dit_service import bench
from dit_service.lora.format import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, LoraAdapter, load_adapter
from dit_service.lora.layers import Blend
from dit_service.pipeline import DitPipeline
from dit_service.planning import RowSpec, Sources, plan_request
from shared.types import GenerationParams

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
CASES = ("no adapter", "one shared adapter", "8 different adapters")


@dataclass(frozen=True)
class CaseTiming:
    case: str
    total_s: float
    step_s: tuple[float, ...]
    num_items: int

    @property
    def items_per_s(self) -> float:
        return self.num_items / self.total_s

    @property
    def step_mean_s(self) -> float:
        return statistics.mean(self.step_s)


def write_adapter(folder: Path, targets: dict[str, tuple[int, int]], kinds: tuple[str, ...], rank: int,
                  seed: int) -> Path:
    """A random PEFT LoRA on every decoder Linear whose name ends with one of ``kinds``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in targets.items():
        if name.rsplit(".", 1)[-1] in kinds:
            tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(kinds), "bias": "none"}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def run_case(pipeline: DitPipeline, case: str, blends: list[Blend], length_s: float, steps: int) -> CaseTiming:
    """Conditioning and denoising of one item per blend, timed."""
    params = GenerationParams(caption=bench.CAPTION, lyrics=bench.LYRICS, duration=length_s, inference_steps=steps)
    rows = []
    for index, blend in enumerate(blends):
        plan = plan_request(params, Sources(), has_codes=False, is_turbo=pipeline.is_turbo, model_name=pipeline.name,
                            vae_seed=0)
        plan.adapters = blend
        rows.append(RowSpec(plan, 0, seed=index))
    device, live = pipeline.device, (lambda: list(range(len(rows))))
    step_s: list[float] = []
    bench._sync(device)
    started = last = time.perf_counter()
    prepared = pipeline.prepare(rows)
    bench._sync(device)
    last = time.perf_counter()

    def on_step(step: int, num_steps: int) -> None:
        nonlocal last
        bench._sync(device)
        now = time.perf_counter()
        step_s.append(now - last)
        last = now

    pipeline.denoise(prepared, live_rows=live, on_step=on_step)
    bench._sync(device)
    return CaseTiming(case, time.perf_counter() - started, tuple(step_s), len(rows))


def load_adapters(pipeline: DitPipeline, root: Path, count: int, kinds: tuple[str, ...],
                  rank: int) -> tuple[list[LoraAdapter], list[float]]:
    """Write ``count`` adapters, then load each onto the device; returns them and the load seconds."""
    adapters, seconds = [], []
    for index in range(count):
        folder = write_adapter(root / f"bench-{index}", pipeline.lora.targets, kinds, rank, seed=index)
        bench._sync(pipeline.device)
        started = time.perf_counter()
        adapters.append(load_adapter(folder, folder.name, pipeline.lora.targets, pipeline.dtype, pipeline.device))
        bench._sync(pipeline.device)
        seconds.append(time.perf_counter() - started)
    return adapters, seconds


def print_table(timings: list[CaseTiming]) -> None:
    header = ("case", "items_per_s", "total_s", "step_mean_s", "step_vs_none", "items_vs_none")
    widths = [22, 12, 10, 12, 13, 14]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    none = timings[0]
    for t in timings:
        row = (t.case, f"{t.items_per_s:.3f}", f"{t.total_s:.3f}", f"{t.step_mean_s:.4f}",
               f"{t.step_mean_s / none.step_mean_s:.3f}", f"{none.items_per_s / t.items_per_s:.3f}")
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dit_service.bench_lora", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "2b"], default="tiny",
                        help="tiny checkpoints (CPU) or the published 2B DiT shapes with random weights (CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=float, default=None, help="song length in seconds (default: 10 tiny, 30 2b)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=None, help="adapter rank (default: 4 tiny, 64 for 2b)")
    parser.add_argument("--targets", nargs="+", default=list(ATTENTION), help="module kinds the adapters adapt")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, interleaved (the fastest is reported)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch default)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size == "2b":
        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            print("--size 2b needs a CUDA device", file=sys.stderr)
            return 2
        pipeline = bench.real_size_pipeline("turbo", args.device, torch.bfloat16)
    else:
        pipeline = bench.tiny_pipeline("turbo", args.device, None)
    rank = args.rank or (64 if args.size == "2b" else 4)
    length_s = args.length or (30.0 if args.size == "2b" else 10.0)
    with tempfile.TemporaryDirectory(prefix="acestep-bench-lora-") as folder:
        adapters, load_s = load_adapters(pipeline, Path(folder), args.batch, tuple(args.targets), rank)
    cases = {CASES[0]: [()] * args.batch, CASES[1]: [((adapters[0], 1.0),)] * args.batch,
             CASES[2]: [((adapter, 1.0),) for adapter in adapters]}
    run_case(pipeline, "warm-up", cases[CASES[2]], 10.0, args.steps)
    runs: dict[str, list[CaseTiming]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every case alike
        for name, blends in cases.items():
            runs[name].append(run_case(pipeline, name, blends, length_s, args.steps))
    timings = [min(found, key=lambda t: t.total_s) for found in runs.values()]
    label = f"{pipeline.name} on {args.device} ({pipeline.dtype}, {torch.get_num_threads()} CPU threads)"
    print(f"LoRA cost, batch {args.batch}, {length_s:g} s songs, rank {rank} on {', '.join(args.targets)}, {label}")
    print_table(timings)
    size_mib = adapters[0].num_bytes / 2**20
    print(f"adapter load (disk -> {args.device}, {size_mib:.2f} MiB): mean {statistics.mean(load_s) * 1000:.1f} ms, "
          f"max {max(load_s) * 1000:.1f} ms over {len(load_s)} adapters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
