"""Planning a song: phase 1 (metadata chain-of-thought) then phase 2 (audio codes per item).

Follows the reference's ``generate_with_stop_condition`` (checked token for token by the LM
generation vectors, ``../golden/lm``): phase 1 runs unless the user fixed bpm, keyscale,
timesignature and duration (or ``use_cot_metas`` is off), always without guidance; user values are
forced verbatim, token by token; phase 2 renders the CoT back into the codes prompt and generates
one code sequence per item with LM CFG when ``lm_cfg_scale > 1``, all items at once so the engine
batches them. The code target is ``int(duration * 5)`` for the user's duration, else for the
duration the CoT planned, else none (the model ends the codes). Token budgets are the reference's
``max_new_tokens``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from lm_service.constraints.spec import ConstraintSpec
from lm_service.cot import build_user_metadata, format_metadata_as_cot, has_all_metas
from lm_service.output_parser import parse_lm_output
from lm_service.prompts import INSTRUMENTAL_LYRICS, codes_prompt, codes_unconditional_prompt, cot_prompt
from lm_service.runtime import LmRuntime, SamplingInput
from lm_service.engine.config import DEFAULT_MAX_MODEL_LEN
from lm_service.runtime import MODEL_LEN_HEADROOM
from shared.config import env_default
from shared.constants import CODES_PER_SECOND, DURATION_MAX_S, DURATION_MIN_S
from shared.types import GenerationParams, MusicMetadata
from shared.validation import valid_lm_metadata

CODES_PHASE_BUFFER = 10
COT_PHASE_BUFFER = 500


@dataclass(frozen=True)
class PlanInput:
    """One plan. ``repetition_penalty`` is the reference handler's argument (not in the public API)."""

    request_id: str
    params: GenerationParams
    seeds: tuple[int, ...]
    need_codes: bool = True
    debug: bool = False
    repetition_penalty: float = 1.0


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
    values: dict = field(default_factory=dict)  # the parsed CoT fields (user values win), as the reference returns them


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
    """The user's metadata as the reference injects it: verbatim (``"Am"``, ``"C Major"``, ``"3/4"``)."""
    return build_user_metadata(
        bpm=params.bpm, keyscale=params.keyscale, timesignature=params.timesignature,
        duration_s=params.duration if params.duration > 0 else None)


def sampling(params: GenerationParams, seed: Optional[int], cfg_scale: float,
             repetition_penalty: float = 1.0) -> SamplingInput:
    top_p = params.lm_top_p if 0.0 < params.lm_top_p < 1.0 else 1.0
    return SamplingInput(temperature=params.lm_temperature, top_k=params.lm_top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, cfg_scale=cfg_scale, seed=seed)


def max_new_tokens(target_duration: Optional[float], phase: str, max_model_len: int = DEFAULT_MAX_MODEL_LEN,
                   max_duration_s: Optional[float] = None) -> int:
    """The reference's token budget of one LM call: with a positive target duration
    ``int(clamp(d, 10, max) * 5)`` plus 10 (codes phase) or 500 (other phases); without one
    ``min(max_model_len, 600 * 5 + 500)``; never more than ``max_model_len - 64``."""
    cap = max_model_len - MODEL_LEN_HEADROOM
    if target_duration is not None and target_duration > 0:
        limit = max_duration_s if max_duration_s is not None else lm_max_duration_s()
        codes = int(min(max(target_duration, DURATION_MIN_S), limit) * CODES_PER_SECOND)
        wanted = codes + (CODES_PHASE_BUFFER if phase == "codes" else COT_PHASE_BUFFER)
    else:
        wanted = min(max_model_len, int(DURATION_MAX_S) * CODES_PER_SECOND + COT_PHASE_BUFFER)
    return min(wanted, cap)


def lm_max_duration_s() -> float:
    """The longest duration the LM plans (the reference's GPU-tier ``max_duration_with_lm``)."""
    return float(env_default("lm_max_duration_s", int(DURATION_MAX_S), int))


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


def lyrics_of(params: GenerationParams) -> str:
    """The lyrics the LM is given: ``[Instrumental]`` for an instrumental, whatever the lyrics say."""
    return INSTRUMENTAL_LYRICS if params.instrumental else params.lyrics


def target_duration(params: GenerationParams, planned: dict) -> Optional[float]:
    """The user's duration, else the one the CoT planned (the reference's ``target_duration``)."""
    if params.duration > 0:
        return float(params.duration)
    try:
        duration = float(planned.get("duration"))
    except (TypeError, ValueError):
        return None
    return duration if duration > 0 else None


def target_codes(params: GenerationParams, planned: dict) -> Optional[int]:
    """``int(target_duration * 5)``, or None without a target."""
    duration = target_duration(params, planned)
    return None if duration is None else int(duration * CODES_PER_SECOND)


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
    """``strict_cot``: the tightened CoT rules of ``metadata_fsm`` (``--lm-strict-cot``)."""

    def __init__(self, runtime: LmRuntime, strict_cot: bool = False) -> None:
        self.runtime = runtime
        self.strict_cot = strict_cot

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
            metadata = {}
            async for event in pump(self._phase1(plan, user, queue, metadata), queue):
                yield event
            costs["phase1_time"] = time.perf_counter() - t0
        cot_text = format_metadata_as_cot(metadata)
        # What the CoT holds drives phase 2, as in the reference (a user value the CoT jumped over is
        # absent there); the metadata handed on keeps every user value.
        yield PlanMetadata(valid_lm_metadata(to_music_metadata({**metadata, **user})), cot_text, skipped,
                           dict(metadata))
        if plan.need_codes:
            t0 = time.perf_counter()
            queue = asyncio.Queue()
            async for event in pump(self._phase2(plan, metadata, cot_text, queue), queue):
                yield event
            costs["phase2_time"] = time.perf_counter() - t0
        costs["total_time"] = time.perf_counter() - started
        yield PlanDone(costs)

    async def _phase1(self, plan: PlanInput, user: dict, queue: asyncio.Queue, metadata: dict) -> None:
        """Fills ``metadata`` with the fields the CoT holds (user values are in it where injected)."""
        params = plan.params
        spec = ConstraintSpec(phase="cot", stop_at_reasoning=True, skip_genres=True,
                              skip_caption=not params.use_cot_caption, skip_language=not params.use_cot_language,
                              user_metadata=user, strict=self.strict_cot,
                              debug=plan.debug) if params.use_constrained_decoding else None
        seed = plan.seeds[0] if plan.seeds else None
        request = self.runtime.request(
            cot_prompt(params.caption, lyrics_of(params)), spec,
            sampling(params, seed, cfg_scale=1.0, repetition_penalty=plan.repetition_penalty),
            max_new_tokens=self.runtime.text_budget(max_new_tokens(None, "cot", self.runtime.max_model_len)),
            request_id=f"{plan.request_id}:cot")
        output = await self.runtime.run(request, lambda n: queue.put_nowait(PlanProgress("lm_metadata", n, 0)))
        metadata.update(parse_lm_output(output.text).metadata)

    async def _phase2(self, plan: PlanInput, metadata: dict, cot_text: str, queue: asyncio.Queue) -> None:
        """One code sequence per item, submitted together so the engine batches them."""
        params = plan.params
        duration = target_duration(params, metadata)
        target = target_codes(params, metadata)
        spec = ConstraintSpec(phase="codes", skip_genres=True, skip_caption=True, skip_language=True,
                              target_codes=target, debug=plan.debug) if params.use_constrained_decoding else None
        prompt = codes_prompt(params.caption, lyrics_of(params), cot_text)
        uncond = codes_unconditional_prompt(params.caption, lyrics_of(params), params.lm_negative_prompt)
        budget = max_new_tokens(duration, "codes", self.runtime.max_model_len)
        if target is not None:
            # The reference clamps the budget's duration to --max-duration-s, which cuts a longer
            # user duration's codes short; the budget always holds the target here.
            budget = max(budget, target + CODES_PHASE_BUFFER)

        async def one(index: int, seed: int) -> None:
            request = self.runtime.request(
                prompt, spec, sampling(params, seed, params.lm_cfg_scale, plan.repetition_penalty), budget, uncond,
                request_id=f"{plan.request_id}:codes:{index}")
            progress = lambda n: queue.put_nowait(PlanProgress("lm_codes", n, target or 0))  # noqa: E731
            output = await self.runtime.run(request, progress)
            queue.put_nowait(PlanCodes(index, tuple(self.runtime.codes_of(output.token_ids)), output.seed))

        await asyncio.gather(*(one(i, s) for i, s in enumerate(plan.seeds)))
