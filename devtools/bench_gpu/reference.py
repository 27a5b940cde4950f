"""The same workload on the reference implementation's own pipeline (ace-step/ACE-Step-1.5).

Needs a checkout at ``spec.reference_dir`` (``make reference-checkout``). The reference finds its
weights in ``<checkout>/checkpoints``; that becomes a link to a view of our checkpoint folder with
the names it expects (its default LM folder name points at our LM). Its DiT is loaded through
``trust_remote_code`` from the checkpoint folder, so the DiT's modeling files are copied into the
view from the checkout (newer revisions keep them under ``acestep/models``) or from
``spec.reference_model_code``. Same random weights, same device and dtype policy (bf16 on CUDA).

Measured with its own entry points: ``AceStepHandler.generate_music`` (stage split from device-
synchronised wrappers around its text embedding, ``service_generate`` and ``tiled_decode`` plus its own
``diffusion_time_cost``), ``LLMHandler.generate_with_stop_condition`` (N plans as its batch path),
``acestep.inference.generate_music`` for full requests one after another (its server runs one at a
time; audio comes out only at the end, so its first PCM is the whole request). Whatever cannot be
imported or loaded is reported as unavailable, with the reason, per group of lines.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from devtools.bench_gpu.lm import lm_workload
from devtools.bench_gpu.spec import (
    CAPTION, DIT_STAGES, DIT_THROUGHPUT, END_TO_END, FIRST_PCM, LM, LYRICS, MEMORY, METADATA, BenchSpec, Line,
    SectionResult, as_float, memory_metric, peak_host_rss_gib, reason_of, section_main, stage_workload,
)
from devtools.bench_gpu.reference_checkout import REVISION_FILE

MODEL_CODE_FILES = ("configuration_acestep_v15.py", "modeling_acestep_v15_turbo.py")
REFERENCE_DIT_DIR = "acestep-v15-turbo"
REFERENCE_LM_DIR = "acestep-5Hz-lm-1.7B"   # its default LM, one of the components it requires
COMPONENTS = {"vae": "vae", "Qwen3-Embedding-0.6B": "Qwen3-Embedding-0.6B"}
CODE_PATTERN = re.compile(r"<\|audio_code_\d+\|>")


class Unavailable(Exception):
    """The reference cannot run this part; the message says why."""


def _link(path: Path, target: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def find_model_code(spec: BenchSpec, checkout: Path) -> dict[str, Path]:
    """The reference DiT's modeling files: from ``spec.reference_model_code``, else the checkout."""
    folders = [Path(spec.reference_model_code)] if spec.reference_model_code else []
    found: dict[str, Path] = {}
    for name in MODEL_CODE_FILES:
        candidates = [folder / name for folder in folders if (folder / name).is_file()]
        candidates += sorted((checkout / "acestep").rglob(name))
        if candidates:
            found[name] = candidates[0]
    return found


def prepare_view(spec: BenchSpec, checkout: Path) -> str:
    """Link ``<checkout>/checkpoints`` to a view of our checkpoints; returns why the DiT cannot load ("" if it can)."""
    view = checkout.parent / f"checkpoints-{spec.size}"
    view.mkdir(parents=True, exist_ok=True)
    root = Path(spec.checkpoints)
    for name, ours in COMPONENTS.items():
        _link(view / name, root / ours)
    _link(view / REFERENCE_LM_DIR, root / spec.lm_model)
    dit = view / REFERENCE_DIT_DIR
    if dit.is_symlink():
        dit.unlink()
    dit.mkdir(exist_ok=True)
    for item in (root / spec.dit_model).iterdir():
        _link(dit / item.name, item)
    code = find_model_code(spec, checkout)
    for name, path in code.items():
        _link(dit / name, path)
    _link(checkout / "checkpoints", view)
    missing = [name for name in MODEL_CODE_FILES if name not in code]
    if missing:
        return (f"the reference's DiT code ({', '.join(missing)}) is neither in the checkout nor in "
                "--reference-model-code; it ships with the published checkpoint")
    return ""


def _sync(spec: BenchSpec) -> Callable[[], None]:
    return torch.cuda.synchronize if spec.is_cuda else (lambda: None)


def _time_calls(owner: Any, names: tuple[str, ...], seconds: dict[str, float], sync: Callable[[], None]) -> None:
    """Wrap ``owner``'s methods so that each call's device-synchronised seconds add to ``seconds[name]``."""
    for name in names:
        method = getattr(owner, name, None)
        if method is None:
            continue

        def timed(*args, _method=method, _name=name, **kwargs):
            sync()
            started = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                sync()
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)


def _load_dit(spec: BenchSpec, checkout: Path, code_reason: str):
    if code_reason:
        raise Unavailable(code_reason)
    from acestep.handler import AceStepHandler

    handler = AceStepHandler()
    message, ok = handler.initialize_service(str(checkout), REFERENCE_DIT_DIR, device=spec.device,
                                             use_flash_attention=False, compile_model=False, offload_to_cpu=False)
    if not ok:
        raise Unavailable(f"initialize_service failed: {_plain(message)}")
    return handler


def _plain(message: str) -> str:
    lines = [line for line in str(message).splitlines() if line.strip()]
    text = " | ".join(lines[:1] + lines[-1:]) if lines else "no message"
    return text.encode("ascii", "ignore").decode().strip()


def _dit_batch(handler: Any, seconds: dict[str, float], sync, duration_s: float, batch: int) -> dict[str, Any]:
    seconds.clear()
    sync()
    started = time.perf_counter()
    out = handler.generate_music(captions=CAPTION, lyrics=LYRICS, bpm=METADATA["bpm"], key_scale=METADATA["keyscale"],
                                 time_signature=METADATA["timesignature"], vocal_language=METADATA["language"],
                                 inference_steps=8, use_random_seed=False, seed=0, audio_duration=duration_s,
                                 batch_size=batch, task_type="text2music", use_tiled_decode=True)
    sync()
    wall_s = time.perf_counter() - started
    if not out.get("success", False):
        raise RuntimeError(f"generate_music failed: {_plain(out.get('error') or out.get('status_message'))}")
    return {"wall_s": wall_s, "costs": dict(out.get("extra_outputs", {}).get("time_costs", {})), **seconds}


def _run_dit(spec: BenchSpec, handler: Any, result: SectionResult) -> None:
    sync, seconds = _sync(spec), {}
    _time_calls(handler, ("infer_text_embeddings", "infer_lyric_embeddings", "service_generate", "tiled_decode"),
                seconds, sync)
    _dit_batch(handler, seconds, sync, min(spec.durations_s), 1)  # warm-up
    for duration_s in spec.durations_s:
        rates: dict[int, float] = {}
        for batch in spec.batches:
            timing = _dit_batch(handler, seconds, sync, duration_s, batch)
            text_s = timing.get("infer_text_embeddings", 0.0) + timing.get("infer_lyric_embeddings", 0.0)
            diffusion_s = as_float(timing["costs"].get("diffusion_time_cost"))
            service_s = timing.get("service_generate")
            decode_s = timing.get("tiled_decode", as_float(timing["costs"].get("vae_decode_time_cost")))
            condition_s = service_s - text_s - diffusion_s if service_s and diffusion_s is not None else None
            workload = stage_workload(duration_s, batch)
            for metric, value in (("text encode s", text_s or None), ("condition encoders s", condition_s),
                                  ("diffusion s", diffusion_s), ("VAE decode s", decode_s), ("total s", timing["wall_s"])):
                result.put(Line(DIT_STAGES, workload, metric, reference=value))
            rates[batch] = batch / timing["wall_s"]
            result.put(Line(DIT_THROUGHPUT, workload, "items/s", reference=rates[batch]))
        low, high = min(spec.batches), max(spec.batches)
        if high != low:
            result.put(Line(DIT_THROUGHPUT, f"{duration_s:g} s song", f"batch {high} / batch {low} items/s x",
                                     reference=rates[high] / rates[low]))


def _load_lm(spec: BenchSpec, checkout: Path):
    from acestep.llm_inference import LLMHandler

    handler = LLMHandler()
    backend = "vllm" if spec.is_cuda else "pt"
    message, ok = handler.initialize(str(checkout / "checkpoints"), REFERENCE_LM_DIR, backend=backend, device=spec.device)
    if not ok:
        raise Unavailable(f"LLMHandler.initialize failed: {_plain(message)}")
    return handler, _plain(message)


def _plan_codes(handler: Any, spec: BenchSpec, concurrency: int, cfg_scale: float) -> int:
    metadata = {"bpm": str(METADATA["bpm"]), "keyscale": METADATA["keyscale"],
                "timesignature": METADATA["timesignature"], "duration": str(spec.lm_codes // 5)}
    out = handler.generate_with_stop_condition(
        caption=CAPTION, lyrics=LYRICS, infer_type="llm_dit", temperature=0.85, cfg_scale=cfg_scale,
        target_duration=spec.lm_codes / 5, user_metadata=metadata, use_cot_caption=False, use_cot_language=False,
        batch_size=concurrency if concurrency > 1 else None, seeds=list(range(concurrency)))
    if not out.get("success", True):
        raise RuntimeError(f"generate_with_stop_condition failed: {_plain(out.get('error'))}")
    codes = out.get("audio_codes", "")
    return sum(len(CODE_PATTERN.findall(text or "")) for text in (codes if isinstance(codes, list) else [codes]))


def _run_lm(spec: BenchSpec, handler: Any, result: SectionResult) -> None:
    _plan_codes(handler, spec, 1, 1.0)  # warm-up
    concurrencies = spec.reference_lm_concurrency or spec.lm_concurrency
    rates: dict[tuple[float, int], float] = {}
    for concurrency in concurrencies:
        for cfg_scale in spec.lm_cfg_scales:
            started = time.perf_counter()
            num_codes = _plan_codes(handler, spec, concurrency, cfg_scale)
            rates[cfg_scale, concurrency] = num_codes / (time.perf_counter() - started)
            result.put(Line(LM, lm_workload(concurrency, cfg_scale, spec.lm_codes), "codes/s",
                            reference=rates[cfg_scale, concurrency]))
    low, high = min(concurrencies), max(concurrencies)
    for cfg_scale in spec.lm_cfg_scales:
        if high != low:
            guidance = f"CFG {cfg_scale:g}" if cfg_scale > 1.0 else "no CFG"
            result.put(Line(LM, f"{guidance}, {spec.lm_codes} codes each", f"{high} vs {low} concurrent codes/s x",
                            reference=rates[cfg_scale, high] / rates[cfg_scale, low]))


def _run_end_to_end(spec: BenchSpec, dit: Any, lm: Any, result: SectionResult) -> None:
    from acestep.inference import GenerationConfig, GenerationParams, generate_music

    params = GenerationParams(caption=CAPTION, lyrics=LYRICS, duration=spec.stack_duration_s, bpm=METADATA["bpm"],
                              keyscale=METADATA["keyscale"], timesignature=METADATA["timesignature"],
                              vocal_language=METADATA["language"], thinking=True, use_cot_caption=False,
                              use_cot_language=False, inference_steps=8)
    save_dir = tempfile.mkdtemp(prefix="acestep-bench-reference-", dir=spec.work_dir or None)
    walls: list[float] = []
    for seed in range(spec.reference_requests + 1):  # the first one warms up
        config = GenerationConfig(batch_size=1, use_random_seed=False, seeds=[seed], audio_format="wav")
        started = time.perf_counter()
        out = generate_music(dit, lm, params, config, save_dir=save_dir)
        walls.append(time.perf_counter() - started)
        if not getattr(out, "success", False):
            raise RuntimeError(f"generate_music failed: {_plain(getattr(out, 'error', '') or '')}")
    result.put(Line(FIRST_PCM, f"{spec.stack_duration_s:g} s song, 1 full request", "first PCM chunk s",
                             reference=walls[1], note="the reference returns audio only when the request is done"))
    timed = walls[1:]
    result.put(Line(END_TO_END, f"{spec.stack_requests} concurrent requests, {spec.stack_duration_s:g} s songs",
                             "songs/min", reference=60.0 * len(timed) / sum(timed),
                             note=f"reference: {len(timed)} requests one after another (one worker)"))


def _attempt(result: SectionResult, groups: tuple[str, ...], part: Callable[[], Any]) -> Any:
    """Run ``part``; on any failure mark ``groups`` unavailable with the reason and return None."""
    try:
        return part()
    except Exception as error:  # the reference's own failures become table notes, never a crash of the bench
        for group in groups:
            result.unavailable.setdefault(group, reason_of(error))
        result.flush()
        return None


def run(spec: BenchSpec, result: SectionResult) -> None:
    checkout = Path(spec.reference_dir).resolve()
    if not (checkout / "acestep").is_dir():
        reason = f"no checkout at {spec.reference_dir} (make reference-checkout REFERENCE_SRC=<git dir or URL>)"
        result.unavailable = {group: reason for group in (DIT_STAGES, DIT_THROUGHPUT, LM, FIRST_PCM, END_TO_END, MEMORY)}
        return
    revision = (checkout / REVISION_FILE).read_text(encoding="utf-8").strip() if (checkout / REVISION_FILE).is_file() else "?"
    result.notes.append(f"reference: ace-step/ACE-Step-1.5 at {revision[:12]} from {spec.reference_dir}")
    code_reason = prepare_view(spec, checkout)
    sys.path.insert(0, str(checkout))
    dit = _attempt(result, (DIT_STAGES, DIT_THROUGHPUT, FIRST_PCM, END_TO_END), lambda: _load_dit(spec, checkout, code_reason))
    if dit is not None:
        _attempt(result, (DIT_STAGES, DIT_THROUGHPUT), lambda: _run_dit(spec, dit, result))
    loaded = _attempt(result, (LM, FIRST_PCM, END_TO_END), lambda: _load_lm(spec, checkout))
    lm = loaded[0] if loaded else None
    if lm is not None:
        result.notes.append(f"reference LM: {loaded[1]}")
        _attempt(result, (LM,), lambda: _run_lm(spec, lm, result))
    if dit is not None and lm is not None:
        _attempt(result, (FIRST_PCM, END_TO_END), lambda: _run_end_to_end(spec, dit, lm, result))
    if dit is None and lm is None:
        result.unavailable.setdefault(MEMORY, "neither the reference's DiT nor its LM loaded")
    else:
        peak = torch.cuda.max_memory_allocated() / 2**30 if spec.is_cuda else peak_host_rss_gib()
        held = "DiT + LM" if dit is not None and lm is not None else ("DiT service" if dit is not None else "LM service")
        result.put(Line(MEMORY, f"{held} (in process)", memory_metric(spec.is_cuda), reference=peak))


if __name__ == "__main__":
    raise SystemExit(section_main(run))
