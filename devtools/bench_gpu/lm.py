"""Our LM engine in process: audio codes per second for 1 vs N concurrent plans, with and without CFG.

The engine is the service's own (vLLM when installed, else the transformers backend; the line notes
say which), driven through ``LmRuntime`` with the codes-phase prompt and constraint of a plan whose
metadata is all given (``lm_service.bench.one_round``).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from devtools.bench_gpu.spec import LM, MEMORY, BenchSpec, SectionResult, memory_metric, peak_host_rss_gib, section_main

MAX_MODEL_LEN = 4096


def lm_workload(concurrency: int, cfg_scale: float, num_codes: int) -> str:
    guidance = f"CFG {cfg_scale:g}" if cfg_scale > 1.0 else "no CFG"
    return f"{concurrency} concurrent plan{'s' if concurrency > 1 else ''}, {guidance}, {num_codes} codes each"


async def _measure(spec: BenchSpec, result: SectionResult) -> int:
    """Run the rounds; returns the least free device memory seen while the engine was loaded (0 on CPU)."""
    from transformers import AutoTokenizer

    from lm_service.__main__ import build_engine
    from lm_service.bench import one_round
    from lm_service.engine.config import LmEngineConfig
    from lm_service.prompts import default_chat_template
    from lm_service.runtime import LmRuntime

    model_dir = Path(spec.checkpoints) / spec.lm_model
    config = LmEngineConfig(model_dir=model_dir, dtype="bfloat16" if spec.is_cuda else "float32",
                            max_model_len=MAX_MODEL_LEN, max_num_seqs=max(32, 2 * max(spec.lm_concurrency) + 4),
                            kv_cache_gib=0.0 if spec.is_cuda else 1.0, enforce_eager=not spec.is_cuda,
                            device="cuda" if spec.is_cuda else "cpu",
                            views_dir=str(Path(tempfile.gettempdir()) / "acestep-bench-lm-views"))
    engine = build_engine(config, "auto")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    runtime = LmRuntime(engine, tokenizer, tokenizer.chat_template or default_chat_template(), MAX_MODEL_LEN)
    started = time.perf_counter()
    await engine.start()
    result.notes.append(f"LM: {spec.lm_model} ({spec.size}) on {spec.device}, engine {type(engine).__name__}, "
                        f"start-up {time.perf_counter() - started:.1f} s")
    await one_round(runtime, 1, 10, 1.0, 0)  # warm-up
    rates: dict[tuple[float, int], float] = {}
    least_free = torch.cuda.mem_get_info()[0] if spec.is_cuda else 0
    for cfg_scale in spec.lm_cfg_scales:
        for concurrency in spec.lm_concurrency:
            rate, ttfts = await one_round(runtime, concurrency, spec.lm_codes, cfg_scale, 1000 * concurrency)
            rates[cfg_scale, concurrency] = rate
            workload = lm_workload(concurrency, cfg_scale, spec.lm_codes)
            print(f"lm: {workload}: {rate:.1f} codes/s", flush=True)
            result.add(LM, workload, "codes/s", rate)
            result.add(LM, workload, "time to first token s (p50)", statistics.median(ttfts))
            if spec.is_cuda:
                least_free = min(least_free, torch.cuda.mem_get_info()[0])
    _add_ratios(spec, result, rates)
    await engine.shutdown()
    return least_free


def _add_ratios(spec: BenchSpec, result: SectionResult, rates: dict[tuple[float, int], float]) -> None:
    """Concurrency gain per CFG setting and CFG cost per concurrency (time guided / time unguided)."""
    low, high = min(spec.lm_concurrency), max(spec.lm_concurrency)
    for cfg_scale in spec.lm_cfg_scales:
        if high != low:
            guidance = f"CFG {cfg_scale:g}" if cfg_scale > 1.0 else "no CFG"
            result.add(LM, f"{guidance}, {spec.lm_codes} codes each", f"{high} vs {low} concurrent codes/s x",
                       rates[cfg_scale, high] / rates[cfg_scale, low])
    unguided, guided = min(spec.lm_cfg_scales), max(spec.lm_cfg_scales)
    if unguided == 1.0 and guided > 1.0:
        for concurrency in spec.lm_concurrency:
            result.add(LM, f"{concurrency} concurrent, {spec.lm_codes} codes each", f"CFG {guided:g} cost x (time)",
                       rates[unguided, concurrency] / rates[guided, concurrency])


def run(spec: BenchSpec, result: SectionResult) -> None:
    free_before = torch.cuda.mem_get_info()[0] if spec.is_cuda else 0
    least_free = asyncio.run(_measure(spec, result))
    if spec.is_cuda:
        # vLLM's engine core is a child process: the device-wide drop in free memory covers it too.
        result.add(MEMORY, "LM service (in process)", memory_metric(True), torch.cuda.max_memory_allocated() / 2**30,
                   note="transformers backend; vLLM runs in an engine process, see the device-wide line")
        result.add(MEMORY, "LM service (device-wide, while loaded)", "GPU memory used GiB",
                   (free_before - least_free) / 2**30)
    else:
        result.add(MEMORY, "LM service (in process)", memory_metric(False), peak_host_rss_gib(),
                   note="this process only: a vLLM engine core runs in a process of its own")


if __name__ == "__main__":
    raise SystemExit(section_main(run))
