"""DiT prompt strings: byte-exact against the conformance vectors, plus the rules around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dit_service import prompts
from shared.errors import InvalidArgument

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "golden"
VECTORS = json.loads((GOLDEN / "prompts.json").read_text(encoding="utf-8"))


def _entries(section: str, method: str) -> list[dict]:
    return [e for e in VECTORS[section] if e["function"].split("(")[0].endswith("." + method)]


@pytest.mark.parametrize("entry", _entries("dit", "generate_instruction"), ids=lambda e: e["args"]["task_type"])
def test_task_prompts_match_vectors(entry: dict) -> None:
    args = entry["args"]
    instruction = prompts.task_instruction(args["task_type"], args["track_name"], args["complete_track_classes"])
    text = prompts.ConditioningText(instruction, args["caption"], args["lyrics"], args["vocal_language"], args["metas"])
    got = prompts.dit_prompts(text)
    assert instruction == entry["instruction"]
    assert got.text_prompt == entry["text_prompt"]
    assert got.lyrics_prompt == entry["lyrics_prompt"]
    assert got.joined == entry["text_inputs_joined"]
    assert got.non_cover_text_prompt is None
    assert dict(prompts.TEXT_TOKENIZER_KWARGS) == entry["text_tokenizer_kwargs"]
    assert dict(prompts.LYRICS_TOKENIZER_KWARGS) == entry["lyrics_tokenizer_kwargs"]


@pytest.mark.parametrize("entry", _entries("dit", "_prepare_text_conditioning_inputs"))
def test_partial_cover_strength_adds_the_text2music_prompt(entry: dict) -> None:
    args = entry["args"]
    text = prompts.ConditioningText(args["instruction"], args["caption"], args["lyrics"], args["vocal_language"], args["metas"])
    got = prompts.dit_prompts(text, audio_cover_strength=args["audio_cover_strength"])
    assert got.text_prompt == entry["text_prompt"]
    assert got.lyrics_prompt == entry["lyrics_prompt"]
    assert got.non_cover_text_prompt == entry["non_cover_text_prompt"]


@pytest.mark.parametrize("entry", _entries("dit", "build_dit_inputs"), ids=lambda e: e["args"]["task"])
def test_build_dit_inputs_matches_vectors(entry: dict) -> None:
    args = entry["args"]
    got = prompts.build_dit_inputs(args["instruction"], args["caption"], args["lyrics"], args["metas"], args["vocal_language"])
    assert got == (entry["caption_input"], entry["lyrics_input"])


@pytest.mark.parametrize("entry", _entries("dit", "prepare_batch_data"))
def test_prepare_batch_data_matches_vectors(entry: dict) -> None:
    args, expected = entry["args"], entry["output"]
    metas = prompts.build_metas_dict(
        args["bpm"], args["key_scale"], args["time_signature"], prompts.metas_duration_s(args["audio_duration"])
    )
    request = prompts.ConditioningText(caption=args["captions"], lyrics=args["lyrics"], vocal_language=args["vocal_language"], metas=metas)
    items = prompts.prepare_batch_data(len(expected["captions_batch"]), request)
    assert [i.caption for i in items] == expected["captions_batch"]
    assert [i.instruction for i in items] == expected["instructions_batch"]
    assert [i.lyrics for i in items] == expected["lyrics_batch"]
    assert [i.vocal_language for i in items] == expected["vocal_languages_batch"]
    assert [i.metas for i in items] == expected["metas_batch"]


@pytest.mark.parametrize("entry", _entries("metas", "_build_metadata_dict"))
def test_metas_from_request_fields_match_vectors(entry: dict) -> None:
    args = entry["args"]
    metas = prompts.build_metas_dict(args["bpm"], args["key_scale"], args["time_signature"], args["duration"])
    assert metas == entry["dict"]
    assert prompts.metas_string(metas) == entry["output"]


@pytest.mark.parametrize("entry", _entries("metas", "_parse_metas"))
def test_metas_from_dicts_match_vectors(entry: dict) -> None:
    assert prompts.metas_string(entry["args"]) == entry["output"]


@pytest.mark.parametrize("entry", VECTORS["lyrics"], ids=lambda e: e["args"]["language"])
def test_lyrics_prompt_matches_vectors(entry: dict) -> None:
    assert prompts.lyrics_prompt(entry["args"]["lyrics"], entry["args"]["language"]) == entry["output"]


def test_instruction_gets_exactly_one_trailing_colon() -> None:
    assert prompts.format_instruction("Make it brighter") == "Make it brighter:"
    assert prompts.format_instruction("Make it brighter:") == "Make it brighter:"
    assert prompts.caption_prompt("Make it brighter", "c", None).startswith("# Instruction\nMake it brighter:\n\n")


@pytest.mark.parametrize("track", prompts.TRACK_NAMES)
def test_track_tasks_name_the_track_upper_cased(track: str) -> None:
    for task in ("extract", "lego"):
        instruction = prompts.task_instruction(task, track)
        assert f" {track.upper()} track " in instruction
        assert instruction.endswith(":")
        assert instruction != prompts.task_instruction(task)


def test_unknown_or_missing_task_falls_back_to_text2music() -> None:
    text2music = prompts.task_instruction("text2music")
    assert text2music == prompts.DEFAULT_DIT_INSTRUCTION
    assert prompts.task_instruction("remix") == text2music
    assert prompts.task_instruction("") == text2music
    assert prompts.task_instruction("complete", complete_track_classes=[]) == prompts.task_instruction("complete")


def test_value_sets() -> None:
    assert len(prompts.VALID_LANGUAGES) == 51 and len(set(prompts.VALID_LANGUAGES)) == 51
    assert prompts.VALID_LANGUAGES[-1] == "unknown" and "yue" in prompts.VALID_LANGUAGES
    assert len(prompts.TRACK_NAMES) == 12
    assert set(prompts.TASK_TYPES) == {"text2music", "repaint", "cover", "extract", "lego", "complete"}


def test_metas_aliases_and_duration_forms() -> None:
    lines = prompts.metas_string({"time_signature": "3", "scale": "D minor", "length": 61.9}).splitlines()
    assert lines == ["- bpm: N/A", "- timesignature: 3", "- keyscale: D minor", "- duration: 61 seconds"]
    assert prompts.metas_string({"duration": [1]}).endswith("- duration: 30 seconds\n")
    assert prompts.metas_string("- bpm: 1\n") == "- bpm: 1\n"
    assert prompts.metas_string(42) == prompts.DEFAULT_METAS  # type: ignore[arg-type]


def test_caption_extraction_only_applies_to_sft_layout() -> None:
    assert prompts.extract_caption("# Caption\nonly a caption header") == "# Caption\nonly a caption header"
    sft = prompts.caption_prompt("Do it", "  warm pads  ", {"bpm": 90})
    assert prompts.extract_caption(sft) == "warm pads"
    assert prompts.extract_caption("# Instruction\nx\n\n# Caption\nno metas section") == "no metas section"


def test_build_dit_inputs_prefers_lm_caption_and_language() -> None:
    metas = {"bpm": 90, "duration": 45, "caption": "LM caption", "language": "zh"}
    caption_input, lyrics_input = prompts.build_dit_inputs(None, "user caption", "la la", metas, "en")
    assert "# Caption\nLM caption\n\n" in caption_input
    assert caption_input.startswith(f"# Instruction\n{prompts.DEFAULT_DIT_INSTRUCTION}\n")
    assert "- bpm: 90\n" in caption_input and "- duration: 45 seconds\n" in caption_input
    assert lyrics_input.startswith("# Languages\nzh\n")


def test_generation_path_keeps_the_request_caption() -> None:
    text = prompts.ConditioningText(caption="user caption", metas={"caption": "LM caption", "language": "zh"})
    got = prompts.dit_prompts(text)
    assert "# Caption\nuser caption\n\n" in got.text_prompt
    assert got.lyrics_prompt.startswith("# Languages\nen\n")


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_cover_strength_out_of_range_is_rejected(strength: float) -> None:
    with pytest.raises(InvalidArgument, match="audio_cover_strength must be in"):
        prompts.dit_prompts(prompts.ConditioningText(), audio_cover_strength=strength)


def test_batch_items_own_their_metas() -> None:
    items = prompts.prepare_batch_data(2, prompts.ConditioningText(metas={"bpm": 100}))
    items[0].metas["bpm"] = 1  # type: ignore[index]
    assert items[1].metas == {"bpm": 100}
    with pytest.raises(InvalidArgument, match="batch_size"):
        prompts.prepare_batch_data(0, prompts.ConditioningText())


def test_metas_duration_prefers_requested_length() -> None:
    assert prompts.metas_duration_s(95.7, src_duration_s=12.0) == 95.7
    assert prompts.metas_duration_s(-1, src_duration_s=12.0) == 12.0
    assert prompts.metas_duration_s(None) is None
