"""The one parser and formatter of ``<|audio_code_N|>`` strings.

Audio codes are indices into the 64,000-entry FSQ codebook of the DiT's audio tokenizer, five per
second of audio. Between components they travel as ``<|audio_code_N|>`` tokens concatenated with no
separator, e.g. ``"<|audio_code_18953|><|audio_code_13833|>"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from shared.constants import CODES_PER_SECOND, MAX_AUDIO_CODE, NUM_AUDIO_CODES
from shared.errors import InvalidArgument

__all__ = [
    "CODES_PER_SECOND",
    "NUM_AUDIO_CODES",
    "MAX_AUDIO_CODE",
    "format_codes",
    "parse_codes",
    "parse_strict",
]

_CODE_PATTERN = re.compile(r"<\|audio_code_(\d+)\|>")
_WHITESPACE = re.compile(r"\s*")
_SNIPPET_CHARS = 24


def format_codes(codes: Iterable[int]) -> str:
    """``[5, 63999]`` -> ``"<|audio_code_5|><|audio_code_63999|>"`` (no separator).

    Raises:
        ValueError: a code is outside ``[0, 63999]``; formatting never clamps silently.
    """
    parts = []
    for code in codes:
        value = int(code)
        if not 0 <= value <= MAX_AUDIO_CODE:
            raise ValueError(f"audio code must be in [0, {MAX_AUDIO_CODE}], got {value}")
        parts.append(f"<|audio_code_{value}|>")
    return "".join(parts)


def parse_codes(text: str) -> list[int]:
    """Every ``<|audio_code_N|>`` in ``text``, in order, each clamped to ``[0, 63999]``.

    Reproduces the reference parser (``_parse_audio_code_string``): anything that is not a code
    token is ignored, so LM output with stray text around the codes still parses.
    """
    return [min(int(digits), MAX_AUDIO_CODE) for digits in _CODE_PATTERN.findall(text or "")]


def parse_strict(text: str, field: str = "audio_codes") -> list[int]:
    """Parse user-supplied codes, refusing anything the lenient parser would silently drop.

    Whitespace between tokens is allowed; any other character, a malformed token or a code outside
    ``[0, 63999]`` raises. An empty or all-whitespace string gives ``[]``.

    Raises:
        InvalidArgument: naming ``field``, the offending position and text, or the bad code.
    """
    codes: list[int] = []
    position = _WHITESPACE.match(text).end()
    while position < len(text):
        match = _CODE_PATTERN.match(text, position)
        if match is None:
            snippet = text[position : position + _SNIPPET_CHARS]
            raise InvalidArgument(
                f"{field} must hold only <|audio_code_N|> tokens, found {snippet!r} at character {position}",
                field=field,
            )
        value = int(match.group(1))
        if value > MAX_AUDIO_CODE:
            raise InvalidArgument(
                f"{field}: code #{len(codes)} must be in [0, {MAX_AUDIO_CODE}], got {value}", field=field
            )
        codes.append(value)
        position = _WHITESPACE.match(text, match.end()).end()
    return codes
