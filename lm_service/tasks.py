"""Understand, create_sample and format_sample: one constrained LM generation each, then the
reference's output parsing (metadata from the CoT block, lyrics after it). No CFG, as in the
reference. What they return is always valid input for ``GenerationParams`` (``valid_lm_metadata``:
long captions are clipped at a word boundary, out-of-range values dropped)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

from lm_service.constraints.spec import ConstraintSpec
from lm_service.cot import build_user_metadata
from lm_service.output_parser import extract_lyrics, parse_lm_output
from lm_service.plan import max_new_tokens, to_music_metadata
from lm_service.prompts import create_sample_prompt, format_sample_prompt, understand_prompt
from lm_service.runtime import LmRuntime, SamplingInput
from shared.constants import NO_USER_INPUT
from shared.validation import valid_lm_metadata
from shared.types import (
    CreateSampleParams,
    CreateSampleResult,
    FormatSampleParams,
    FormatSampleResult,
    MusicMetadata,
    UnderstandParams,
    UnderstandResult,
)


@dataclass(frozen=True)
class TaskOutput:
    metadata: MusicMetadata
    seconds: float


def _sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> SamplingInput:
    return SamplingInput(temperature=temperature, top_k=top_k, top_p=top_p if 0.0 < top_p < 1.0 else 1.0,
                         repetition_penalty=repetition_penalty)


class LmTasks:
    """``strict_cot``: the tightened CoT rules of ``metadata_fsm`` (``--lm-strict-cot``)."""

    def __init__(self, runtime: LmRuntime, strict_cot: bool = False) -> None:
        self.runtime = runtime
        self.strict_cot = strict_cot

    async def _run(self, request_id: str, prompt, spec: Optional[ConstraintSpec], sampling: SamplingInput,
                   default_lyrics: str = "") -> TaskOutput:
        started = time.perf_counter()
        budget = self.runtime.text_budget(max_new_tokens(None, "understand", self.runtime.max_model_len))
        request = self.runtime.request(prompt, spec, sampling, budget, request_id=request_id)
        output = await self.runtime.run(request)
        values = parse_lm_output(output.text).metadata
        lyrics = extract_lyrics(output.text) or default_lyrics
        return TaskOutput(valid_lm_metadata(to_music_metadata(values, lyrics)), time.perf_counter() - started)

    async def understand(self, request_id: str, params: UnderstandParams) -> UnderstandResult:
        codes = params.audio_codes if params.audio_codes.strip() else NO_USER_INPUT
        spec = ConstraintSpec(phase="understand", skip_genres=False, strict=self.strict_cot,
                              debug=params.constrained_decoding_debug) \
            if params.use_constrained_decoding else None
        sampling = _sampling(params.temperature, params.top_k, params.top_p, params.repetition_penalty)
        out = await self._run(request_id, understand_prompt(codes), spec, sampling)
        meta = out.metadata
        return UnderstandResult(caption=meta.caption, lyrics=meta.lyrics, bpm=meta.bpm, duration=meta.duration,
                                keyscale=meta.keyscale, language=meta.language, timesignature=meta.timesignature,
                                status_message=f"understood in {out.seconds:.2f} s")

    async def create_sample(self, request_id: str, params: CreateSampleParams) -> CreateSampleResult:
        language = params.vocal_language if params.vocal_language not in ("", "unknown") else None
        user = {"language": language} if language else {}
        spec = ConstraintSpec(phase="understand", skip_genres=False, user_metadata=user, strict=self.strict_cot,
                              debug=params.constrained_decoding_debug) if params.use_constrained_decoding else None
        sampling = _sampling(params.temperature, params.top_k, params.top_p, params.repetition_penalty)
        prompt = create_sample_prompt(params.query, params.instrumental)
        out = await self._run(request_id, prompt, spec, sampling, "[Instrumental]" if params.instrumental else "")
        meta = out.metadata
        return CreateSampleResult(caption=meta.caption, lyrics=meta.lyrics, bpm=meta.bpm, duration=meta.duration,
                                  keyscale=meta.keyscale, language=meta.language or (language or ""),
                                  timesignature=meta.timesignature, instrumental=params.instrumental,
                                  status_message=f"created in {out.seconds:.2f} s")

    async def format_sample(self, request_id: str, params: FormatSampleParams) -> FormatSampleResult:
        given = params.user_metadata
        user = build_user_metadata(bpm=given.bpm, keyscale=given.keyscale, timesignature=given.timesignature,
                                   duration_s=given.duration)
        spec = ConstraintSpec(phase="understand", skip_genres=False, skip_language=bool(given.language),
                              user_metadata=user, strict=self.strict_cot, debug=params.constrained_decoding_debug) \
            if params.use_constrained_decoding else None
        sampling = _sampling(params.temperature, params.top_k, params.top_p, params.repetition_penalty)
        prompt = format_sample_prompt(params.caption, params.lyrics)
        out = await self._run(request_id, prompt, spec, sampling, default_lyrics=params.lyrics)
        meta = out.metadata
        # The document: user_metadata constrains those values, so they are the result's, also where
        # the reference's decoder jumped over a field after the caption (or, for the language,
        # skipped it) and the LM's text does not hold them.
        kept = valid_lm_metadata(dataclasses.replace(
            meta, bpm=given.bpm if given.bpm is not None else meta.bpm,
            duration=given.duration if given.duration else meta.duration,
            keyscale=given.keyscale or meta.keyscale, timesignature=given.timesignature or meta.timesignature,
            language=given.language or meta.language))
        return FormatSampleResult(caption=kept.caption, lyrics=kept.lyrics, bpm=kept.bpm, duration=kept.duration,
                                  keyscale=kept.keyscale, language=kept.language,
                                  timesignature=kept.timesignature, status_message=f"formatted in {out.seconds:.2f} s")


