"""The LM steps ACE-Step's REST server runs around a generation, as pure functions of our types.

``sample_mode`` / ``sample_query`` have the LM write caption, lyrics and metadata first
(CreateSample); ``use_format`` has it rewrite the given caption and lyrics (FormatSample);
``/format_input`` and ``/create_random_sample`` are those two steps on their own. The router makes
the gateway calls; everything deciding what goes in and what comes out lives here.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from http_service.compat_fields import FieldError, ReleaseRequest, as_float, as_int, as_object, as_str, show
from shared.constants import NO_USER_INPUT
from shared.types import (
    CreateSampleParams,
    CreateSampleResult,
    FormatSampleParams,
    FormatSampleResult,
    GenerationParams,
    MusicMetadata,
)

# Words of a description that name a vocal language (upstream reads the same hints from sample_query).
_LANGUAGE_WORDS = {
    "english": "en", "chinese": "zh", "mandarin": "zh", "中文": "zh", "cantonese": "yue", "japanese": "ja",
    "日本語": "ja", "korean": "ko", "한국어": "ko", "spanish": "es", "español": "es", "french": "fr",
    "français": "fr", "german": "de", "deutsch": "de", "italian": "it", "italiano": "it", "portuguese": "pt",
    "português": "pt", "russian": "ru", "русский": "ru", "bengali": "bn", "hindi": "hi", "arabic": "ar",
    "thai": "th", "vietnamese": "vi", "indonesian": "id", "turkish": "tr", "dutch": "nl", "polish": "pl",
}
_DEFAULT_LANGUAGES = ("", "en", "unknown")
FORMAT_INPUT_FIELDS = ("prompt", "lyrics", "temperature", "param_obj", "paramObj", "time_signature",
                       "timeSignature", "ai_token", "aiToken")
RANDOM_SAMPLE_FIELDS = ("sample_type", "sampleType", "ai_token", "aiToken")
SAMPLE_TYPES = ("simple_mode", "custom_mode")


def description_hints(description: str) -> tuple[Optional[str], bool]:
    """``(language code or None, instrumental)`` read from a song description."""
    text = description.lower()
    words = set(re.findall(r"[^\W\d_]+", text))
    language = next((code for word, code in _LANGUAGE_WORDS.items() if word in words or
                     (not word.isascii() and word in text)), None)
    instrumental = ("instrumental" in text or "pure music" in text or "pure instrument" in text
                    or text.strip() == "solo" or text.rstrip().endswith(" solo"))
    return language, instrumental


def _lm_sampling(params: GenerationParams) -> dict[str, Any]:
    return {"temperature": params.lm_temperature, "top_k": params.lm_top_k,
            "top_p": params.lm_top_p if params.lm_top_p < 1.0 else 1.0, "use_constrained_decoding": True}


def sample_request(request: ReleaseRequest) -> CreateSampleParams:
    """What ``sample_mode`` / ``sample_query`` ask the LM for."""
    query = request.sample_query or NO_USER_INPUT
    language, instrumental = description_hints(request.sample_query)
    chosen = request.params.vocal_language
    vocal_language = chosen if chosen not in _DEFAULT_LANGUAGES else (language or "unknown")
    return CreateSampleParams(query=query, instrumental=instrumental, vocal_language=vocal_language,
                              **_lm_sampling(request.params))


def apply_sample(params: GenerationParams, sample: CreateSampleResult) -> None:
    """The sample replaces caption, lyrics and metadata; its language is used unless the request
    named one other than upstream's default ``en``."""
    params.caption, params.lyrics = sample.caption, sample.lyrics
    params.bpm, params.keyscale, params.timesignature = sample.bpm, sample.keyscale, sample.timesignature
    params.duration = sample.duration or -1.0
    if params.vocal_language in _DEFAULT_LANGUAGES and sample.language:
        params.vocal_language = sample.language


def format_request(params: GenerationParams) -> FormatSampleParams:
    """What ``use_format`` asks the LM for: the request's caption and lyrics, its metadata kept."""
    meta = MusicMetadata(bpm=params.bpm, keyscale=params.keyscale, timesignature=params.timesignature,
                         duration=params.duration if params.duration > 0 else None,
                         language=params.vocal_language if params.vocal_language != "unknown" else "")
    return FormatSampleParams(caption=params.caption, lyrics=params.lyrics, user_metadata=meta, **_lm_sampling(params))


def apply_format(params: GenerationParams, formatted: FormatSampleResult) -> bool:
    """Non-empty results replace the request's values; returns whether a duration came back."""
    params.caption = formatted.caption or params.caption
    params.lyrics = formatted.lyrics or params.lyrics
    params.bpm = formatted.bpm or params.bpm
    params.keyscale = formatted.keyscale or params.keyscale
    params.timesignature = formatted.timesignature or params.timesignature
    if formatted.duration:
        params.duration = formatted.duration
        return True
    return False


def _check_fields(body: dict[str, Any], known: tuple[str, ...]) -> None:
    for key in body:
        if key not in known:
            raise FieldError(show(key), f"unknown field; expected some of {', '.join(known)}")


def read_format_input(body: dict[str, Any]) -> FormatSampleParams:
    """``/format_input``: ``prompt``, ``lyrics``, ``temperature`` and ``param_obj`` (duration, bpm,
    key or key_scale, time_signature, language)."""
    _check_fields(body, FORMAT_INPUT_FIELDS)
    prompt = as_str("prompt", body.get("prompt") or "")
    lyrics = as_str("lyrics", body.get("lyrics") or "")
    temperature = as_float("temperature", body["temperature"]) if body.get("temperature") not in (None, "") else 0.85
    raw_obj = body.get("param_obj", body.get("paramObj"))
    obj = as_object("param_obj", raw_obj) if raw_obj not in (None, "") else {}
    duration = as_float("param_obj.duration", obj["duration"]) if obj.get("duration") not in (None, "") else None
    bpm = as_int("param_obj.bpm", obj["bpm"]) if obj.get("bpm") not in (None, "") else None
    keyscale = as_str("param_obj.key", obj.get("key") or obj.get("key_scale") or "")
    time_signature = obj.get("time_signature") or body.get("time_signature") or body.get("timeSignature") or ""
    language = as_str("param_obj.language", obj.get("language") or "")
    meta = MusicMetadata(bpm=bpm, keyscale=keyscale, timesignature=as_str("time_signature", time_signature),
                         duration=float(int(duration)) if duration and duration > 0 else None,
                         language=language if language != "unknown" else "")
    return FormatSampleParams(caption=prompt, lyrics=lyrics, user_metadata=meta, temperature=temperature,
                              use_constrained_decoding=True)


def format_input_data(request: FormatSampleParams, result: FormatSampleResult) -> dict[str, Any]:
    """Upstream's answer: the LM's values, the request's where the LM gave none."""
    given = request.user_metadata
    return {"caption": result.caption or request.caption, "lyrics": result.lyrics or request.lyrics,
            "bpm": result.bpm or given.bpm, "key_scale": result.keyscale or given.keyscale,
            "time_signature": result.timesignature or given.timesignature,
            "duration": result.duration or given.duration,
            "vocal_language": result.language or given.language or "unknown"}


def read_random_sample(body: dict[str, Any]) -> CreateSampleParams:
    """``/create_random_sample``: ``sample_type`` is ``simple_mode`` (default) or ``custom_mode``;
    both have the LM invent a song (upstream picks one of its bundled example files instead)."""
    _check_fields(body, RANDOM_SAMPLE_FIELDS)
    sample_type = as_str("sample_type", body.get("sample_type", body.get("sampleType")) or "simple_mode")
    if sample_type not in SAMPLE_TYPES:
        raise FieldError("sample_type", f"must be one of {', '.join(SAMPLE_TYPES)}, got {show(sample_type)}")
    return CreateSampleParams(query=NO_USER_INPUT)


def random_sample_data(result: CreateSampleResult) -> dict[str, Any]:
    return {"caption": result.caption, "lyrics": result.lyrics, "bpm": result.bpm, "key_scale": result.keyscale,
            "time_signature": result.timesignature, "duration": result.duration,
            "vocal_language": result.language or "unknown"}
