"""Prompt part of the conformance runner: every vector of ``prompts.json`` against our builders.

Each entry of a vector section names the reference helper it was produced by (``"function"``),
its arguments and the strings / values it returned. We call our equivalent and compare byte for
byte; one ``CaseResult`` per entry, named ``prompt:<section>:<index>:<kind>``. The codes-phase
layout follows the section: ``lm`` holds the legacy layout, ``lm_upstream_*`` the
training-aligned one. Top-level strings and dicts are notes; an unknown list section is reported
as a failed case, as is an entry whose helper we do not know or whose check raised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dit_service import prompts as dit
from lm_service import prompts as lm
from lm_service.cot import format_metadata_as_cot
from lm_service.output_parser import parse_audio_code_string, parse_lm_output
from conformance.results import CaseResult

PROMPTS_FILE = "prompts.json"
_KNOWN_SECTIONS = ("dit", "metas", "lyrics", "lm", "lm_misc")
_UPSTREAM_PREFIX = "lm_upstream"

Entry = Mapping[str, Any]
Check = tuple[str, Any, Any]  # (field, expected, got)
Handler = Callable[[Entry, "_Context"], tuple[str, list[Check]]]


@dataclass(frozen=True)
class _Context:
    """What a handler needs besides its entry: the section's codes layout and the chat template."""

    layout: lm.CodesLayout
    chat_template: str


def run_prompt_cases(vector_dir: Path) -> list[CaseResult]:
    """One result per vector entry of ``vector_dir/prompts.json``; never raises on bad vectors."""
    try:
        vectors = json.loads((vector_dir / PROMPTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return [CaseResult(f"prompt:{PROMPTS_FILE}", False, detail=f"cannot read: {error}")]
    if not isinstance(vectors, dict):
        return [CaseResult(f"prompt:{PROMPTS_FILE}", False, detail="top level is not an object of sections")]
    chat_template = lm.default_chat_template()
    results: list[CaseResult] = []
    for section, entries in vectors.items():
        if not isinstance(entries, list):
            continue  # notes and cross-revision remarks
        if not _is_known_section(section):
            detail = f"unknown section, {len(entries)} entries not checked"
            results.append(CaseResult(f"prompt:{section}", False, detail=detail))
            continue
        context = _Context(_section_layout(section), chat_template)
        results.extend(_run_entry(section, index, entry, context) for index, entry in enumerate(entries))
    return results


def _is_known_section(section: str) -> bool:
    return section in _KNOWN_SECTIONS or section.startswith(_UPSTREAM_PREFIX)


def _section_layout(section: str) -> lm.CodesLayout:
    return lm.CodesLayout.LEGACY if section == "lm" else lm.CodesLayout.TRAINING_ALIGNED


def _run_entry(section: str, index: int, entry: Entry, context: _Context) -> CaseResult:
    name = f"prompt:{section}:{index}"
    if not isinstance(entry, Mapping):
        return CaseResult(name, False, detail=f"entry is a {type(entry).__name__}, not an object")
    function = _method_name(str(entry.get("function", "")))
    handler = _HANDLERS.get(function)
    if handler is None:
        return CaseResult(name, False, detail=f"no check for reference helper {function!r}")
    try:
        kind, checks = handler(entry, context)
    except Exception as error:  # a malformed vector or a bug must fail this case, not the run
        return CaseResult(f"{name}:{function}", False, detail=f"{type(error).__name__}: {error}")
    name = f"{name}:{kind}"
    for field, expected, got in checks:
        mismatch = _mismatch(expected, got)
        if mismatch:
            return CaseResult(name, False, detail=f"{field}: {mismatch}")
    return CaseResult(name, True)


def _method_name(function: str) -> str:
    """``"MetadataMixin._parse_metas([d])[0] (…)"`` → ``"_parse_metas"``."""
    match = re.match(r"\s*([\w.]+)", function)
    return match.group(1).rsplit(".", 1)[-1] if match else ""


def _mismatch(expected: Any, got: Any) -> str:
    """Empty when equal (strings byte for byte, other values as strictly typed JSON), else a hint."""
    if isinstance(expected, str) and isinstance(got, str):
        return "" if expected == got else _string_diff(expected, got)
    expected_json, got_json = _canonical(expected), _canonical(got)
    if expected_json == got_json:
        return ""
    return f"expected {_clip(expected_json)}, got {_clip(got_json)}"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)


def _string_diff(expected: str, got: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    start = max(0, at - 20)
    return (
        f"differs at char {at} (len expected {len(expected)}, got {len(got)}): "
        f"expected {expected[start:at + 30]!r}, got {got[start:at + 30]!r}"
    )


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _dit_text_checks(entry: Entry, prompts: dit.DitPrompts) -> list[Check]:
    checks: list[Check] = [
        ("text_prompt", entry["text_prompt"], prompts.text_prompt),
        ("lyrics_prompt", entry["lyrics_prompt"], prompts.lyrics_prompt),
    ]
    optional = {
        "text_tokenizer_kwargs": dict(dit.TEXT_TOKENIZER_KWARGS),
        "lyrics_tokenizer_kwargs": dict(dit.LYRICS_TOKENIZER_KWARGS),
        "text_inputs_joined": prompts.joined,
        "non_cover_text_prompt": prompts.non_cover_text_prompt,
    }
    checks.extend((field, entry[field], got) for field, got in optional.items() if field in entry)
    return checks


def _conditioning_text(args: Mapping[str, Any], instruction: str) -> dit.ConditioningText:
    return dit.ConditioningText(instruction, args["caption"], args["lyrics"], args["vocal_language"], args.get("metas"))


def _check_task_prompt(entry: Entry, _: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    instruction = dit.task_instruction(
        args["task_type"], args.get("track_name"), args.get("complete_track_classes")
    )
    text = _conditioning_text(args, instruction)
    checks = [("instruction", entry["instruction"], instruction)] + _dit_text_checks(entry, dit.dit_prompts(text))
    parts = [args["task_type"], args.get("track_name"), *(args.get("complete_track_classes") or [])]
    return "dit_" + "_".join(part for part in parts if part), checks


def _check_text_conditioning(entry: Entry, _: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    text = _conditioning_text(args, args["instruction"])
    prompts = dit.dit_prompts(text, float(args.get("audio_cover_strength", 1.0)))
    return "dit_cover_strength", _dit_text_checks(entry, prompts)


def _check_build_dit_inputs(entry: Entry, _: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    caption_input, lyrics_input = dit.build_dit_inputs(
        args.get("instruction"), args["caption"], args["lyrics"], args.get("metas"), args["vocal_language"]
    )
    checks = [
        ("caption_input", entry["caption_input"], caption_input),
        ("lyrics_input", entry["lyrics_input"], lyrics_input),
    ]
    return f"build_dit_inputs_{args.get('task', '')}".rstrip("_"), checks


def _check_prepare_batch_data(entry: Entry, _: _Context) -> tuple[str, list[Check]]:
    args, expected = entry["args"], entry["output"]
    batch_size = int(args.get("actual_batch_size", len(expected["captions_batch"])))
    duration_s = dit.metas_duration_s(args.get("audio_duration"))
    metas = dit.build_metas_dict(args.get("bpm"), args.get("key_scale"), args.get("time_signature"), duration_s)
    instruction = args.get("instruction") or dit.DEFAULT_DIT_INSTRUCTION
    request = dit.ConditioningText(instruction, args["captions"], args["lyrics"], args["vocal_language"], metas)
    items = dit.prepare_batch_data(batch_size, request)
    got = {
        "captions_batch": [item.caption for item in items],
        "instructions_batch": [item.instruction for item in items],
        "lyrics_batch": [item.lyrics for item in items],
        "vocal_languages_batch": [item.vocal_language for item in items],
        "metas_batch": [item.metas for item in items],
    }
    return "prepare_batch_data", [(field, expected[field], got[field]) for field in expected]


def _check_metas_from_fields(entry: Entry, _: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    metas = dit.build_metas_dict(args["bpm"], args["key_scale"], args["time_signature"], args.get("duration"))
    return "metas_from_fields", [("dict", entry["dict"], metas), ("output", entry["output"], dit.metas_string(metas))]


def _check_metas_string(entry: Entry, _: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    kind = "metas_default" if args is None else "metas_from_dict"
    return kind, [("output", entry["output"], dit.metas_string(args))]


def _check_lyrics(entry: Entry, _: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    got = dit.lyrics_prompt(args["lyrics"], args["language"])
    return f"lyrics_{args['language']}", [("output", entry["output"], got)]


def _chat_checks(entry: Entry, prompt: lm.ChatPrompt, context: _Context) -> list[Check]:
    return [
        ("messages", entry["messages"], prompt.message_dicts()),
        ("add_generation_prompt", entry["add_generation_prompt"], prompt.add_generation_prompt),
        ("rendered", entry["rendered"], prompt.render(context.chat_template)),
    ]


def _negative(args: Mapping[str, Any]) -> tuple[bool, str]:
    return bool(args.get("is_negative_prompt", False)), args.get("negative_prompt", lm.NO_USER_INPUT)


def _check_cot_phase(entry: Entry, context: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    is_negative, negative_prompt = _negative(args)
    if not is_negative:
        return "cot_phase", _chat_checks(entry, lm.cot_prompt(args["caption"], args.get("lyrics", "")), context)
    phase = args.get("generation_phase", "cot")
    if phase != "cot":
        raise ValueError(f"no unconditional prompt for generation_phase {phase!r} (unused reference branch)")
    kind = "cot_phase_uncond" + ("_negative" if lm.has_meaningful_negative_prompt(negative_prompt) else "")
    return kind, _chat_checks(entry, lm.cot_unconditional_prompt(args.get("lyrics", ""), negative_prompt), context)


def _check_codes_phase(entry: Entry, context: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    is_negative, negative_prompt = _negative(args)
    if is_negative:
        prompt = lm.codes_unconditional_prompt(args["caption"], args["lyrics"], negative_prompt, context.layout)
    else:
        prompt = lm.codes_prompt(args["caption"], args["lyrics"], args["cot_text"], context.layout)
    kind = f"codes_phase{'_uncond' if is_negative else ''}_{context.layout.value}"
    return kind, _chat_checks(entry, prompt, context)


def _check_understand(entry: Entry, context: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    is_negative, negative_prompt = _negative(args)
    if is_negative:
        prompt = lm.unconditional_task_prompt(lm.UNDERSTAND_INSTRUCTION, negative_prompt)
    else:
        prompt = lm.understand_prompt(args["audio_codes"])
    return f"understand{'_uncond' if is_negative else ''}", _chat_checks(entry, prompt, context)


def _check_create_sample(entry: Entry, context: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    is_negative, negative_prompt = _negative(args)
    is_instrumental = bool(args.get("instrumental", False))
    if is_negative:
        prompt = lm.unconditional_task_prompt(lm.CREATE_SAMPLE_INSTRUCTION, negative_prompt)
    else:
        prompt = lm.create_sample_prompt(args["query"], is_instrumental)
    kind = "create_sample" + ("_instrumental" if is_instrumental else "") + ("_uncond" if is_negative else "")
    return kind, _chat_checks(entry, prompt, context)


def _check_format_sample(entry: Entry, context: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    is_negative, negative_prompt = _negative(args)
    if is_negative:
        prompt = lm.unconditional_task_prompt(lm.FORMAT_SAMPLE_INSTRUCTION, negative_prompt)
    else:
        prompt = lm.format_sample_prompt(args["caption"], args["lyrics"])
    return f"format_sample{'_uncond' if is_negative else ''}", _chat_checks(entry, prompt, context)


def _check_metadata_cot(entry: Entry, _: _Context) -> tuple[str, list[Check]]:
    args = entry["args"]
    kind = "metadata_cot" if args else "metadata_cot_empty"
    return kind, [("output", entry["output"], format_metadata_as_cot(args))]


def _check_parse_lm_output(entry: Entry, _: _Context) -> tuple[str, list[Check]]:
    parsed = parse_lm_output(entry["args"]["output_text"])
    expected = entry["output"]
    return "parse_lm_output", [
        ("metadata", expected["metadata"], parsed.metadata),
        ("audio_codes", expected["audio_codes"], parsed.audio_codes),
    ]


def _check_audio_codes(entry: Entry, _: _Context) -> tuple[str, list[Check]]:
    return "parse_audio_codes", [("output", entry["output"], parse_audio_code_string(entry["args"]["code_str"]))]


_HANDLERS: Mapping[str, Handler] = {
    "generate_instruction": _check_task_prompt,
    "_prepare_text_conditioning_inputs": _check_text_conditioning,
    "build_dit_inputs": _check_build_dit_inputs,
    "prepare_batch_data": _check_prepare_batch_data,
    "_build_metadata_dict": _check_metas_from_fields,
    "_parse_metas": _check_metas_string,
    "_format_lyrics": _check_lyrics,
    "build_formatted_prompt": _check_cot_phase,
    "build_formatted_prompt_with_cot": _check_codes_phase,
    "build_formatted_prompt_for_understanding": _check_understand,
    "build_formatted_prompt_for_inspiration": _check_create_sample,
    "build_formatted_prompt_for_format": _check_format_sample,
    "_format_metadata_as_cot": _check_metadata_cot,
    "parse_lm_output": _check_parse_lm_output,
    "_parse_audio_code_string": _check_audio_codes,
}
