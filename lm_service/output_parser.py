"""Reading the LM's output text: metadata fields, audio codes and lyrics.

Reproduces the reference parser (checked by the ``lm_misc`` section of the conformance vectors):

* audio codes: every ``<|audio_code_N|>`` token, concatenated;
* metadata: the text inside the first ``<think>…</think>`` (else ``<reasoning>…</reasoning>``),
  or, when that is missing or empty (phase 1 stops before ``</think>``), everything before the
  first audio code. A line with no leading whitespace and a ``:`` starts a field; an indented line
  continues it (YAML folding); lines starting with ``<`` are skipped. YAML quotes are kept;
* lyrics: the text after ``</think>`` without a leading ``# Lyric`` header or trailing ``<|im_end|>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lm_service.cot import METADATA_FIELDS, MetadataValue
from shared.constants import MAX_AUDIO_CODE

_AUDIO_CODE_TOKEN = re.compile(r"<\|audio_code_\d+\|>")
_AUDIO_CODE_VALUE = re.compile(r"<\|audio_code_(\d+)\|>")
_REASONING_BLOCKS = (
    re.compile(r"<think>(.*?)</think>", re.DOTALL),
    re.compile(r"<reasoning>(.*?)</reasoning>", re.DOTALL),
)
# The character class is the reference's: it strips "# Lyric\n" but not "# Lyrics\n".
_LYRICS_HEADER = re.compile(r"^#\s*Lyri[c|cs]?\s*\n", re.IGNORECASE)
_TRAILING_IM_END = re.compile(r"<\|im_end\|>\s*$")
_INTEGER_FIELDS = frozenset({"bpm", "duration"})


@dataclass(frozen=True)
class ParsedLmOutput:
    """Metadata fields found (``METADATA_FIELDS`` keys only) and the audio-code tokens, joined."""

    metadata: dict[str, MetadataValue]
    audio_codes: str


def parse_lm_output(text: str) -> ParsedLmOutput:
    """Metadata and audio codes of one LM output (special tokens decoded as text)."""
    audio_codes = "".join(_AUDIO_CODE_TOKEN.findall(text))
    metadata: dict[str, MetadataValue] = {}
    for key, value_lines in _scan_fields(_reasoning_text(text)):
        if key in METADATA_FIELDS:
            metadata[key] = _field_value(key, "\n".join(value_lines))
    return ParsedLmOutput(metadata=metadata, audio_codes=audio_codes)


def _reasoning_text(text: str) -> str:
    for pattern in _REASONING_BLOCKS:
        match = pattern.search(text)
        if match:
            reasoning = match.group(1).strip()
            if reasoning:
                return reasoning
            break
    return text.split("<|audio_code_", 1)[0].strip()


def _scan_fields(reasoning: str) -> list[tuple[str, list[str]]]:
    """``(key, value lines)`` per field with a non-blank value, in order of appearance."""
    found: list[tuple[str, list[str]]] = []
    key, value_lines = "", []
    for line in reasoning.split("\n"):
        if line.strip().startswith("<"):
            continue
        if line and not line[0].isspace() and ":" in line:
            if key and value_lines:
                found.append((key, value_lines))
            name, _, first = line.partition(":")
            key, value_lines = name.strip().lower(), ([first] if first.strip() else [])
        elif line.startswith((" ", "\t")) and key:
            value_lines.append(line)
    if key and value_lines:
        found.append((key, value_lines))
    return found


def _field_value(key: str, value: str) -> MetadataValue:
    if key == "caption":
        return postprocess_caption(value)
    if key in _INTEGER_FIELDS:
        try:
            return int(value.strip())
        except ValueError:
            return value.strip()
    return value.strip()


def postprocess_caption(caption: str) -> str:
    """Undo YAML folding: strip every line, drop blank ones, join with single spaces."""
    return " ".join(line.strip() for line in caption.split("\n") if line.strip())


def extract_lyrics(text: str) -> str:
    """Lyrics the LM wrote after ``</think>``; ``""`` when there are none."""
    _, closed, after = text.partition("</think>")
    after = after.strip()
    if not closed or not after:
        return ""
    after = _LYRICS_HEADER.sub("", after)
    after = _TRAILING_IM_END.sub("", after)
    return after.strip()


def parse_audio_code_string(code_string: str) -> list[int]:
    """Code values of every ``<|audio_code_N|>`` token, each clamped to ``[0, MAX_AUDIO_CODE]``."""
    return [min(int(value), MAX_AUDIO_CODE) for value in _AUDIO_CODE_VALUE.findall(code_string or "")]
