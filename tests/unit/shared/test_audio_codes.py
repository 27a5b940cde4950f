"""The audio-code string format: formatting, the reference's lenient parser, the strict user parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import audio_codes
from shared.errors import InvalidArgument

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "golden"

codes_lists = st.lists(st.integers(min_value=0, max_value=audio_codes.MAX_AUDIO_CODE), max_size=40)


def test_constants() -> None:
    assert audio_codes.CODES_PER_SECOND == 5
    assert audio_codes.NUM_AUDIO_CODES == 8 * 8 * 8 * 5 * 5 * 5


def test_format_concatenates_without_separator() -> None:
    assert audio_codes.format_codes([5, 0, 63999]) == "<|audio_code_5|><|audio_code_0|><|audio_code_63999|>"
    assert audio_codes.format_codes([]) == ""


@pytest.mark.parametrize("bad", [-1, 64000])
def test_format_refuses_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        audio_codes.format_codes([1, bad])


@given(codes_lists)
def test_round_trip(codes: list[int]) -> None:
    text = audio_codes.format_codes(codes)
    assert audio_codes.parse_codes(text) == codes
    assert audio_codes.parse_strict(text) == codes


def test_lenient_parse_matches_reference_vector() -> None:
    prompts = json.loads((GOLDEN / "prompts.json").read_text(encoding="utf-8"))
    entries = [e for e in prompts["lm_misc"] if e["function"].startswith("AudioCodesMixin._parse_audio_code_string")]
    assert entries
    for entry in entries:
        assert audio_codes.parse_codes(entry["args"]["code_str"]) == entry["output"]


def test_lenient_parse_ignores_other_text_and_clamps() -> None:
    text = "<think>x</think>\n<|audio_code_7|> junk <|audio_code_99999|><|audio_code_|><|im_end|>"
    assert audio_codes.parse_codes(text) == [7, 63999]
    assert audio_codes.parse_codes("") == []


def test_strict_allows_whitespace_between_tokens() -> None:
    assert audio_codes.parse_strict("  <|audio_code_1|>\n<|audio_code_2|> \t") == [1, 2]
    assert audio_codes.parse_strict("   ") == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("<|audio_code_1|>hello", "'hello'"),
        ("<|audio_code_1|><|audio_code_x|>", "at character 16"),
        ("1, 2, 3", "'1, 2, 3'"),
        ("<|audio_code_-4|>", "audio_code_-4"),
    ],
)
def test_strict_rejects_foreign_text(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match="src_codes must hold only") as caught:
        audio_codes.parse_strict(text, field="src_codes")
    assert fragment in caught.value.message
    assert caught.value.field == "src_codes"


def test_strict_rejects_out_of_range_code() -> None:
    with pytest.raises(InvalidArgument) as caught:
        audio_codes.parse_strict("<|audio_code_3|><|audio_code_64000|>")
    assert caught.value.message == "audio_codes: code #1 must be in [0, 63999], got 64000"
    assert caught.value.field == "audio_codes"
