"""``make bench-lm``: LM engine figures on the tiny checkpoint (CPU, vLLM).

Prints audio codes per second for 1 request vs 8 concurrent requests (the continuous-batching
gain), the cost of LM classifier-free guidance (throughput with vs without), and the time to
first token; each figure is the median of ``--repeats`` rounds, and the machine's load average is
printed with them (on a shared CPU the figures move with it). Figures only; nothing is asserted.

    python -m lm_service.bench [--checkpoints DIR] [--num-codes 150] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from lm_service.__main__ import build_engine
from lm_service.constraints.spec import ConstraintSpec
from lm_service.cot import format_metadata_as_cot
from lm_service.engine.config import LmEngineConfig
from lm_service.prompts import codes_prompt, codes_unconditional_prompt, default_chat_template
from lm_service.runtime import LmRuntime, SamplingInput

LYRICS = "[Verse]\nNeon lights are calling out my name\n[Chorus]\nWe run into the night\n"
METADATA = {"bpm": 120, "caption": "upbeat synth-pop", "duration": 30, "keyscale": "A minor", "language": "en",
            "timesignature": "4"}


async def one_round(runtime: LmRuntime, num_requests: int, num_codes: int, cfg_scale: float,
                    seed0: int) -> tuple[float, list[float]]:
    """``num_requests`` codes-phase requests at once → (codes per second, TTFTs)."""
    cot = format_metadata_as_cot(METADATA)
    prompt = codes_prompt("upbeat synth-pop", LYRICS, cot)
    uncond = codes_unconditional_prompt("upbeat synth-pop", LYRICS)
    spec = ConstraintSpec(phase="codes", skip_caption=True, skip_language=True, target_codes=num_codes)
    requests = [runtime.request(prompt, spec, SamplingInput(temperature=0.85, top_p=0.9, cfg_scale=cfg_scale,
                                                            seed=seed0 + i), num_codes + 10, uncond,
                                request_id=f"bench-{seed0}-{i}") for i in range(num_requests)]
    started = time.perf_counter()
    outputs = await asyncio.gather(*(_timed(runtime, r) for r in requests))
    elapsed = time.perf_counter() - started
    total_codes = sum(len(runtime.codes_of(ids)) for ids, _ in outputs)
    return total_codes / elapsed, [ttft for _, ttft in outputs]


async def _timed(runtime: LmRuntime, request) -> tuple[tuple[int, ...], float]:
    started = time.perf_counter()
    first: list[float] = []
    output = await runtime.run(request, lambda n: first.append(time.perf_counter() - started) if not first else None)
    return output.token_ids, first[0] if first else float("nan")


async def run(model_dir: Path, num_codes: int, backend: str, repeats: int = 1) -> None:
    from transformers import AutoTokenizer

    config = LmEngineConfig(model_dir=model_dir, max_model_len=4096, max_num_seqs=32,
                            views_dir=str(Path(tempfile.gettempdir()) / "acestep-lm-views"))
    engine = build_engine(config, backend)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    runtime = LmRuntime(engine, tokenizer, tokenizer.chat_template or default_chat_template(), 4096)
    t0 = time.perf_counter()
    await engine.start()
    print(f"engine: {type(engine).__name__}, start-up {time.perf_counter() - t0:.1f} s, {num_codes} codes/request")
    await one_round(runtime, 1, 10, 1.0, 0)  # warm-up
    print(f"load average before: {_load()}; torch threads: {torch.get_num_threads()}; median of {repeats} round(s)")
    rows = []
    for cfg_scale in (1.0, 2.0):
        for concurrency in (1, 8):
            rounds = [await one_round(runtime, concurrency, num_codes, cfg_scale, 100 * concurrency)
                      for _ in range(repeats)]
            rate = statistics.median(r for r, _ in rounds)
            rows.append((cfg_scale, concurrency, rate, statistics.median(t for _, ttfts in rounds for t in ttfts)))
    base = {cfg: rate for cfg, conc, rate, _ in rows if conc == 1}
    print(f"{'cfg_scale':>9} {'requests':>8} {'codes/s':>9} {'vs 1 req':>9} {'TTFT p50':>9}")
    for cfg_scale, concurrency, rate, ttft in rows:
        print(f"{cfg_scale:>9.1f} {concurrency:>8d} {rate:>9.1f} {rate / base[cfg_scale]:>8.2f}x {ttft * 1000:>7.0f}ms")
    no_cfg = {conc: rate for cfg, conc, rate, _ in rows if cfg == 1.0}
    with_cfg = {conc: rate for cfg, conc, rate, _ in rows if cfg == 2.0}
    for conc in (1, 8):
        print(f"CFG cost at {conc} request(s): throughput {with_cfg[conc] / no_cfg[conc]:.2f}x of unguided")
    print(f"peak running sequences: {engine.stats().peak_running_seqs}; load average after: {_load()}")
    await engine.shutdown()


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm_service.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=None, help="checkpoint root (default: tiny ones in a temp dir)")
    parser.add_argument("--model", default="acestep-5Hz-lm-0.6B")
    parser.add_argument("--num-codes", type=int, default=150, help="codes per request (150 = 30 s)")
    parser.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per figure (the median is printed)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    root = Path(args.checkpoints) if args.checkpoints else Path(tempfile.mkdtemp(prefix="bench-lm-"))
    if not args.checkpoints:
        from devtools.tiny_checkpoints import LM_DIR, write_lm

        write_lm(root / LM_DIR, seed=0)
    asyncio.run(run(root / args.model, args.num_codes, args.backend, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
