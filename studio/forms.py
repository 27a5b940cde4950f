"""The page's form values → the SDK's request types, one function per tab.

Each function takes the values of one tab, keyed by the tab's API parameter names (v1's names
where v1 had the control: ``prompt``, ``audio_duration``, ``infer_step``, ``manual_seeds``,
``json_data``, ``retake_variance``, ``edit_type``, ``left_extend_length``, ...), and returns a
``(GenerationParams, GenerationConfig)`` pair. Nothing here talks to the gateway: a source that
is a finished result is passed on as ``(request_id, item_index)`` (:class:`SourceRef`), and the
caller fetches audio bytes where a task needs them. Bad values raise :class:`InvalidInput`,
naming the parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from shared.types import GenerationConfig, GenerationParams

Values = Mapping[str, Any]
AUDIO_FORMATS = ("flac", "wav", "mp3", "ogg")
# v1's guidance rules (cfg_type) plus 1.5's ADG ("adg" sets use_adg; the others set cfg_type).
CFG_TYPES = ("apg", "cfg", "cfg_star", "adg")
SOURCE_CHOICES = ("text2music", "upload")  # v1's names: a result sent to the tab, or an uploaded file
EDIT_TYPES = ("only_lyrics", "remix")
MAX_OP_ITEMS = 4  # items one Retake / Repaint / Edit / Extend / Cover run may make on the page


class InvalidInput(ValueError):
    """A form value the page refuses before calling the gateway."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SourceRef:
    """A finished item of an earlier job."""

    request_id: str
    item_index: int


Source = Union[SourceRef, str]  # a result, or the path of an uploaded file


def parse_seeds(text: Any, field: str) -> list[int]:
    """``"12345"``, ``"1, 2, 3"`` or ``"1 2"`` → ints; empty → [] (random seeds)."""
    if text is None:
        return []
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return [int(text)]
    parts = [part for part in re.split(r"[,\s]+", str(text).strip()) if part]
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise InvalidInput(field, f"{field} must be integers separated by commas, got {text!r}") from None


def optional_int(value: Any) -> Optional[int]:
    """A Number field left empty or at 0 means "let the LM plan it"."""
    if value in (None, "") or float(value) <= 0:
        return None
    return int(round(float(value)))


def _choice(values: Values, field: str, choices: tuple[str, ...], default: str) -> str:
    value = values.get(field) or default
    if value not in choices:
        raise InvalidInput(field, f"{field} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _config(values: Values, seeds_field: str, batch_size: int) -> GenerationConfig:
    seeds = parse_seeds(values.get(seeds_field), seeds_field)
    return GenerationConfig(batch_size=batch_size, use_random_seed=not seeds, seeds=seeds or None,
                            audio_format=_choice(values, "format", AUDIO_FORMATS, "flac"))


def _dit_settings(values: Values) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if values.get("infer_step") is not None:
        settings["inference_steps"] = int(values["infer_step"])
    if values.get("guidance_scale") is not None:
        settings["guidance_scale"] = float(values["guidance_scale"])
    return settings


def _guidance(values: Values) -> dict[str, Any]:
    cfg_type = _choice(values, "cfg_type", CFG_TYPES, "apg")
    return {"use_adg": True} if cfg_type == "adg" else {"cfg_type": cfg_type, "use_adg": False}


def generate_request(values: Values) -> tuple[GenerationParams, GenerationConfig]:
    """The Generate tab (v1's Text2Music)."""
    lora = (values.get("lora_name_or_path") or "").strip()
    params = GenerationParams(
        task_type="text2music", caption=values.get("prompt") or "", lyrics=values.get("lyrics") or "",
        instrumental=bool(values.get("instrumental")), vocal_language=values.get("vocal_language") or "unknown",
        bpm=optional_int(values.get("bpm")), keyscale=(values.get("keyscale") or "").strip(),
        timesignature=str(values.get("timesignature") or ""), duration=float(values.get("audio_duration", -1)),
        **_guidance(values),
        shift=float(values.get("shift", 1.0)), infer_method=values.get("infer_method") or "ode",
        cfg_interval_start=float(values.get("cfg_interval_start", 0.0)),
        cfg_interval_end=float(values.get("cfg_interval_end", 1.0)),
        thinking=bool(values.get("thinking")), lm_temperature=float(values.get("lm_temperature", 0.85)),
        lm_cfg_scale=float(values.get("lm_cfg_scale", 2.0)), lm_top_k=int(values.get("lm_top_k") or 0),
        lm_top_p=float(values.get("lm_top_p", 0.9)), lm_negative_prompt=values.get("lm_negative_prompt") or "NO USER INPUT",
        use_cot_metas=bool(values.get("use_cot_metas")), use_cot_caption=bool(values.get("use_cot_caption")),
        use_cot_language=bool(values.get("use_cot_language")),
        reference_audio=values.get("ref_audio_input") or None,
        lora_id=lora if lora and lora.lower() != "none" else None, lora_scale=float(values.get("lora_weight", 1.0)),
        **_dit_settings(values),
    )
    return params, _config(values, "manual_seeds", int(values.get("batch_size") or 1))


def source_ref(json_data: Any) -> Optional[SourceRef]:
    """The result a parameters JSON (a result panel's, or one sent to a tab) points at."""
    if not isinstance(json_data, Mapping) or not json_data.get("request_id"):
        return None
    return SourceRef(str(json_data["request_id"]), int(json_data.get("item_index") or 0))


def pick_source(values: Values, choice_field: str) -> Source:
    """``upload`` takes ``source_audio``; ``text2music`` takes the result in ``json_data``, or the
    upload when no result was sent to the tab (so v1's API scripts that pass both keep working)."""
    choice = _choice(values, choice_field, SOURCE_CHOICES, "text2music")
    upload = values.get("source_audio") or None
    ref = source_ref(values.get("json_data"))
    if choice == "upload" or ref is None:
        if upload:
            return str(upload)
        what = "upload a file in source_audio" if choice == "upload" else \
            "send a result here (its 'Send to' buttons) or upload a file in source_audio"
        raise InvalidInput("source_audio", f"no source audio: {what}")
    return ref


def _source_params(json_data: Any) -> dict[str, Any]:
    params = json_data.get("params") if isinstance(json_data, Mapping) else None
    return params if isinstance(params, Mapping) else {}


def _source_fields(source: Source) -> dict[str, Any]:
    if isinstance(source, SourceRef):
        return {"source_request_id": source.request_id, "source_item_index": source.item_index}
    return {"src_audio": source}


def _op_batch(values: Values, seeds_field: str) -> int:
    seeds = parse_seeds(values.get(seeds_field), seeds_field)
    if len(seeds) > MAX_OP_ITEMS:
        raise InvalidInput(seeds_field, f"{seeds_field} may hold at most {MAX_OP_ITEMS} seeds on this page, "
                                        f"got {len(seeds)}")
    return max(1, len(seeds))


def _text_or_source(values: Values, field: str, source_key: str) -> str:
    return values.get(field) or _source_params(values.get("json_data")).get(source_key) or ""


def retake_request(values: Values) -> tuple[GenerationParams, GenerationConfig]:
    """Retake: the source item again, its initial noise mixed with each retake seed's noise."""
    ref = source_ref(values.get("json_data"))
    if ref is None:
        raise InvalidInput("json_data", "json_data names no result: generate a song and use its "
                                        "'Send to Retake' button, or pass a result's parameters JSON")
    _op_batch(values, "retake_seeds")
    seeds = parse_seeds(values.get("retake_seeds"), "retake_seeds") or [-1]  # -1: a random seed
    params = GenerationParams(task_type="retake", source_request_id=ref.request_id,
                              source_item_index=ref.item_index, retake_seeds=seeds,
                              retake_variance=float(values.get("retake_variance", 0.2)),
                              src_audio=values.get("source_audio") or None)  # an upload-made source's upload
    source_format = {"format": values["json_data"].get("format") or "flac"}  # the source's format
    return params, GenerationConfig(batch_size=len(seeds),
                                    audio_format=_choice(source_format, "format", AUDIO_FORMATS, "flac"))


def extend_request(values: Values, source: Source) -> tuple[GenerationParams, GenerationConfig]:
    """Extend: new music before and/or after the source, its middle kept, in one call."""
    params = GenerationParams(task_type="extend", caption=_text_or_source(values, "prompt", "caption"),
                              lyrics=_text_or_source(values, "lyrics", "lyrics"),
                              extend_left_seconds=float(values.get("left_extend_length") or 0.0),
                              extend_right_seconds=float(values.get("right_extend_length") or 0.0),
                              **_source_fields(source), **_dit_settings(values))
    return params, _config(values, "extend_seeds", _op_batch(values, "extend_seeds"))


def _edit_slice(values: Values) -> dict[str, float]:
    """The page keeps v1's ``edit_n_min``/``edit_n_max``, counted from the noise end of the
    trajectory; the SDK counts from the data end, so v1's ``(a, b)`` is the SDK's ``(1 - b, 1 - a)``."""
    n_min = float(values.get("edit_n_min") if values.get("edit_n_min") is not None else 0.6)
    n_max = float(values.get("edit_n_max") if values.get("edit_n_max") is not None else 1.0)
    return {"edit_n_min": round(1.0 - n_max, 6), "edit_n_max": round(1.0 - n_min, 6)}


def edit_request(values: Values, source: Source) -> tuple[GenerationParams, GenerationConfig]:
    """Edit: the source with a new caption and/or lyrics, its structure kept (v1: an empty
    target caption or lyrics means the source's)."""
    caption = _text_or_source(values, "prompt", "caption")
    lyrics = _text_or_source(values, "lyrics", "lyrics")
    params = GenerationParams(task_type="edit", caption=caption, lyrics=lyrics,
                              edit_mode=_choice(values, "edit_type", EDIT_TYPES, "only_lyrics"),
                              edit_target_caption=values.get("edit_prompt") or caption,
                              edit_target_lyrics=values.get("edit_lyrics") or lyrics,
                              **_edit_slice(values),
                              **_source_fields(source), **_dit_settings(values))
    return params, _config(values, "edit_seeds", _op_batch(values, "edit_seeds"))


def repaint_request(values: Values, src_audio: Any) -> tuple[GenerationParams, GenerationConfig]:
    """Repaint: regenerate ``[repaint_start, repaint_end)`` seconds of the source audio."""
    params = GenerationParams(task_type="repaint", src_audio=src_audio,
                              caption=_text_or_source(values, "prompt", "caption"),
                              lyrics=_text_or_source(values, "lyrics", "lyrics"),
                              repainting_start=float(values.get("repaint_start") or 0.0),
                              repainting_end=float(values.get("repaint_end", -1.0)), **_dit_settings(values))
    return params, _config(values, "retake_seeds", _op_batch(values, "retake_seeds"))


def cover_request(values: Values, src_audio: Any) -> tuple[GenerationParams, GenerationConfig]:
    """Cover: the source re-performed after a new caption (and lyrics)."""
    params = GenerationParams(task_type="cover", src_audio=src_audio,
                              caption=_text_or_source(values, "prompt", "caption"),
                              lyrics=_text_or_source(values, "lyrics", "lyrics"),
                              audio_cover_strength=float(values.get("audio_cover_strength", 1.0)),
                              **_dit_settings(values))
    return params, _config(values, "manual_seeds", _op_batch(values, "manual_seeds"))
