"""Validation of the public request types against the documented ranges.

Every failure raises :class:`shared.errors.InvalidArgument` naming the field, the value and the
limit, e.g. ``duration must be in [10, 600] seconds (or <= 0 for automatic), got 700``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from typing import Iterable, Optional

from shared import constants as c
from shared.audio_codes import parse_strict
from shared.errors import InvalidArgument, out_of_range
from shared.types import (
    CreateSampleParams,
    FormatSampleParams,
    GenerationConfig,
    GenerationParams,
    MusicMetadata,
    UnderstandParams,
)

MAX_SEED = 2**32 - 1
MAX_TEXT_CHARS = 512
# LoRA: the seed API documents lora_scale in [0.0, 1.0]; ids are folder names, never paths.
LORA_SCALE_MIN, LORA_SCALE_MAX = 0.0, 1.0
LORA_ID_MAX_CHARS = 128
LORA_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_LORAS_PER_REQUEST = 8
SOURCE_TASKS = ("cover", "repaint", "lego", "extract", "complete")
# Studio operations (docs/studio.md): the gateway resolves them against a source item or upload.
STUDIO_TASK_TYPES = ("retake", "extend", "edit")
ALL_TASK_TYPES = (*c.TASK_TYPES, *STUDIO_TASK_TYPES)
EDIT_MODES = ("only_lyrics", "remix")
CFG_TYPES = ("apg", "cfg", "cfg_star")
REQUEST_ID_MAX_CHARS = 128

# field -> (low, high, unit); inclusive ranges checked when the value is numeric.
_PARAM_RANGES: dict[str, tuple[float, float, str]] = {
    "inference_steps": (1, c.BASE_MAX_STEPS, "steps"),
    "guidance_scale": (c.GUIDANCE_MIN, c.GUIDANCE_MAX, ""),
    "cfg_interval_start": (0.0, 1.0, ""),
    "cfg_interval_end": (0.0, 1.0, ""),
    "shift": (c.SHIFT_MIN, c.SHIFT_MAX, ""),
    "repainting_start": (-c.DURATION_MAX_S, c.DURATION_MAX_S, "seconds"),
    "audio_cover_strength": (0.0, 1.0, ""),
    "lm_temperature": (0.0, 2.0, ""),
    "lm_cfg_scale": (1.0, 10.0, ""),
    "lm_top_k": (0, 1000, ""),
    "lm_top_p": (0.0, 1.0, ""),
    "lora_scale": (LORA_SCALE_MIN, LORA_SCALE_MAX, ""),
    "seed": (-1, MAX_SEED, ""),
}
_TEXT_LIMITS = {
    "caption": c.CAPTION_MAX_CHARS,
    "lyrics": c.LYRICS_MAX_CHARS,
    "instruction": MAX_TEXT_CHARS,
    "lm_negative_prompt": MAX_TEXT_CHARS,
    "lora_id": 128,
}


def check_range(field: str, value: float, low: float, high: float, unit: str = "") -> None:
    """Raise unless ``low <= value <= high`` (NaN and infinities always fail)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{field} must be a number, got {value!r}", field=field)
    if math.isnan(value) or not low <= value <= high:
        raise out_of_range(field, value, low, high, unit)


def check_lora_id(field: str, value: str) -> None:
    """An adapter id: a folder name of letters, digits, ``.``, ``_`` and ``-`` (never a path)."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string, got {type(value).__name__}", field=field)
    if len(value) > LORA_ID_MAX_CHARS:
        raise InvalidArgument(f"{field} must be at most {LORA_ID_MAX_CHARS} characters, got {len(value)}",
                              field=field)
    if not LORA_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(f"{field} must start with a letter or digit and hold only letters, digits, '.', "
                              f"'_' and '-'; got {value!r}", field=field)


def lora_blend(params: GenerationParams) -> list[tuple[str, float]]:
    """The request's adapters as ``(lora_id, scale)`` pairs: ``lora_id``/``lora_scale`` first (when
    set), then ``loras``. Checks ids, scales in [0, 1], no id twice, at most 8 adapters."""
    blend: list[tuple[str, float]] = []
    if params.lora_id:
        check_lora_id("lora_id", params.lora_id)
        check_range("lora_scale", params.lora_scale, LORA_SCALE_MIN, LORA_SCALE_MAX)
        blend.append((params.lora_id, float(params.lora_scale)))
    for index, entry in enumerate(params.loras or []):
        if isinstance(entry, (str, bytes)) or not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise InvalidArgument(f"loras[{index}] must be a (lora_id, scale) pair, got {entry!r}", field="loras")
        lora_id, scale = entry
        check_lora_id(f"loras[{index}].lora_id", lora_id)
        check_range(f"loras[{index}].scale", scale, LORA_SCALE_MIN, LORA_SCALE_MAX)
        blend.append((lora_id, float(scale)))
    seen: set[str] = set()
    for lora_id, _ in blend:
        if lora_id in seen:
            raise InvalidArgument(f"loras: adapter {lora_id!r} is named twice (lora_id and loras together)",
                                  field="loras")
        seen.add(lora_id)
    if len(blend) > MAX_LORAS_PER_REQUEST:
        raise InvalidArgument(f"a request may blend at most {MAX_LORAS_PER_REQUEST} adapters, got {len(blend)}",
                              field="loras")
    return blend


def check_text(field: str, value: str, max_chars: int) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string, got {type(value).__name__}", field=field)
    if len(value) > max_chars:
        raise InvalidArgument(f"{field} must be at most {max_chars} characters, got {len(value)}", field=field)


def check_choice(field: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise InvalidArgument(f"{field} must be one of {', '.join(allowed)}; got {value!r}", field=field)


def normalize_keyscale(value: str, field: str = "keyscale") -> str:
    """Canonical spelling of a key (``"c MAJOR"`` → ``"C major"``); empty stays empty."""
    text = " ".join(value.split())
    if not text:
        return ""
    for candidate in c.KEYSCALES:
        if candidate.lower() == text.lower():
            return candidate
    raise InvalidArgument(
        f"{field} must be a note A-G with optional #, b, \u266f or \u266d and 'major' or 'minor' "
        f"(e.g. 'C major', 'F# minor'); got {value!r}",
        field=field,
    )


METADATA_TEXT_MAX_CHARS = 32


def check_metadata_text(field: str, value: str) -> None:
    """A keyscale or time signature as the reference takes it: any spelling (``"Am"``, ``"F# minor"``,
    ``"C Major"``, ``"3/4"``) is written verbatim into the LM's CoT and the DiT's metadata, so only
    what would break that is refused: line breaks and other control characters, and length."""
    if len(value) > METADATA_TEXT_MAX_CHARS:
        raise InvalidArgument(f"{field} must be at most {METADATA_TEXT_MAX_CHARS} characters, got {len(value)}",
                              field=field)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidArgument(f"{field} must be one line without control characters, got {value!r}", field=field)


def normalize_timesignature(value: str, field: str = "timesignature") -> str:
    """``"4/4"`` → ``"4"``, ``"6/8"`` → ``"6"``; empty stays empty."""
    text = value.strip()
    if not text:
        return ""
    numerator = {"2/4": "2", "3/4": "3", "4/4": "4", "6/8": "6"}.get(text, text)
    if numerator not in c.VALID_TIME_SIGNATURES:
        raise InvalidArgument(f"{field} must be one of 2, 3, 4, 6 (or 2/4, 3/4, 4/4, 6/8); got {value!r}", field=field)
    return numerator


def check_duration(field: str, value: Optional[float], allow_auto: bool = True) -> None:
    if value is None and allow_auto:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidArgument(f"{field} must be a number of seconds, got {value!r}", field=field)
    if allow_auto and value <= 0:
        return
    if not c.DURATION_MIN_S <= value <= c.DURATION_MAX_S:
        auto = " (or <= 0 for automatic)" if allow_auto else ""
        raise InvalidArgument(
            f"{field} must be in [{c.DURATION_MIN_S:g}, {c.DURATION_MAX_S:g}] seconds{auto}, got {value!r}", field=field
        )


def check_bpm(field: str, value: Optional[int]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{field} must be an integer, got {value!r}", field=field)
    check_range(field, value, c.BPM_MIN, c.BPM_MAX)


def check_language(field: str, value: str) -> None:
    if value:
        check_choice(field, value, c.VALID_LANGUAGES)


def check_timesteps(timesteps: Optional[list[float]]) -> None:
    """Custom timesteps: 1..64 values in [0, 1], strictly descending."""
    if timesteps is None:
        return
    if not 1 <= len(timesteps) <= 64:
        raise InvalidArgument(f"timesteps must hold 1 to 64 values, got {len(timesteps)}", field="timesteps")
    for value in timesteps:
        check_range("timesteps", value, 0.0, 1.0)
    if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise InvalidArgument(f"timesteps must be strictly descending, got {timesteps!r}", field="timesteps")


def check_tracks(params: GenerationParams) -> None:
    if params.track_name:
        check_choice("track_name", params.track_name, c.TRACK_NAMES)
    for name in params.track_classes:
        check_choice("track_classes", name, c.TRACK_NAMES)
    if params.track_classes and params.task_type != "complete":
        raise InvalidArgument("track_classes is only used by task_type 'complete'", field="track_classes")
    if params.track_name and params.task_type not in c.TRACK_TASKS:
        raise InvalidArgument("track_name is only used by task_type 'lego' or 'extract'", field="track_name")


CAPTION_TASKS = ("cover", "repaint", "lego", "complete")


def check_task_requirements(params: GenerationParams) -> None:
    """What each task type needs, as the documents list it (checked at the gateway): text2music a
    caption or lyrics; cover, repaint, lego and complete a caption; lego, extract and complete the
    track(s) to work on (``track_name`` / ``track_classes``, or named in the instruction)."""
    task = params.task_type
    if task == "text2music" and not params.caption.strip() and not params.lyrics.strip():
        raise InvalidArgument("task_type 'text2music' needs a caption or lyrics (at least one)", field="caption")
    if task in CAPTION_TASKS and not params.caption.strip():
        raise InvalidArgument(f"task_type {task!r} needs a caption describing the result", field="caption")
    if task in ("lego", "extract", "complete") and not (params.track_name or params.track_classes
                                                         or _names_a_track(params.instruction)):
        field = "track_classes" if task == "complete" else "track_name"
        raise InvalidArgument(f"task_type {task!r} needs the track: set {field} (one of "
                              f"{', '.join(c.TRACK_NAMES)}) or name it in the instruction", field=field)
    check_studio_requirements(params)


def check_task_inputs(params: GenerationParams) -> None:
    """Tasks that transform audio need the source audio (cover may use audio codes instead; extend
    and edit may name a finished item instead)."""
    task = params.task_type
    if task in ("extend", "edit") and not params.src_audio and not params.source_request_id:
        raise InvalidArgument(f"task_type {task!r} needs a source: src_audio or source_request_id (a finished "
                              "item of yours)", field="src_audio")
    if task not in SOURCE_TASKS or params.src_audio:
        return
    if task == "cover" and params.audio_codes.strip():
        return
    raise InvalidArgument(f"task_type {task!r} requires src_audio", field="src_audio")


def check_studio_fields(params: GenerationParams) -> None:
    """The studio operations' fields: ranges, choices, and no field of one operation on another task."""
    cfg_type = params.cfg_type or "apg"
    check_choice("cfg_type", cfg_type, CFG_TYPES)
    if params.use_adg and cfg_type != "apg":
        raise InvalidArgument(f"use_adg and cfg_type {cfg_type!r} both choose the guidance rule; set only one",
                              field="cfg_type")
    check_choice("edit_mode", params.edit_mode or "only_lyrics", EDIT_MODES)
    check_text("source_request_id", params.source_request_id, REQUEST_ID_MAX_CHARS)
    if any(unicodedata.category(ch) == "Cc" for ch in params.source_request_id):
        raise InvalidArgument("source_request_id must not contain control characters (it names a job)",
                              field="source_request_id")
    check_text("edit_target_caption", params.edit_target_caption, c.CAPTION_MAX_CHARS)
    check_text("edit_target_lyrics", params.edit_target_lyrics, c.LYRICS_MAX_CHARS)
    check_range("source_item_index", params.source_item_index, 0, c.BATCH_SIZE_MAX - 1)
    check_range("retake_variance", params.retake_variance, 0.0, 1.0)
    check_range("extend_left_seconds", params.extend_left_seconds, 0.0, c.DURATION_MAX_S, "seconds")
    check_range("extend_right_seconds", params.extend_right_seconds, 0.0, c.DURATION_MAX_S, "seconds")
    check_range("edit_n_min", params.edit_n_min, 0.0, 1.0)
    check_range("edit_n_max", params.edit_n_max, 0.0, 1.0)
    if params.edit_n_min > params.edit_n_max:
        raise InvalidArgument(f"edit_n_min ({params.edit_n_min}) must not exceed edit_n_max ({params.edit_n_max})",
                              field="edit_n_min")
    if len(params.retake_seeds) > c.BATCH_SIZE_MAX:
        raise InvalidArgument(f"retake_seeds must hold at most {c.BATCH_SIZE_MAX} values, got "
                              f"{len(params.retake_seeds)}", field="retake_seeds")
    for seed in params.retake_seeds:
        check_range("retake_seeds", seed, -1, MAX_SEED)
    if params.retake_seeds and params.task_type != "retake":
        raise InvalidArgument("retake_seeds is only used by task_type 'retake'", field="retake_seeds")
    if params.source_request_id and params.task_type not in STUDIO_TASK_TYPES:
        raise InvalidArgument(f"source_request_id is only used by task_type {', '.join(STUDIO_TASK_TYPES)}",
                              field="source_request_id")


def check_studio_requirements(params: GenerationParams) -> None:
    """What retake, extend and edit need besides their source (checked at the gateway)."""
    task = params.task_type
    if task == "retake" and not params.source_request_id:
        raise InvalidArgument("task_type 'retake' needs source_request_id: the job whose item to retake",
                              field="source_request_id")
    if task == "extend" and params.extend_left_seconds + params.extend_right_seconds <= 0:
        raise InvalidArgument("task_type 'extend' needs extend_left_seconds or extend_right_seconds > 0",
                              field="extend_right_seconds")
    if task == "edit" and (params.edit_mode or "only_lyrics") == "remix" and not params.edit_target_caption.strip():
        raise InvalidArgument("edit_mode 'remix' needs edit_target_caption (the new caption)",
                              field="edit_target_caption")


def _names_a_track(instruction: str) -> bool:
    words = instruction.lower().replace(",", " ").replace(":", " ").split()
    return any(name in words or name.replace("_", " ") in instruction.lower() for name in c.TRACK_NAMES)


def check_repaint_window(params: GenerationParams) -> None:
    check_range("repainting_start", params.repainting_start, -c.DURATION_MAX_S, c.DURATION_MAX_S, "seconds")
    end = params.repainting_end
    check_range("repainting_end", end, -math.inf, 2 * c.DURATION_MAX_S, "seconds")
    if end >= 0 and end <= params.repainting_start:
        raise InvalidArgument(
            f"repainting_end must be greater than repainting_start ({params.repainting_start}) "
            f"or negative for the end of the source, got {end}",
            field="repainting_end",
        )


def validate_params(params: GenerationParams, with_uploads: bool = True) -> None:
    """Check every field of GenerationParams; raises InvalidArgument on the first violation.
    ``with_uploads=False``: the audio uploads were left out on purpose (what the LM receives)."""
    check_choice("task_type", params.task_type, ALL_TASK_TYPES)
    check_choice("infer_method", params.infer_method, c.INFER_METHODS)
    for name, limit in _TEXT_LIMITS.items():
        check_text(name, getattr(params, name) or "", limit)
    for name, (low, high, unit) in _PARAM_RANGES.items():
        check_range(name, getattr(params, name), low, high, unit)
    if params.cfg_interval_start > params.cfg_interval_end:
        raise InvalidArgument(
            f"cfg_interval_start ({params.cfg_interval_start}) must not exceed cfg_interval_end "
            f"({params.cfg_interval_end})",
            field="cfg_interval_start",
        )
    check_bpm("bpm", params.bpm)
    check_duration("duration", params.duration)
    check_language("vocal_language", params.vocal_language)
    check_metadata_text("keyscale", params.keyscale)
    check_metadata_text("timesignature", params.timesignature)
    check_timesteps(params.timesteps)
    check_repaint_window(params)
    check_tracks(params)
    lora_blend(params)
    check_studio_fields(params)
    if params.audio_codes.strip():
        codes = parse_strict(params.audio_codes, field="audio_codes")
        max_codes = int(c.DURATION_MAX_S * c.CODES_PER_SECOND)
        if len(codes) > max_codes:
            raise InvalidArgument(f"audio_codes must hold at most {max_codes} codes (600 s), got {len(codes)}",
                                  field="audio_codes")
    if with_uploads:
        check_task_inputs(params)


def validate_config(config: GenerationConfig) -> None:
    check_range("batch_size", config.batch_size, c.BATCH_SIZE_MIN, c.BATCH_SIZE_MAX)
    check_range("lm_batch_chunk_size", config.lm_batch_chunk_size, 1, c.BATCH_SIZE_MAX)
    check_choice("audio_format", config.audio_format, c.AUDIO_FORMATS)
    seeds = [config.seeds] if isinstance(config.seeds, int) else (config.seeds or [])
    if len(seeds) > c.BATCH_SIZE_MAX:
        raise InvalidArgument(f"seeds must hold at most {c.BATCH_SIZE_MAX} values, got {len(seeds)}", field="seeds")
    for seed in seeds:
        check_range("seeds", seed, -1, MAX_SEED)


def validate_generation(params: GenerationParams, config: GenerationConfig) -> None:
    """A whole request as the gateway receives it."""
    validate_params(params)
    check_task_requirements(params)
    validate_config(config)


def _check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    check_range("temperature", temperature, 0.0, 2.0)
    check_range("top_k", top_k, 0, 1000)
    check_range("top_p", top_p, 0.0, 1.0)
    check_range("repetition_penalty", repetition_penalty, 0.5, 2.0)


def validate_understand(params: UnderstandParams) -> None:
    _check_sampling(params.temperature, params.top_k, params.top_p, params.repetition_penalty)
    if params.audio_codes.strip() and params.audio_codes.strip() != c.NO_USER_INPUT:
        parse_strict(params.audio_codes, field="audio_codes")


def validate_create_sample(params: CreateSampleParams) -> None:
    _check_sampling(params.temperature, params.top_k, params.top_p, params.repetition_penalty)
    check_text("query", params.query, c.CAPTION_MAX_CHARS)
    check_language("vocal_language", params.vocal_language)


def validate_format_sample(params: FormatSampleParams) -> None:
    _check_sampling(params.temperature, params.top_k, params.top_p, params.repetition_penalty)
    check_text("caption", params.caption, c.CAPTION_MAX_CHARS)
    check_text("lyrics", params.lyrics, c.LYRICS_MAX_CHARS)
    meta = params.user_metadata
    check_bpm("user_metadata.bpm", meta.bpm)
    check_duration("user_metadata.duration", meta.duration)
    check_metadata_text("user_metadata.keyscale", meta.keyscale)
    check_metadata_text("user_metadata.timesignature", meta.timesignature)
    check_language("user_metadata.language", meta.language)


def clip_text(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` at a word boundary when one lies in the second half, else hard."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def valid_lm_metadata(meta: MusicMetadata) -> MusicMetadata:
    """What the LM wrote, made valid input for ``GenerationParams`` (what the service returns must
    always be accepted back): caption and lyrics clipped to their limits at a word boundary, and a
    bpm, duration, keyscale, time signature or language that validation would refuse dropped."""

    def accepted(check, *args) -> bool:
        try:
            check(*args)
        except InvalidArgument:
            return False
        return True

    bpm = meta.bpm if isinstance(meta.bpm, int) and accepted(check_bpm, "bpm", meta.bpm) else None
    duration = meta.duration
    if duration is not None and not (c.DURATION_MIN_S <= duration <= c.DURATION_MAX_S):
        duration = None
    return dataclasses.replace(
        meta, caption=clip_text(meta.caption, c.CAPTION_MAX_CHARS), lyrics=clip_text(meta.lyrics, c.LYRICS_MAX_CHARS),
        bpm=bpm, duration=duration,
        keyscale=meta.keyscale if accepted(check_metadata_text, "keyscale", meta.keyscale) else "",
        timesignature=meta.timesignature if accepted(check_metadata_text, "timesignature", meta.timesignature) else "",
        language=meta.language if accepted(check_language, "language", meta.language) else "")
