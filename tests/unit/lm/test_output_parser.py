"""CoT formatting and LM output parsing: conformance vectors, the PyYAML emitter cases of the
reference spec, and the parser's line rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm_service.cot import LmMetadata, build_user_metadata, format_metadata_as_cot, has_all_metas
from lm_service.output_parser import extract_lyrics, parse_audio_code_string, parse_lm_output, postprocess_caption

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "golden"
VECTORS = json.loads((GOLDEN / "prompts.json").read_text(encoding="utf-8"))


def _misc(method: str) -> list[dict]:
    return [e for e in VECTORS["lm_misc"] if e["function"].split("(")[0].endswith("." + method)]


@pytest.mark.parametrize("entry", _misc("_format_metadata_as_cot"))
def test_cot_matches_vectors(entry: dict) -> None:
    assert format_metadata_as_cot(entry["args"]) == entry["output"]


@pytest.mark.parametrize("entry", _misc("parse_lm_output"))
def test_parse_lm_output_matches_vectors(entry: dict) -> None:
    parsed = parse_lm_output(entry["args"]["output_text"])
    assert parsed.metadata == entry["output"]["metadata"]
    assert [type(v) for v in parsed.metadata.values()] == [type(v) for v in entry["output"]["metadata"].values()]
    assert parsed.audio_codes == entry["output"]["audio_codes"]


@pytest.mark.parametrize("entry", _misc("_parse_audio_code_string"))
def test_audio_code_string_matches_vectors(entry: dict) -> None:
    assert parse_audio_code_string(entry["args"]["code_str"]) == entry["output"]


# PyYAML emitter cases listed in reference-lm.md section 3.6 (folding, quoting, "/4", digit strings).
YAML_CASES = [
    ({"bpm": 120, "caption": "An energetic pop track with bright synths, punchy drums and catchy vocal hooks that build "
      "into an anthemic chorus.", "duration": 180, "keyscale": "C major", "language": "en", "timesignature": "4"},
     "<think>\nbpm: 120\ncaption: An energetic pop track with bright synths, punchy drums and catchy vocal\n"
     "  hooks that build into an anthemic chorus.\nduration: 180\nkeyscale: C major\nlanguage: en\ntimesignature: 4\n</think>"),
    ({"bpm": 90, "caption": "Mood: dark ambient", "duration": 60, "keyscale": "B♭ minor", "language": "no", "timesignature": "6/8"},
     "<think>\nbpm: 90\ncaption: 'Mood: dark ambient'\nduration: 60\nkeyscale: B♭ minor\nlanguage: 'no'\ntimesignature: 6/8\n</think>"),
    ({"caption": "It's a song: with colon"}, "<think>\ncaption: 'It''s a song: with colon'\n</think>"),
    ({"caption": '- dark techno #1, "industrial"'}, "<think>\ncaption: '- dark techno #1, \"industrial\"'\n</think>"),
    ({"keyscale": "A♯ minor", "language": "no", "timesignature": "4/4", "bpm": "128", "duration": "45"},
     "<think>\nbpm: 128\nduration: 45\nkeyscale: A♯ minor\nlanguage: 'no'\ntimesignature: 4\n</think>"),
    ({"duration": 30}, "<think>\nduration: 30\n</think>"),
    ({}, "<think>\n\n</think>"),
]


@pytest.mark.parametrize(("metadata", "expected"), YAML_CASES)
def test_cot_reproduces_the_pyyaml_emitter(metadata: dict, expected: str) -> None:
    assert format_metadata_as_cot(metadata) == expected


def test_cot_leaves_out_genres_none_and_unknown_keys() -> None:
    cot = format_metadata_as_cot({"genres": "pop", "bpm": None, "mood": "x", "language": "en"})
    assert cot == "<think>\nlanguage: en\n</think>"


def test_cot_round_trips_through_the_parser() -> None:
    metadata = LmMetadata(bpm=96, caption="word " * 40 + "end", duration=200, keyscale="F# minor", language="ja", timesignature="3/4")
    cot = format_metadata_as_cot(metadata)
    assert "\n  " in cot  # the long caption was folded
    parsed = parse_lm_output(cot + "\n\n<|audio_code_5|>").metadata
    assert parsed == {**metadata.to_dict(), "caption": " ".join(["word"] * 40 + ["end"]), "timesignature": "3"}


def test_phase_one_output_without_closing_tag() -> None:
    text = "<think>\nbpm: 120\ncaption: A bright\n  pop song\nduration: 30\nkeyscale: A minor\nlanguage: en\ntimesignature: 4\n<|im_end|>"
    parsed = parse_lm_output(text)
    assert parsed.metadata == {"bpm": 120, "caption": "A bright pop song", "duration": 30, "keyscale": "A minor",
                               "language": "en", "timesignature": "4"}
    assert parsed.audio_codes == ""


def test_empty_think_block_falls_back_to_text_before_codes() -> None:
    parsed = parse_lm_output("<think>\n\n</think>\nbpm: 80\n<|audio_code_1|>bpm: 99")
    assert parsed.metadata == {"bpm": 80}
    assert parsed.audio_codes == "<|audio_code_1|>"


def test_parser_line_rules() -> None:
    text = "<think>\nBPM: fast\ncaption: 'Quoted: yes'\ngenres:\n  synth pop\nmood: calm\n duration: 10\nkeyscale:\n</think>"
    parsed = parse_lm_output(text)
    # upper-case key is lower-cased; a non-integer bpm stays a string; quotes stay; a blank value
    # continued on the next line is kept; unknown keys and keys without a value are dropped;
    # an indented "duration" line continues the previous field instead of starting one.
    assert parsed.metadata == {"bpm": "fast", "caption": "'Quoted: yes'", "genres": "synth pop"}


def test_reasoning_tags_are_an_alternative_to_think() -> None:
    assert parse_lm_output("<reasoning>\nlanguage: de\n</reasoning>").metadata == {"language": "de"}


def test_postprocess_caption_joins_folded_lines() -> None:
    assert postprocess_caption(" An emotional ballad.\n  The track opens\n\n  with piano. ") == "An emotional ballad. The track opens with piano."
    assert postprocess_caption("") == ""


@pytest.mark.parametrize(
    ("text", "lyrics"),
    [
        ("<think>\nbpm: 1\n</think>\n# Lyric\n[Verse]\nla la\n<|im_end|>", "[Verse]\nla la"),
        ("<think>\n</think>\n\n# lyric \n[Chorus]\nhey<|im_end|>\n", "[Chorus]\nhey"),
        ("<think>\n</think>\n# Lyrics\n[Verse]\nla", "# Lyrics\n[Verse]\nla"),
        ("<think>\n</think>\n[Instrumental]", "[Instrumental]"),
        ("<think>\n</think>\n  <|im_end|>", ""),
        ("bpm: 120\n[Verse]\nno closing tag", ""),
    ],
    ids=["lyric-header", "lower-case-header", "lyrics-header-kept", "no-header", "empty", "no-think-end"],
)
def test_extract_lyrics(text: str, lyrics: str) -> None:
    assert extract_lyrics(text) == lyrics


def test_audio_codes_are_clamped_to_the_codebook() -> None:
    assert parse_audio_code_string("<|audio_code_70000|><|audio_code_0|>x<|audio_code_63999|>") == [63999, 0, 63999]
    assert parse_audio_code_string("") == []


def test_metadata_dataclass_round_trip() -> None:
    values = {"bpm": 100, "genres": "jazz", "language": "fr", "extra": 1}
    metadata = LmMetadata.from_mapping(values)
    assert metadata.to_dict() == {"bpm": 100, "genres": "jazz", "language": "fr"}
    assert format_metadata_as_cot(metadata) == format_metadata_as_cot(values)


def test_user_metadata_from_request_values() -> None:
    assert build_user_metadata(bpm="120.7", keyscale=" C Major ", timesignature="4/4", duration_s=61.9) == {
        "bpm": 120, "keyscale": "C Major", "timesignature": "4/4", "duration": 61,
    }
    assert build_user_metadata(bpm=0, keyscale="N/A", timesignature="  ", duration_s=-1) == {}
    assert build_user_metadata(bpm="fast", duration_s=float("inf")) == {}
    assert has_all_metas(build_user_metadata(bpm=90, keyscale="A minor", timesignature="3", duration_s=30))
    assert not has_all_metas(build_user_metadata(bpm=90, keyscale="A minor", timesignature="3"))
    assert not has_all_metas(None)
