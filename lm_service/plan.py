"""Planning a song: phase 1 (metadata chain-of-thought) then phase 2 (audio codes per item).

Mirrors the reference's ``generate_with_stop_condition``: phase 1 runs unless the user fixed
bpm, keyscale, timesignature and duration (or ``use_cot_metas`` is off); user values are forced
token by token; phase 2 renders the CoT back into the codes prompt and generates one code
sequence per item, all items at once so the engine batches them. Both phases use LM CFG when
``lm_cfg_scale > 1``.

One deliberate difference: when the user left the duration automatic, phase 2 targets the
duration the LM planned in phase 1 (the reference lets the LM stop on its own, which can run to
the model length); a user-given duration always wins.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from lm_service.constraints.spec import ConstraintSpec
from lm_service.cot import build_user_metadata, format_metadata_as_cot, has_all_metas
from lm_service.output_parser import parse_lm_output
from lm_service.prompts import codes_prompt, codes_unconditional_prompt, cot_prompt, cot_unconditional_prompt
from lm_service.runtime import LmRuntime, SamplingInput
from shared.constants import CODES_PER_SECOND, DURATION_MAX_S, DURATION_MIN_S
from shared.types import GenerationParams, MusicMetadata
from shared.validation import normalize_keyscale, normalize_timesignature

CODES_PHASE_BUFFER = 10


@dataclass(frozen=True)
class PlanInput:
    request_id: str
    params: GenerationParams
    seeds: tuple[int, ...]
    need_codes: bool = True
    debug: bool = False


@dataclass(frozen=True)
class PlanProgress:
    stage: str            # "lm_metadata" | "lm_codes"
    current: int
    total: int


@dataclass(frozen=True)
class PlanMetadata:
    metadata: MusicMetadata
    cot_text: str
    phase1_skipped: bool


@dataclass(frozen=True)
class PlanCodes:
    item_index: int
    codes: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class PlanDone:
    time_costs: dict[str, float] = field(default_factory=dict)


PlanEvent = Union[PlanProgress, PlanMetadata, PlanCodes, PlanDone]


def user_metas(params: GenerationParams) -> dict:
    return build_user_metadata(
        bpm=params.bpm, keyscale=normalize_keyscale(params.keyscale),
        timesignature=normalize_timesignature(params.timesignature),
        duration_s=params.duration if params.duration > 0 else None)


def sampling(params: GenerationParams, seed: Optional[int]) -> SamplingInput:
    top_p = params.lm_top_p if 0.0 < params.lm_top_p < 1.0 else 1.0
    return SamplingInput(temperature=params.lm_temperature, top_k=params.lm_top_k, top_p=top_p,
                         cfg_scale=params.lm_cfg_scale, seed=seed)


def to_music_metadata(values: dict, lyrics: str = "") -> MusicMetadata:
    def number(name: str):
        try:
            return float(values[name]) if name in values else None
        except (TypeError, ValueError):
            return None

    bpm = number("bpm")
    genres = values.get("genres")
    return MusicMetadata(
        bpm=int(bpm) if bpm is not None else None, keyscale=str(values.get("keyscale", "")),
        timesignature=str(values.get("timesignature", "")), duration=number("duration"),
        language=str(values.get("language", "")), caption=str(values.get("caption", "")), lyrics=lyrics,
        genres=[g.strip() for g in str(genres).split(",") if g.strip()] if genres else [])


def target_codes(params: GenerationParams, planned: dict) -> Optional[int]:
    """int(duration * 5): the user's duration, else the planned one (clamped to the valid range)."""
    duration = params.duration if params.duration > 0 else None
    if duration is None:
        try:
            duration = float(planned.get("duration"))
        except (TypeError, ValueError):
            return None
    duration = min(max(duration, DURATION_MIN_S), DURATION_MAX_S)
    return int(duration * CODES_PER_SECOND)


async def pump(work, queue: asyncio.Queue) -> AsyncIterator:
    """Yield what ``work`` puts on ``queue`` while it runs; re-raise its error; cancel it if the
    consumer goes away (the engine requests are aborted by their own cancellation)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            task.result()
            return
    finally:
        task.cancel()


class Planner:
    def __init__(self, runtime: LmRuntime) -> None:
        self.runtime = runtime

    async def plan(self, plan: PlanInput) -> AsyncIterator[PlanEvent]:
        started = time.perf_counter()
        costs: dict[str, float] = {}
        params = plan.params
        user = user_metas(params)
        skipped = has_all_metas(user) or not params.use_cot_metas
        metadata = dict(user)
        if not skipped:
            t0 = time.perf_counter()
            queue: asyncio.Queue = asyncio.Queue()
            async for event in pump(self._phase1(plan, user, queue, metadata), queue):
                yield event
            costs["phase1_time"] = time.perf_counter() - t0
        cot_text = format_metadata_as_cot(metadata)
        yield PlanMetadata(to_music_metadata(metadata), cot_text, skipped)
        if plan.need_codes:
            t0 = time.perf_counter()
            queue = asyncio.Queue()
            async for event in pump(self._phase2(plan, metadata, cot_text, queue), queue):
                yield event
            costs["phase2_time"] = time.perf_counter() - t0
        costs["total_time"] = time.perf_counter() - started
        yield PlanDone(costs)

    async def _phase1(self, plan: PlanInput, user: dict, queue: asyncio.Queue, metadata: dict) -> None:
        """Fills ``metadata`` with the planned values (user values win)."""
        params = plan.params
        spec = ConstraintSpec(phase="cot", stop_at_reasoning=True, skip_genres=True,
                              skip_caption=not params.use_cot_caption, skip_language=not params.use_cot_language,
                              user_metadata=user, debug=plan.debug) if params.use_constrained_decoding else None
        request = self.runtime.request(
            cot_prompt(params.caption, params.lyrics), spec, sampling(params, plan.seeds[0] if plan.seeds else None),
            max_new_tokens=1024, uncond=cot_unconditional_prompt(params.lyrics, params.lm_negative_prompt),
            request_id=f"{plan.request_id}:cot")
        output = await self.runtime.run(request, lambda n: queue.put_nowait(PlanProgress("lm_metadata", n, 0)))
        metadata.update({**parse_lm_output(output.text).metadata, **user})

    async def _phase2(self, plan: PlanInput, metadata: dict, cot_text: str, queue: asyncio.Queue) -> None:
        """One code sequence per item, submitted together so the engine batches them."""
        params = plan.params
        target = target_codes(params, metadata)
        spec = ConstraintSpec(phase="codes", skip_genres=True, skip_caption=True, skip_language=True,
                              target_codes=target, debug=plan.debug) if params.use_constrained_decoding else None
        prompt = codes_prompt(params.caption, params.lyrics, cot_text)
        uncond = codes_unconditional_prompt(params.caption, params.lyrics, params.lm_negative_prompt)
        budget = (target + CODES_PHASE_BUFFER) if target else None

        async def one(index: int, seed: int) -> None:
            request = self.runtime.request(prompt, spec, sampling(params, seed), budget, uncond,
                                           request_id=f"{plan.request_id}:codes:{index}")
            progress = lambda n: queue.put_nowait(PlanProgress("lm_codes", n, target or 0))  # noqa: E731
            output = await self.runtime.run(request, progress)
            queue.put_nowait(PlanCodes(index, tuple(self.runtime.codes_of(output.token_ids)), output.seed))

        await asyncio.gather(*(one(i, s) for i, s in enumerate(plan.seeds)))
