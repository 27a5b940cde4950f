"""LM prompts: byte-exact against the conformance vectors, rendered by our renderer and by
transformers' ``apply_chat_template`` with our chat template; plus the prompt conformance runner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lm_service import prompts as lm
from conformance.prompts import run_prompt_cases

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "golden"
VECTORS = json.loads((GOLDEN / "prompts.json").read_text(encoding="utf-8"))
LM_SECTIONS = {"lm": lm.CodesLayout.LEGACY, "lm_upstream_6439010": lm.CodesLayout.TRAINING_ALIGNED}
TEMPLATE = lm.default_chat_template()
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]


def _lm_cases() -> list[tuple[str, int, dict]]:
    return [(section, i, entry) for section in LM_SECTIONS for i, entry in enumerate(VECTORS[section])]


def _build(entry: dict, layout: lm.CodesLayout) -> lm.ChatPrompt:
    """Our builder for a vector entry of the reference helper it names."""
    args, method = entry["args"], entry["function"].rsplit(".", 1)[-1]
    negative = args.get("negative_prompt", lm.NO_USER_INPUT)
    is_negative = args.get("is_negative_prompt", False)
    if method == "build_formatted_prompt":
        return lm.cot_unconditional_prompt(args["lyrics"], negative) if is_negative else lm.cot_prompt(args["caption"], args["lyrics"])
    if method == "build_formatted_prompt_with_cot":
        if is_negative:
            return lm.codes_unconditional_prompt(args["caption"], args["lyrics"], negative, layout)
        return lm.codes_prompt(args["caption"], args["lyrics"], args["cot_text"], layout)
    if method == "build_formatted_prompt_for_understanding":
        return lm.unconditional_task_prompt(lm.UNDERSTAND_INSTRUCTION, negative) if is_negative else lm.understand_prompt(args["audio_codes"])
    if method == "build_formatted_prompt_for_inspiration":
        return lm.create_sample_prompt(args["query"], args["instrumental"])
    if method == "build_formatted_prompt_for_format":
        return lm.format_sample_prompt(args["caption"], args["lyrics"])
    raise AssertionError(f"no builder for {method}")


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.mark.parametrize(("section", "index", "entry"), _lm_cases(), ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_lm_prompts_match_vectors(section: str, index: int, entry: dict) -> None:
    prompt = _build(entry, LM_SECTIONS[section])
    assert prompt.message_dicts() == entry["messages"]
    assert prompt.add_generation_prompt is entry["add_generation_prompt"]
    assert prompt.render(TEMPLATE) == entry["rendered"]


@pytest.mark.parametrize(("section", "index", "entry"), _lm_cases(), ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_apply_chat_template_renders_like_our_renderer(
    section: str, index: int, entry: dict, hf_tokenizer: PreTrainedTokenizerFast
) -> None:
    ours = lm.render(entry["messages"], entry["add_generation_prompt"], TEMPLATE)
    theirs = hf_tokenizer.apply_chat_template(
        entry["messages"], tokenize=False, add_generation_prompt=entry["add_generation_prompt"]
    )
    assert theirs == ours
    assert entry["rendered"].startswith(ours)


@pytest.mark.parametrize(
    ("messages", "kwargs"),
    [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nb"},
          {"role": "user", "content": "c"}], {"add_generation_prompt": True}),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "answer", "reasoning_content": "why"}], {}),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "no reasoning"}], {}),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], {"add_generation_prompt": True, "enable_thinking": False}),
    ],
    ids=["earlier-assistant-drops-reasoning", "reasoning-content", "last-assistant-empty-think", "thinking-off"],
)
def test_template_matches_transformers_beyond_the_vectors(
    messages: list[dict], kwargs: dict, hf_tokenizer: PreTrainedTokenizerFast
) -> None:
    add_generation_prompt = kwargs.pop("add_generation_prompt", False)
    ours = lm.render(messages, add_generation_prompt, TEMPLATE, **kwargs)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    assert theirs == ours
    assert ours.count("<|im_start|>") == len(messages) + int(add_generation_prompt)


def test_earlier_assistant_turn_keeps_only_its_answer() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nb"},
                {"role": "user", "content": "c"}]
    assert "<|im_start|>assistant\nb<|im_end|>\n" in lm.render(messages, False, TEMPLATE)


def test_rendered_special_tokens_map_to_single_ids(hf_tokenizer: PreTrainedTokenizerFast) -> None:
    text = lm.codes_prompt("calm piano", "", "<think>\nbpm: 70\n</think>").render(TEMPLATE)
    tokens = hf_tokenizer.convert_ids_to_tokens(hf_tokenizer(text)["input_ids"])
    assert tokens.count("<|im_start|>") == 3 and tokens.count("<|im_end|>") == 2
    assert tokens.count("<think>") == 1 and tokens.count("</think>") == 1


def test_template_rejects_unknown_roles() -> None:
    with pytest.raises(jinja2.exceptions.TemplateError, match="unsupported chat role"):
        lm.render([{"role": "tool", "content": "x"}], False, TEMPLATE)


def test_training_aligned_layout_is_the_default() -> None:
    cot = "<think>\nbpm: 120\n</think>"
    default = lm.codes_prompt("c", "l", cot)
    assert default == lm.codes_prompt("c", "l", cot, lm.CodesLayout.TRAINING_ALIGNED)
    assert default.render(TEMPLATE).endswith("<|im_start|>assistant\n" + cot + "\n\n")
    legacy = lm.codes_prompt("c", "l", cot, lm.CodesLayout.LEGACY).render(TEMPLATE)
    assert legacy.endswith("</think>\n\n<|im_end|>\n")


def test_unconditional_codes_prompt_per_layout() -> None:
    aligned = lm.codes_unconditional_prompt("my caption", "my lyrics", "  NO USER INPUT ")
    assert aligned.message_dicts()[1]["content"] == lm.NO_USER_INPUT
    assert aligned.render(TEMPLATE).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    legacy = lm.codes_unconditional_prompt("my caption", "my lyrics", "", lm.CodesLayout.LEGACY)
    assert legacy.message_dicts()[1]["content"] == "# Caption\nmy caption\n\n# Lyric\nmy lyrics\n"
    assert legacy.message_dicts()[2]["content"] == "<think>\n</think>"


def test_legacy_codes_prompt_always_ends_with_newline() -> None:
    bare_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    prompt = lm.codes_prompt("c", "l", "<think>\n</think>", lm.CodesLayout.LEGACY)
    assert prompt.render(bare_template).endswith("</think>\n")


@pytest.mark.parametrize(("negative", "meaningful"), [("", False), ("   ", False), (" NO USER INPUT ", False), (None, False), ("sad", True)])
def test_negative_prompt_meaningfulness(negative: str | None, meaningful: bool) -> None:
    assert lm.has_meaningful_negative_prompt(negative) is meaningful


def test_blank_inputs_use_the_reference_placeholders() -> None:
    assert lm.create_sample_prompt("  ", False).message_dicts()[1]["content"] == "NO USER INPUT\n\ninstrumental: false"
    assert lm.format_sample_prompt("", " ").message_dicts()[1]["content"] == "# Caption\nNO USER INPUT\n\n# Lyric\n[Instrumental]"
    assert lm.understand_prompt("").message_dicts()[1]["content"] == lm.NO_USER_INPUT
    assert lm.unconditional_task_prompt(lm.FORMAT_SAMPLE_INSTRUCTION, " ").message_dicts()[1]["content"] == ""


def _vector_entry_count(vectors: dict) -> int:
    return sum(len(v) for v in vectors.values() if isinstance(v, list))


def test_runner_passes_every_golden_prompt_vector() -> None:
    results = run_prompt_cases(GOLDEN)
    assert len(results) == _vector_entry_count(VECTORS)
    assert [r.name for r in results if not r.passed] == []
    assert len({r.name for r in results}) == len(results)


def _copy_vectors(tmp_path: Path, vectors: dict) -> Path:
    (tmp_path / "prompts.json").write_text(json.dumps(vectors), encoding="utf-8")
    return tmp_path


def test_runner_reports_a_mismatch_with_a_diff_hint(tmp_path: Path) -> None:
    vectors = json.loads(json.dumps(VECTORS))
    vectors["lm_upstream_6439010"][3]["rendered"] = vectors["lm_upstream_6439010"][3]["rendered"].replace("bpm: 120", "bpm: 121")
    results = run_prompt_cases(_copy_vectors(tmp_path, vectors))
    failed = [r for r in results if not r.passed]
    assert [r.name for r in failed] == ["prompt:lm_upstream_6439010:3:codes_phase_training_aligned"]
    assert failed[0].detail.startswith("rendered: differs at char")
    assert "bpm: 121" in failed[0].detail


def test_runner_reports_unknown_sections_and_helpers(tmp_path: Path) -> None:
    vectors = {"note": "text", "future": [{"function": "X.y", "args": {}}],
               "lm": [{"function": "LLMHandler.build_formatted_prompt_v2", "args": {}}, {"function": "LLMHandler.parse_lm_output", "args": {}}]}
    results = run_prompt_cases(_copy_vectors(tmp_path, vectors))
    assert [r.passed for r in results] == [False, False, False]
    assert "unknown section" in results[0].detail
    assert "build_formatted_prompt_v2" in results[1].detail
    assert results[2].detail.startswith("KeyError")


def test_runner_reports_a_missing_vector_file(tmp_path: Path) -> None:
    results = run_prompt_cases(tmp_path)
    assert len(results) == 1 and not results[0].passed


def test_runner_reads_any_folder_with_the_same_format(tmp_path: Path) -> None:
    shutil.copy(GOLDEN / "prompts.json", tmp_path / "prompts.json")
    assert all(r.passed for r in run_prompt_cases(tmp_path))
