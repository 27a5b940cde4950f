"""LM generation part of the conformance runner: every case of ``VECTOR_DIR/lm/`` on each backend.

A case is a reference call (``generate_with_stop_condition``, ``generate_from_formatted_prompt``,
``understand_audio_from_codes``, ``create_sample_from_query``, ``format_sample_from_input``) on the
tiny LM of ``lm/checkpoint``. We make the same call through our own code (``Planner``, ``LmTasks``,
or the prompt builders + ``LmRuntime`` for the one-phase calls) on a real engine, record every
engine call the runtime makes, and compare what the case's ``compare`` list names: prompt strings
and ids (conditional and unconditional), generated ids and their decoded text per phase, and the
parsed result. Where a case has an alternate for the later upstream revision
(``case.rev_8b0d17d.json``), that is the target (our codes-phase prompt follows it), and generated
ids are compared over the phase's ``reliable_prefix`` only. One ``CaseResult`` per case and
backend, named ``lm:<backend>:<case>``; the first difference is its detail.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.results import CaseResult
from lm_service.constraints.spec import ConstraintSpec
from lm_service.cot import format_metadata_as_cot
from lm_service.output_parser import extract_lyrics, parse_lm_output
from lm_service.plan import PlanCodes, PlanInput, PlanMetadata, Planner, max_new_tokens
from lm_service.prompts import (
    codes_prompt,
    codes_unconditional_prompt,
    cot_prompt,
    cot_unconditional_prompt,
    default_chat_template,
)
from lm_service.runtime import LmCall, LmRuntime, SamplingInput
from lm_service.tasks import LmTasks
from shared.types import CreateSampleParams, FormatSampleParams, GenerationParams, MusicMetadata, UnderstandParams

BACKENDS = ("transformers", "vllm")
LATER_REVISION = "rev_8b0d17d"
MAX_MODEL_LEN = 4096

Case = Mapping[str, Any]


class Mismatch(Exception):
    """The first difference between a case and our run."""


@dataclass
class _Run:
    """What our code did for one case: the engine calls in phase order and the entry point's result."""

    calls: list[LmCall]
    result: dict[str, Any]


def run_lm_cases(vector_dir: Path, backends: Sequence[str] = BACKENDS) -> list[CaseResult]:
    """One result per case of ``vector_dir/lm/manifest.json`` and backend; never raises on bad vectors."""
    lm_dir = vector_dir / "lm"
    try:
        manifest = json.loads((lm_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return [CaseResult("lm:manifest.json", False, detail=f"cannot read: {error}")]
    results: list[CaseResult] = []
    for backend in backends:
        results.extend(asyncio.run(_run_backend(lm_dir, manifest, backend)))
    return results


async def _run_backend(lm_dir: Path, manifest: Mapping[str, Any], backend: str) -> list[CaseResult]:
    settings = manifest.get("reference_configuration", {})
    # The reference's GPU tier fixes the FSM's duration range; the vocabulary loader reads it
    # (in vLLM's worker process too, which inherits the environment).
    os.environ["ACESTEP_LM_MAX_DURATION_S"] = str(int(settings.get("max_duration_with_lm", 600)))
    os.environ.pop("ACESTEP_LM_GENRES_VOCAB", None)
    try:
        runtime, engine = await _start(lm_dir / "checkpoint", backend)
    except Exception as error:  # a broken backend fails its cases, it does not stop the runner
        names = [case["name"] for case in manifest.get("cases", [])]
        detail = f"engine did not start: {type(error).__name__}: {error}"
        return [CaseResult(f"lm:{backend}:{name}", False, detail=detail) for name in names]
    results = []
    try:
        for entry in manifest.get("cases", []):
            results.append(await _check_case(lm_dir, entry, runtime, backend))
    finally:
        await engine.shutdown()
    return results


async def _start(checkpoint: Path, backend: str):
    from transformers import AutoTokenizer

    from lm_service.engine.config import LmEngineConfig

    config = LmEngineConfig(model_dir=checkpoint, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                            kv_cache_gib=1.0, enforce_eager=True, device="cpu")
    if backend == "vllm":
        from lm_service.engine.vllm_engine import VllmLmEngine

        engine = VllmLmEngine(config)
    else:
        from lm_service.engine.hf_backend import HfLmEngine

        engine = HfLmEngine(config)
    await engine.start()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    runtime = LmRuntime(engine, tokenizer, tokenizer.chat_template or default_chat_template(), MAX_MODEL_LEN)
    return runtime, engine


async def _check_case(lm_dir: Path, entry: Mapping[str, Any], runtime: LmRuntime, backend: str) -> CaseResult:
    name = str(entry.get("name", "?"))
    label = f"lm:{backend}:{name}"
    try:
        case, revision = _load_case(lm_dir / "cases" / name)
        calls: list[LmCall] = []
        runtime.observers.append(calls.append)
        try:
            result = await _run_call(case, runtime, calls)
        finally:
            runtime.observers.remove(calls.append)
        _compare(case, _Run(sorted(calls, key=_phase_order), result), runtime)
    except Mismatch as difference:
        return CaseResult(label, False, detail=str(difference))
    except Exception as error:  # noqa: BLE001 - a crash in one case is that case's failure
        return CaseResult(label, False, detail=f"raised {type(error).__name__}: {error}")
    return CaseResult(label, True, detail=f"{sum(len(p['generated_ids']) for p in case['phases'])} tokens"
                      + (f" ({revision})" if revision else ""))


def _load_case(folder: Path) -> tuple[dict[str, Any], str]:
    later = folder / f"case.{LATER_REVISION}.json"
    if later.exists():
        return json.loads(later.read_text(encoding="utf-8")), LATER_REVISION
    return json.loads((folder / "case.json").read_text(encoding="utf-8")), ""


def _phase_order(call: LmCall) -> tuple[int, int]:
    """Phase 1 first, then the code items by index (they run concurrently)."""
    request_id = call.request.request_id
    if ":codes:" in request_id:
        return 1, int(request_id.rsplit(":", 1)[1])
    return 0, 0


# ---------------------------------------------------------------------------------------------------
# Making the reference's call through our code


async def _run_call(case: Case, runtime: LmRuntime, calls: list[LmCall]) -> dict[str, Any]:
    entry_point = str(case["entry_point"]).rsplit(".", 1)[-1]
    call = case["call"]
    if entry_point == "generate_with_stop_condition":
        return await _plan(call, runtime)
    if entry_point == "generate_from_formatted_prompt":
        return await _one_phase(call, runtime)
    tasks = LmTasks(runtime)
    sampling = dict(temperature=call["temperature"], top_k=call.get("top_k") or 0, top_p=call.get("top_p") or 1.0,
                    repetition_penalty=call.get("repetition_penalty", 1.0),
                    use_constrained_decoding=call["use_constrained_decoding"])
    if entry_point == "understand_audio_from_codes":
        got = await tasks.understand(f"conformance:{uuid.uuid4().hex}", UnderstandParams(audio_codes=call["audio_codes"], **sampling))
        return {"metadata": _task_metadata(got, calls)}
    if entry_point == "create_sample_from_query":
        params = CreateSampleParams(query=call["query"], instrumental=bool(call["instrumental"]),
                                    vocal_language=call.get("vocal_language") or "unknown", **sampling)
        got = await tasks.create_sample(f"conformance:{uuid.uuid4().hex}", params)
        return {"metadata": {**_task_metadata(got, calls), "instrumental": got.instrumental}}
    if entry_point == "format_sample_from_input":
        user = call.get("user_metadata") or {}
        given = MusicMetadata(bpm=user.get("bpm"), duration=user.get("duration"), keyscale=user.get("keyscale", ""),
                              timesignature=str(user.get("timesignature", "")), language=user.get("language", ""))
        params = FormatSampleParams(caption=call["caption"], lyrics=call["lyrics"], user_metadata=given, **sampling)
        await tasks.format_sample(f"conformance:{uuid.uuid4().hex}", params)
        # Our FormatSampleResult also reports the user's constrained values (as the document says);
        # the reference handler returns what the LM's text holds, so compare that, parsed by our code.
        return {"metadata": _handler_metadata(calls[-1].output.text, params.lyrics)}
    raise Mismatch(f"no runner for entry point {case['entry_point']!r}")


def _handler_metadata(text: str, default_lyrics: str) -> dict[str, Any]:
    """The metadata dict a reference task handler returns for ``text``: the parsed fields and lyrics."""
    return {**parse_lm_output(text).metadata, "lyrics": extract_lyrics(text) or default_lyrics}


def _task_metadata(result: Any, calls: list[LmCall]) -> dict[str, Any]:
    """A task result as the reference handler's metadata dict: present fields only, plus lyrics.
    Our public results (like the documented ones) carry no genres: those come from the output text."""
    genres = parse_lm_output(calls[-1].output.text).metadata.get("genres") if calls else None
    values = {"bpm": result.bpm, "caption": result.caption, "duration": result.duration, "genres": genres,
              "keyscale": result.keyscale, "language": result.language, "timesignature": result.timesignature,
              "lyrics": result.lyrics}
    if isinstance(values["duration"], float) and values["duration"].is_integer():
        values["duration"] = int(values["duration"])  # our results carry seconds as float
    return {key: value for key, value in values.items() if value not in (None, "")}


async def _plan(call: Mapping[str, Any], runtime: LmRuntime) -> dict[str, Any]:
    user = call.get("user_metadata") or {}
    target = call.get("target_duration")
    duration = target if target is not None and target > 0 else user.get("duration", -1.0)
    params = GenerationParams(
        caption=call["caption"], lyrics=call["lyrics"], bpm=user.get("bpm"), keyscale=user.get("keyscale", ""),
        timesignature=str(user.get("timesignature", "")), duration=float(duration),
        lm_temperature=call["temperature"], lm_cfg_scale=call["cfg_scale"], lm_top_k=call.get("top_k") or 0,
        lm_top_p=call.get("top_p") or 1.0, lm_negative_prompt=call["negative_prompt"],
        use_cot_metas=call["use_cot_metas"], use_cot_caption=call["use_cot_caption"],
        use_cot_language=call["use_cot_language"], use_constrained_decoding=call["use_constrained_decoding"])
    batch = int(call.get("batch_size") or 1)
    seeds = tuple(call.get("seeds") or [0] * batch)
    plan = PlanInput(request_id=f"conformance:{uuid.uuid4().hex}", params=params, seeds=seeds, need_codes=call["infer_type"] == "llm_dit",
                     repetition_penalty=call.get("repetition_penalty", 1.0))
    metadata: dict[str, Any] = {}
    codes: dict[int, list[int]] = {}
    async for event in Planner(runtime).plan(plan):
        if isinstance(event, PlanMetadata):
            metadata = event.values
        elif isinstance(event, PlanCodes):
            codes[event.item_index] = list(event.codes)
    values = [codes.get(i, []) for i in range(batch)]
    if batch > 1:
        return {"metadata": [metadata] * batch, "audio_code_values": values}
    return {"metadata": metadata, "audio_code_values": values[0]}


async def _one_phase(call: Mapping[str, Any], runtime: LmRuntime) -> dict[str, Any]:
    cfg = call["cfg"]
    phase = cfg.get("generation_phase", "cot")
    target = cfg.get("target_duration")
    result: dict[str, Any] = {}
    if call["builder"] == "build_formatted_prompt_with_cot":
        cot_text = format_metadata_as_cot(call["metadata"])
        prompt = codes_prompt(call["caption"], call["lyrics"], cot_text)
        uncond = codes_unconditional_prompt(call["caption"], call["lyrics"], cfg["negative_prompt"])
        result["cot_text"] = cot_text
    else:
        prompt = cot_prompt(call["caption"], call["lyrics"])
        uncond = cot_unconditional_prompt(call["lyrics"], cfg["negative_prompt"])
    spec = None
    if call["use_constrained_decoding"]:
        spec = ConstraintSpec(
            phase=phase, stop_at_reasoning=bool(call.get("stop_at_reasoning", False)),
            skip_genres=cfg.get("skip_genres", True), skip_caption=cfg.get("skip_caption", False),
            skip_language=cfg.get("skip_language", False), user_metadata=cfg.get("user_metadata") or {},
            target_codes=int(target * 5) if phase == "codes" and target else None)
    sampling = SamplingInput(temperature=cfg["temperature"], top_k=cfg.get("top_k") or 0,
                             top_p=cfg.get("top_p") or 1.0, repetition_penalty=cfg.get("repetition_penalty", 1.0),
                             cfg_scale=cfg["cfg_scale"], seed=0)
    request = runtime.request(prompt, spec, sampling, max_new_tokens(target, phase, runtime.max_model_len), uncond,
                              request_id=f"conformance:{uuid.uuid4().hex}")
    output = await runtime.run(request)  # the observer records it
    parsed = parse_lm_output(output.text)
    result.update(output_text=output.text, parse_lm_output={"metadata": parsed.metadata,
                                                            "audio_codes": parsed.audio_codes},
                  audio_code_values=runtime.codes_of(output.token_ids))
    return result


# ---------------------------------------------------------------------------------------------------
# Comparing


def _compare(case: Case, run: _Run, runtime: LmRuntime) -> None:
    phases = case["phases"]
    if len(run.calls) != len(phases):
        raise Mismatch(f"{len(phases)} LM phases expected, our code ran {len(run.calls)}")
    for index, (phase, call) in enumerate(zip(phases, run.calls)):
        where = f"phase {index} ({phase['phase']})"
        _same(f"{where} prompt", phase["prompt"], call.prompt)
        _same(f"{where} prompt_ids", phase["prompt_ids"], list(call.request.prompt_token_ids))
        if phase.get("uncond_prompt"):
            _same(f"{where} uncond_prompt", phase["uncond_prompt"], call.uncond_prompt)
            _same(f"{where} uncond_prompt_ids", phase["uncond_prompt_ids"],
                  list(call.request.uncond_prompt_token_ids or ()))
        elif call.uncond_prompt is not None:
            raise Mismatch(f"{where}: ran with guidance, the reference did not")
        prefix = _reliable_prefix(case, index, len(phase["generated_ids"]))
        _same_ids(where, phase["generated_ids"], list(call.output.token_ids), prefix, runtime)
        if prefix == len(phase["generated_ids"]):
            _same(f"{where} generated_text", phase["generated_text"], call.output.text)
    if all(_reliable_prefix(case, i, len(p["generated_ids"])) == len(p["generated_ids"])
           for i, p in enumerate(phases)):
        _compare_result(case["result"], run.result)


def _reliable_prefix(case: Case, index: int, length: int) -> int:
    if "revision" not in case:
        return length
    robustness = case.get("robustness") or []
    if index < len(robustness) and robustness[index].get("reliable_prefix") is not None:
        return min(length, int(robustness[index]["reliable_prefix"]))
    return length


def _compare_result(expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    if "cot_text" in got:
        _same("result.built.cot_text", expected["built"]["cot_text"], got["cot_text"])
    for key in ("output_text", "parse_lm_output", "audio_code_values", "metadata"):
        if key in expected:
            _same(f"result.{key}", expected[key], got.get(key))


def _same(what: str, expected: Any, got: Any) -> None:
    if json.dumps(expected, sort_keys=True, ensure_ascii=False) != json.dumps(got, sort_keys=True, ensure_ascii=False):
        raise Mismatch(f"{what}: expected {_short(expected)}, got {_short(got)}")


def _same_ids(where: str, expected: list[int], got: list[int], prefix: int, runtime: LmRuntime) -> None:
    want, have = expected[:prefix], got[:prefix]
    for step, (a, b) in enumerate(zip(want, have)):
        if a != b:
            raise Mismatch(f"{where} step {step}: expected id {a} {_token(runtime, a)}, got {b} {_token(runtime, b)}")
    if len(have) < len(want):
        raise Mismatch(f"{where}: expected {len(want)} generated ids, ours stopped after {len(have)}")
    if prefix == len(expected) and len(got) != len(expected):
        extra = got[len(expected)]
        raise Mismatch(f"{where} step {len(expected)}: expected the end, got id {extra} {_token(runtime, extra)}")


def _token(runtime: LmRuntime, token_id: int) -> str:
    return repr(runtime.tokenizer.decode([token_id], skip_special_tokens=False))


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

