"""How one Synthesize request maps onto the loaded DiT variant (request policy, no GPU work).

* Variants: turbo runs the fixed 8-step table (or custom timesteps) without CFG, so its guidance
  scale is forced to 1; it supports text2music, repaint and cover only, at most 20 steps. Base /
  sft models run ``inference_steps`` with APG (or ADG) guidance and support all six tasks.
* LM codes turn text2music into a cover of the decoded hints (reference-dit §4.7); the item's
  length is then 5 latent frames per code. Source tasks take their length from the source
  (plus outpaint padding); text2music takes the requested duration (30 s when automatic).
* ``audio_cover_strength`` matters for cover rows only; other rows always use 1.
* Studio operations (docs/studio.md): ``extend`` is a repaint of new frames on both sides of the
  source (both variants); ``edit`` runs the flow edit (``dit_service.flow_edit``) from the source
  to the target caption/lyrics, in batches of its own. ``retake`` never reaches the DiT: the
  gateway sends the source item's own task with per-item noise mixes (``RowSpec.noise_mix``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from torch import Tensor

from dit_service import conditioning
from dit_service.conditioning import SourcePlan
from dit_service.guidance import GuidanceSettings
from dit_service.prompts import ConditioningText, build_metas_dict, extract_caption, metas_duration_s, task_instruction
from dit_service.sampler import SamplerSettings
from dit_service.studio import NoiseTerms
from shared.audio_codes import parse_codes
from shared.constants import (
    DEFAULT_DIT_INSTRUCTION,
    LATENT_FRAMES_PER_SECOND,
    TASK_TYPES,
    TASK_TYPES_TURBO,
    TURBO_MAX_STEPS,
)
from shared.errors import InvalidArgument, out_of_range
from shared.types import GenerationParams
from shared.validation import lora_blend

INSTRUMENTAL_LYRICS = "[Instrumental]"
DEFAULT_LANGUAGE = "en"
FRAMES_PER_CODE = 5
STUDIO_DIT_TASKS = ("extend", "edit")
DIT_TASK_TYPES = (*TASK_TYPES, *STUDIO_DIT_TASKS)
DIT_TASK_TYPES_TURBO = (*TASK_TYPES_TURBO, *STUDIO_DIT_TASKS)
_INSTRUCTION_TASK = {"extend": "repaint", "edit": "text2music"}  # the trained instruction each one uses


@dataclass(frozen=True)
class RowSpec:
    """One output item: its request's plan, its index in the request, its seed and LM codes."""

    plan: "RequestPlan"
    item_index: int
    seed: int
    codes: tuple[int, ...] = ()
    noise_mix: NoiseTerms = ()          # retake: weighted seeds of the item's draws; empty: seed alone


@dataclass(frozen=True)
class EditSpec:
    """What an edit request changes: the target caption/lyrics and the edited slice of the steps."""

    target: ConditioningText
    n_min: float
    n_max: float


@dataclass(eq=False)
class RequestPlan:
    """A request resolved for the loaded variant; the tensor fields are filled on the worker."""

    task_type: str                      # effective task ("cover" for text2music with codes)
    is_cover: bool
    instruction: str
    text: ConditioningText              # caption/lyrics/language; metas are per row (see text_for)
    duration_s: float                   # requested duration, <= 0: automatic
    audio_cover_strength: float
    sampling: SamplerSettings
    guidance: GuidanceSettings
    num_steps: int
    vae_seed: int
    source_plan: Optional[SourcePlan] = None
    edit: Optional[EditSpec] = None                 # task "edit": the flow edit's target
    src_audio: Optional[np.ndarray] = None          # [2, S] at 48 kHz
    given_src_latents: Optional[np.ndarray] = None  # [T, 64]
    refer_audio: Optional[np.ndarray] = None        # [2, S] at 48 kHz
    metas_fields: tuple = ()                        # (bpm, keyscale, timesignature)
    loras: tuple[tuple[str, float], ...] = ()       # LoRA blend (lora_id, scale), scale-0 entries dropped
    adapters: tuple = field(default=(), repr=False)  # the blend's loaded adapters (set while the request runs)
    prepared: bool = False
    src_latents: Optional[Tensor] = field(default=None, repr=False)
    refer_latents: Optional[Tensor] = field(default=None, repr=False)
    cover_hints: Optional[Tensor] = field(default=None, repr=False)

    @property
    def batch_key(self) -> Hashable:
        """Requests with equal keys can share a denoising batch."""
        timesteps = self.sampling.build().timesteps
        edit_key = None if self.edit is None else (self.edit.n_min, self.edit.n_max)  # edits run their own loop
        return (self.sampling.is_turbo, self.sampling.infer_method, timesteps, self.guidance, self.audio_cover_strength,
                edit_key)

    def num_frames_for(self, row: RowSpec) -> int:
        """The item's own length in latent frames."""
        if row.codes:
            return FRAMES_PER_CODE * len(row.codes)
        if self.source_plan is not None:
            return self.source_plan.num_frames
        return conditioning.text2music_frames(self.duration_s)

    def text_for(self, row: RowSpec) -> ConditioningText:
        """Caption-branch inputs of one item (the metas state the item's duration)."""
        natural_s = self.num_frames_for(row) / LATENT_FRAMES_PER_SECOND
        given_s = None if (self.source_plan is None and not row.codes) else natural_s
        bpm, keyscale, timesignature = self.metas_fields
        metas = build_metas_dict(bpm, keyscale, timesignature, metas_duration_s(self.duration_s, given_s))
        return ConditioningText(self.instruction, self.text.caption, self.text.lyrics, self.text.vocal_language, metas)

    def target_text_for(self, row: RowSpec) -> ConditioningText:
        """An edit item's target caption-branch inputs (the source's metas and instruction)."""
        if self.edit is None:
            raise InvalidArgument("only task_type 'edit' has a target text", field="task_type")
        source = self.text_for(row)
        return ConditioningText(source.instruction, self.edit.target.caption, self.edit.target.lyrics,
                                source.vocal_language, source.metas)


@dataclass(frozen=True)
class Sources:
    """Decoded inputs of a request: 48 kHz stereo ``[2, S]`` float32 arrays and/or latents ``[T, 64]``."""

    src_audio: Optional[np.ndarray] = None
    src_latents: Optional[np.ndarray] = None
    refer_audio: Optional[np.ndarray] = None


def check_variant(params: GenerationParams, is_turbo: bool, model_name: str) -> None:
    """Task types and step counts the loaded variant supports."""
    if params.task_type == "retake":
        raise InvalidArgument("task_type 'retake' is resolved by the gateway, which sends the source item's own task "
                              "with mixed noise (SynthesisItem.noise_mix)", field="task_type")
    if params.task_type not in DIT_TASK_TYPES:
        raise InvalidArgument(f"task_type must be one of {', '.join(DIT_TASK_TYPES)}; got {params.task_type!r}",
                              field="task_type")
    if is_turbo and params.task_type not in DIT_TASK_TYPES_TURBO:
        raise InvalidArgument(
            f"task_type {params.task_type!r} is not supported by the turbo model {model_name} (it supports "
            f"{', '.join(DIT_TASK_TYPES_TURBO)}); use a base model for lego, extract and complete", field="task_type")
    if is_turbo and params.inference_steps > TURBO_MAX_STEPS:
        raise out_of_range("inference_steps", params.inference_steps, 1, TURBO_MAX_STEPS, "steps for turbo models")


def item_codes(params: GenerationParams, per_item: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Codes of each item: the item's own, else ``params.audio_codes`` for all; all or none."""
    shared_codes = tuple(parse_codes(params.audio_codes)) if params.audio_codes.strip() else ()
    codes = [tuple(int(c) for c in own) or shared_codes for own in per_item]
    if any(codes) and not all(codes):
        raise InvalidArgument("items: either every item or none carries audio_codes", field="items")
    if params.task_type not in ("text2music", "cover"):
        return [() for _ in codes]  # source tasks take their structure from the source audio
    return codes


def plan_request(params: GenerationParams, sources: Sources, *, has_codes: bool, is_turbo: bool,
                 model_name: str, vae_seed: int) -> RequestPlan:
    """Resolve ``params`` for the loaded variant. ``has_codes``: the items carry LM codes."""
    check_variant(params, is_turbo, model_name)
    is_cover = params.task_type == "cover" or (params.task_type == "text2music" and has_codes)
    task = "cover" if is_cover else params.task_type
    source_plan = _source_plan(params, sources, task, has_codes)
    if task == "cover" and source_plan is None and not has_codes:
        raise InvalidArgument("task_type 'cover' requires src_audio or audio_codes", field="src_audio")
    if sources.refer_audio is not None and float(np.max(np.abs(sources.refer_audio))) < 1e-6:
        raise InvalidArgument("reference_audio is silent", field="reference_audio")
    lyrics = INSTRUMENTAL_LYRICS if params.instrumental else params.lyrics  # "regardless of lyrics"
    text = ConditioningText(caption=extract_caption(params.caption), lyrics=lyrics,
                            vocal_language=params.vocal_language or DEFAULT_LANGUAGE)
    return RequestPlan(
        task_type=task, is_cover=is_cover, instruction=_instruction(params, task, has_codes), text=text,
        duration_s=params.duration, audio_cover_strength=params.audio_cover_strength if is_cover else 1.0,
        sampling=_sampling(params, is_turbo), guidance=_guidance(params, is_turbo),
        num_steps=_sampling(params, is_turbo).build().num_steps, vae_seed=vae_seed, source_plan=source_plan,
        src_audio=sources.src_audio if source_plan is not None else None,
        given_src_latents=sources.src_latents if source_plan is not None and sources.src_audio is None else None,
        refer_audio=sources.refer_audio, metas_fields=(params.bpm, params.keyscale, params.timesignature),
        edit=_edit_spec(params, text) if task == "edit" else None,
        loras=tuple((lora_id, scale) for lora_id, scale in lora_blend(params) if scale > 0),
    )


def _source_plan(params: GenerationParams, sources: Sources, task: str, has_codes: bool) -> Optional[SourcePlan]:
    """Source layout for source tasks; None for text2music and for covers of LM codes."""
    if task not in conditioning.SOURCE_TASKS or (has_codes and task not in STUDIO_DIT_TASKS):
        return None
    if sources.src_audio is not None:
        num_frames = conditioning.frames_for_samples(sources.src_audio.shape[-1])
    elif sources.src_latents is not None:
        num_frames = int(sources.src_latents.shape[0])
    else:
        if task == "cover":
            return None
        raise InvalidArgument(f"task_type {task!r} requires src_audio", field="src_audio")
    if task == "extend":
        return conditioning.plan_extend(num_frames, params.extend_left_seconds, params.extend_right_seconds)
    return conditioning.plan_source(num_frames, task, params.repainting_start, params.repainting_end)


def _edit_spec(params: GenerationParams, source: ConditioningText) -> EditSpec:
    """Remix takes the new caption, only_lyrics keeps the source's; empty target lyrics keep the source's."""
    caption = extract_caption(params.edit_target_caption) if params.edit_mode == "remix" else source.caption
    lyrics = params.edit_target_lyrics if params.edit_target_lyrics.strip() else source.lyrics
    target = ConditioningText(caption=caption, lyrics=lyrics, vocal_language=source.vocal_language)
    return EditSpec(target=target, n_min=params.edit_n_min, n_max=params.edit_n_max)


def _instruction(params: GenerationParams, task: str, has_codes: bool) -> str:
    """A custom instruction wins, except for covers of LM codes (always the cover instruction)."""
    custom = params.instruction.strip()
    if custom and custom != DEFAULT_DIT_INSTRUCTION and not has_codes:
        return custom
    classes = list(params.track_classes) or None
    return task_instruction(_INSTRUCTION_TASK.get(task, task), params.track_name or None, classes)


def _sampling(params: GenerationParams, is_turbo: bool) -> SamplerSettings:
    timesteps = tuple(params.timesteps) if params.timesteps else None
    return SamplerSettings(is_turbo=is_turbo, infer_method=params.infer_method, shift=params.shift,
                           num_steps=params.inference_steps, timesteps=timesteps)


def _guidance(params: GenerationParams, is_turbo: bool) -> GuidanceSettings:
    """Turbo is guidance-distilled: scale forced to 1 (no CFG)."""
    if is_turbo:
        return GuidanceSettings()
    return GuidanceSettings(scale=params.guidance_scale, use_adg=params.use_adg,
                            interval_start=params.cfg_interval_start, interval_end=params.cfg_interval_end,
                            cfg_type=params.cfg_type or "apg")
