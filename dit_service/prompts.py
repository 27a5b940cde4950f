"""Prompt strings fed to the DiT's text encoder: the caption branch and the lyric branch.

Reproduces the reference handler's prompt helpers byte for byte (the ``dit``, ``metas`` and
``lyrics`` sections of the conformance vectors' ``prompts.json`` check it). Everything here is a
pure function over strings and dicts; tokenization happens elsewhere, with the limits in
``TEXT_TOKENIZER_KWARGS`` / ``LYRICS_TOKENIZER_KWARGS``.

Caption prompt::

    # Instruction\\n{instruction}\\n\\n# Caption\\n{caption}\\n\\n# Metas\\n{metas}<|endoftext|>\\n

Lyric prompt::

    # Languages\\n{language}\\n\\n# Lyric\\n{lyrics}<|endoftext|>
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

from shared.constants import DEFAULT_DIT_INSTRUCTION, TASK_TYPES, TRACK_NAMES, VALID_LANGUAGES
from shared.errors import InvalidArgument, out_of_range

__all__ = [
    "CAPTION_PROMPT_TEMPLATE", "DEFAULT_DIT_INSTRUCTION", "DEFAULT_METAS", "LYRICS_PROMPT_TEMPLATE",
    "LYRICS_TOKENIZER_KWARGS", "TASK_TYPES", "TEXT_TOKENIZER_KWARGS", "TRACK_NAMES", "VALID_LANGUAGES",
    "ConditioningText", "DitPrompts", "build_dit_inputs", "build_metas_dict", "caption_prompt",
    "dit_prompts", "extract_caption", "format_instruction", "lyrics_prompt", "metas_duration_s",
    "metas_string", "prepare_batch_data", "task_instruction",
]

DEFAULT_VOCAL_LANGUAGE = "en"
DEFAULT_METAS = "- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 30 seconds\n"
NOT_AVAILABLE = "N/A"

CAPTION_PROMPT_TEMPLATE = "# Instruction\n{instruction}\n\n# Caption\n{caption}\n\n# Metas\n{metas}<|endoftext|>\n"
LYRICS_PROMPT_TEMPLATE = "# Languages\n{language}\n\n# Lyric\n{lyrics}<|endoftext|>"

# Keyword arguments the reference passes to the text tokenizer, one prompt at a time.
TEXT_TOKENIZER_KWARGS: Mapping[str, object] = MappingProxyType(
    {"padding": "longest", "truncation": True, "max_length": 256}
)
LYRICS_TOKENIZER_KWARGS: Mapping[str, object] = MappingProxyType(
    {"padding": "longest", "truncation": True, "max_length": 2048}
)

_FIXED_INSTRUCTIONS: Mapping[str, str] = MappingProxyType({
    "text2music": DEFAULT_DIT_INSTRUCTION,
    "repaint": "Repaint the mask area based on the given conditions:",
    "cover": "Generate audio semantic tokens based on the given conditions:",
    "cover-nofsq": "Generate audio semantic tokens based on the given conditions:",
})
_TRACK_INSTRUCTIONS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "extract": ("Extract the {track} track from the audio:", "Extract the track from the audio:"),
    "lego": (
        "Generate the {track} track based on the audio context:",
        "Generate the track based on the audio context:",
    ),
})
_COMPLETE_INSTRUCTION = "Complete the input track with {classes}:"
_COMPLETE_DEFAULT_INSTRUCTION = "Complete the input track:"

# A caption written in the SFT prompt layout: keep only the text of its "# Caption" section.
_SFT_CAPTION_SECTION = re.compile(r"#\s*Caption\s*\n(.*?)(?:\n\s*#\s*Metas|$)", re.DOTALL)

# Each metas line and the dict keys it is read from, first present key wins.
_METAS_ALIASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bpm", ("bpm", "tempo")),
    ("timesignature", ("timesignature", "time_signature")),
    ("keyscale", ("keyscale", "key", "scale")),
)

MetasInput = Mapping[str, object] | str | None


def task_instruction(
    task_type: str,
    track_name: str | None = None,
    complete_track_classes: Sequence[str] | None = None,
) -> str:
    """The DiT instruction for a task.

    ``extract`` / ``lego`` name the track upper-cased (``"Extract the VOCALS track from the
    audio:"``), ``complete`` names the classes upper-cased and joined with ``" | "``; without a
    track name / classes they use their generic sentence. An unknown task gets the text2music
    instruction.
    """
    if task_type in _TRACK_INSTRUCTIONS:
        named, generic = _TRACK_INSTRUCTIONS[task_type]
        return named.format(track=track_name.upper()) if track_name else generic
    if task_type == "complete":
        if complete_track_classes:
            classes = " | ".join(name.upper() for name in complete_track_classes)
            return _COMPLETE_INSTRUCTION.format(classes=classes)
        return _COMPLETE_DEFAULT_INSTRUCTION
    return _FIXED_INSTRUCTIONS.get(task_type, DEFAULT_DIT_INSTRUCTION)


def format_instruction(instruction: str) -> str:
    """Append the ``":"`` every instruction ends with when it is missing."""
    return instruction if instruction.endswith(":") else instruction + ":"


def build_metas_dict(
    bpm: int | str | None,
    key_scale: str | None,
    time_signature: str | None,
    duration_s: float | None = None,
) -> dict[str, object]:
    """Metadata dict for the caption prompt from request fields.

    A falsy ``bpm``, a blank key or a blank / ``"N/A"`` time signature become ``"N/A"``;
    ``duration`` (``"{int(duration_s)} seconds"``) is present only when a duration is given.
    """
    key_scale = key_scale or ""
    time_signature = time_signature or ""
    has_time_signature = bool(time_signature.strip()) and time_signature != NOT_AVAILABLE
    metas: dict[str, object] = {
        "bpm": bpm if bpm else NOT_AVAILABLE,
        "keyscale": key_scale if key_scale.strip() else NOT_AVAILABLE,
        "timesignature": time_signature if has_time_signature else NOT_AVAILABLE,
    }
    if duration_s is not None:
        metas["duration"] = f"{int(duration_s)} seconds"
    return metas


def metas_duration_s(audio_duration_s: float | None, src_duration_s: float | None = None) -> float | None:
    """Duration the metas state: the requested total length if positive, else the source audio's."""
    if audio_duration_s is not None and float(audio_duration_s) > 0:
        return float(audio_duration_s)
    return src_duration_s


def metas_string(metas: MetasInput) -> str:
    """The ``# Metas`` block: ``"- bpm: …\\n- timesignature: …\\n- keyscale: …\\n- duration: …\\n"``.

    A string is taken as already formatted; ``None`` (or any other type) gives ``DEFAULT_METAS``.
    Dict keys accept the aliases ``tempo``, ``time_signature``, ``key`` / ``scale`` and ``length``;
    missing values print ``N/A``, a missing duration ``30 seconds``, a numeric duration
    ``"{int(d)} seconds"`` and a string duration verbatim.
    """
    if isinstance(metas, str):
        return metas
    if not isinstance(metas, Mapping):
        return DEFAULT_METAS
    lines = [f"- {name}: {_first_present(metas, keys, NOT_AVAILABLE)}\n" for name, keys in _METAS_ALIASES]
    return "".join(lines) + f"- duration: {_metas_duration(_first_present(metas, ('duration', 'length'), 30))}\n"


def _first_present(metas: Mapping[str, object], keys: tuple[str, ...], default: object) -> object:
    for key in keys:
        if key in metas:
            return metas[key]
    return default


def _metas_duration(duration: object) -> str:
    if isinstance(duration, (int, float)):
        return f"{int(duration)} seconds"
    return duration if isinstance(duration, str) else "30 seconds"


def extract_caption(caption: str) -> str:
    """The caption text of a caption written in the SFT prompt layout; other captions unchanged."""
    if "# Instruction" in caption and "# Caption" in caption:
        match = _SFT_CAPTION_SECTION.search(caption)
        if match:
            return match.group(1).strip()
    return caption


def caption_prompt(instruction: str, caption: str, metas: MetasInput) -> str:
    """The caption-branch prompt (instruction gets its trailing colon, metas via ``metas_string``)."""
    return CAPTION_PROMPT_TEMPLATE.format(
        instruction=format_instruction(instruction), caption=caption, metas=metas_string(metas)
    )


def lyrics_prompt(lyrics: str, language: str) -> str:
    """The lyric-branch prompt; empty lyrics give an empty ``# Lyric`` section."""
    return LYRICS_PROMPT_TEMPLATE.format(language=language, lyrics=lyrics)


@dataclass(frozen=True)
class ConditioningText:
    """Text side of one DiT batch item, before prompt formatting."""

    instruction: str = DEFAULT_DIT_INSTRUCTION
    caption: str = ""
    lyrics: str = ""
    vocal_language: str = DEFAULT_VOCAL_LANGUAGE
    metas: MetasInput = None


@dataclass(frozen=True)
class DitPrompts:
    """Prompt strings of one batch item.

    ``non_cover_text_prompt`` is set only when ``audio_cover_strength < 1``: the same caption and
    metas under the text2music instruction, used once the sampler leaves the cover condition.
    """

    text_prompt: str
    lyrics_prompt: str
    non_cover_text_prompt: str | None = None

    @property
    def joined(self) -> str:
        """Caption and lyric prompts joined the way the reference logs them."""
        return f"{self.text_prompt}\n\n{self.lyrics_prompt}"


def dit_prompts(text: ConditioningText, audio_cover_strength: float = 1.0) -> DitPrompts:
    """Caption and lyric prompts of one item; the non-cover prompt when cover strength < 1."""
    if not 0.0 <= audio_cover_strength <= 1.0:
        raise out_of_range("audio_cover_strength", audio_cover_strength, 0, 1)
    non_cover = None
    if audio_cover_strength < 1.0:
        non_cover = caption_prompt(DEFAULT_DIT_INSTRUCTION, text.caption, text.metas)
    return DitPrompts(
        text_prompt=caption_prompt(text.instruction, text.caption, text.metas),
        lyrics_prompt=lyrics_prompt(text.lyrics, text.vocal_language),
        non_cover_text_prompt=non_cover,
    )


def build_dit_inputs(
    instruction: str | None,
    caption: str,
    lyrics: str,
    metas: MetasInput = None,
    vocal_language: str = DEFAULT_VOCAL_LANGUAGE,
) -> tuple[str, str]:
    """``(caption_prompt, lyrics_prompt)`` for one item, LM metadata taking precedence.

    A metas dict carrying a non-empty ``caption`` / ``language`` (from the LM's CoT) replaces the
    given caption / vocal language; ``None`` instruction means the text2music one.
    """
    if isinstance(metas, Mapping):
        caption = str(metas["caption"]) if metas.get("caption") else caption
        vocal_language = str(metas["language"]) if metas.get("language") else vocal_language
    text = ConditioningText(instruction or DEFAULT_DIT_INSTRUCTION, caption, lyrics, vocal_language, metas)
    prompts = dit_prompts(text)
    return prompts.text_prompt, prompts.lyrics_prompt


def prepare_batch_data(batch_size: int, text: ConditioningText) -> list[ConditioningText]:
    """``batch_size`` copies of one request's text, caption extracted from SFT layout.

    Each item gets its own copy of a metas dict, so per-item edits do not leak.
    """
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
    caption = extract_caption(text.caption)
    metas = text.metas
    return [
        replace(text, caption=caption, metas=dict(metas) if isinstance(metas, Mapping) else metas)
        for _ in range(batch_size)
    ]
