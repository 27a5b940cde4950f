"""The LM's chain-of-thought metadata block (``<think>\\n…\\n</think>``) and its fields.

The model was trained on ``yaml.dump(fields, allow_unicode=True, sort_keys=True)`` inside the
think tags, so the CoT we feed back (codes phase) is produced with PyYAML itself: key order,
line folding at width 80 with 2-space continuation, and quoting (``language: 'no'``,
``caption: 'Mood: dark'``) all follow its emitter. Checked against the ``lm_misc`` section of the
conformance vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import yaml

# Fields the LM writes, in the (alphabetical) order it writes them.
METADATA_FIELDS: tuple[str, ...] = ("bpm", "caption", "duration", "genres", "keyscale", "language", "timesignature")
# Fields fed back in the codes-phase CoT (``genres`` never is).
COT_FIELDS: tuple[str, ...] = ("bpm", "caption", "duration", "keyscale", "language", "timesignature")
# Fields whose presence means phase 1 (CoT generation) is skipped.
USER_METAS_FIELDS: tuple[str, ...] = ("bpm", "keyscale", "timesignature", "duration")

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

MetadataValue = int | str


@dataclass(frozen=True)
class LmMetadata:
    """Metadata of one song as the LM writes it; ``None`` means absent.

    ``bpm`` / ``duration`` are ints when they parsed as such, ``timesignature`` is the numerator
    as a string (``"4"``; ``"6"`` means 6/8).
    """

    bpm: MetadataValue | None = None
    caption: str | None = None
    duration: MetadataValue | None = None
    genres: str | None = None
    keyscale: str | None = None
    language: str | None = None
    timesignature: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> LmMetadata:
        """Pick the known fields of ``values``; other keys are ignored."""
        return cls(**{name: values[name] for name in METADATA_FIELDS if name in values})

    def to_dict(self) -> dict[str, MetadataValue]:
        """The present fields, in ``METADATA_FIELDS`` order."""
        present = ((f.name, getattr(self, f.name)) for f in fields(self))
        return {name: value for name, value in present if value is not None}


def format_metadata_as_cot(metadata: Mapping[str, object] | LmMetadata) -> str:
    """``"<think>\\n{yaml}\\n</think>"`` for the codes phase; ``"<think>\\n\\n</think>"`` when empty.

    Keeps the ``COT_FIELDS`` that are not ``None``; a time signature ``"N/4"`` becomes ``"N"``
    (``"6/8"`` stays); a string of decimal digits becomes an int.
    """
    if isinstance(metadata, LmMetadata):
        metadata = metadata.to_dict()
    items = {key: _cot_value(key, metadata[key]) for key in COT_FIELDS if metadata.get(key) is not None}
    body = yaml.safe_dump(items, allow_unicode=True, sort_keys=True).strip() if items else ""
    return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}"


def _cot_value(key: str, value: object) -> object:
    if isinstance(value, str):
        if key == "timesignature" and value.endswith("/4"):
            value = value.split("/")[0]
        if value.isdecimal():
            return int(value)
    return value


def build_user_metadata(
    bpm: float | str | None = None,
    keyscale: str | None = None,
    timesignature: str | None = None,
    duration_s: float | str | None = None,
) -> dict[str, MetadataValue]:
    """Request values to force into the CoT: positive ``bpm``/``duration`` as ints, non-blank
    ``keyscale``/``timesignature`` stripped (``"N/A"`` in any case counts as blank).

    Values are kept verbatim otherwise (``"C Major"``, ``"4/4"``), as the reference injects them.
    """
    user: dict[str, MetadataValue] = {}
    for name, value in (("bpm", bpm), ("duration", duration_s)):
        number = _positive_number(value)
        if number is not None:
            user[name] = int(number)
    for name, text in (("keyscale", keyscale), ("timesignature", timesignature)):
        cleaned = (text or "").strip()
        if cleaned and cleaned.lower() != "n/a":
            user[name] = cleaned
    return dict(sorted(user.items(), key=lambda item: USER_METAS_FIELDS.index(item[0])))


def _positive_number(value: float | str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def has_all_metas(user_metadata: Mapping[str, object] | None) -> bool:
    """True when the request fixes bpm, keyscale, timesignature and duration (phase 1 is skipped)."""
    return user_metadata is not None and all(name in user_metadata for name in USER_METAS_FIELDS)
