"""The LM engine on vLLM's ``AsyncLLM``: continuous batching with guided pairs kept in lock-step.

``VllmLmEngine.submit`` turns an ``LmGenerateRequest`` into ONE vLLM request whose
``SamplingParams`` ask vLLM for greedy decoding and carry our settings in ``extra_args``;
``PairedScheduler`` (engine-core process) adds the unconditional twin of a guided request and
keeps the pair together, and ``GuidanceLogitsProcessor`` (worker process) picks every token.
Token ids in, token ids out: vLLM never loads the tokenizer (``skip_tokenizer_init``).

Engine start takes ~26 s on CPU even for a tiny model; build one engine per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
from vllm.v1.metrics.loggers import StatLoggerBase

from lm_service.engine.config import LmEngineConfig
from lm_service.engine.logits_processor import GuidanceLogitsProcessor
from lm_service.engine.scheduler import PAIR_ERROR_PREFIX, PairedScheduler
from lm_service.engine.stats import EngineStats, RequestTimeline, StatsTracker
from lm_service.engine.types import FinishReason, LmEvent, LmFinished, LmGenerateRequest, LmProgress, validate_request
from lm_service.engine.weights import prepare_model_dir
from lm_service.engine.wire import RowArgs, RowRole
from shared.errors import Internal, InvalidArgument, NotReady

logger = logging.getLogger(__name__)

_GIB = 1 << 30
_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


class _QueueStatLogger(StatLoggerBase):
    """Feeds vLLM's per-step figures (running/waiting sequences, KV use, preemptions) into a tracker."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, tracker: StatsTracker) -> None:
        self._tracker = tracker

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
        if scheduler_stats is not None:
            self._tracker.record_queue(
                scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs, scheduler_stats.kv_cache_usage
            )
        if iteration_stats is not None and iteration_stats.num_preempted_reqs:
            self._tracker.record_preemptions(iteration_stats.num_preempted_reqs)

    def log_engine_initialized(self) -> None:
        return None


def engine_args(config: LmEngineConfig, model_dir: str) -> AsyncEngineArgs:
    """vLLM arguments: chunked prefill off, synchronous scheduling, our scheduler and processor."""
    return AsyncEngineArgs(
        model=model_dir,
        skip_tokenizer_init=True,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        enable_chunked_prefill=False,
        enable_prefix_caching=config.enable_prefix_caching,
        async_scheduling=False,
        enforce_eager=config.enforce_eager or config.device == "cpu",
        kv_cache_memory_bytes=int(config.kv_cache_gib * _GIB) if config.kv_cache_gib > 0 else None,
        gpu_memory_utilization=config.gpu_memory_utilization,
        scheduler_cls=PairedScheduler,
        logits_processors=[GuidanceLogitsProcessor],
        generation_config="vllm",
        seed=config.seed,
        disable_log_stats=True,
    )


class VllmLmEngine:
    """Async LM engine: ``start()``, then ``submit()`` / ``abort()`` from any number of tasks."""

    def __init__(self, config: LmEngineConfig) -> None:
        self.config = config
        self._llm: AsyncLLM | None = None
        self._tracker = StatsTracker()
        self._inflight: dict[str, str] = {}  # request_id -> vLLM request id
        self._vocab_size = 0

    async def start(self) -> None:
        """Load the model and start vLLM's engine processes (tens of seconds)."""
        if self._llm is not None:
            return
        views_dir = self.config.resolved_views_dir()
        model_dir = await asyncio.to_thread(prepare_model_dir, self.config.model_dir, views_dir)
        factory = functools.partial(_QueueStatLogger, tracker=self._tracker)
        args = engine_args(self.config, str(model_dir))
        # Building AsyncLLM waits for the engine processes; a thread keeps the event loop serving
        # (health checks) meanwhile. Its output handler starts with the first request.
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=[factory])
        self._vocab_size = self._llm.model_config.get_vocab_size()
        logger.info("vLLM LM engine ready: %s (vocab %d)", model_dir, self._vocab_size)

    async def shutdown(self) -> None:
        """Stop vLLM's engine processes (waits for them, off the event loop)."""
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def stats(self) -> EngineStats:
        return self._tracker.snapshot()

    def submit(self, request: LmGenerateRequest) -> AsyncIterator[LmEvent]:
        """Validate ``request`` and return its event stream; iterating it starts the work.

        Raises:
            NotReady: the engine is not started.
            InvalidArgument: a field is out of range, or ``request_id`` is already in flight.
        """
        if self._llm is None:
            raise NotReady("the LM engine is not started")
        validate_request(request, self._vocab_size, self.config.max_model_len)
        self._check_free(request.request_id)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        return self._stream(request, seed)

    async def abort(self, request_id: str) -> None:
        """Stop ``request_id`` (both sequences of a guided pair); its stream ends with ABORT."""
        engine_id = self._inflight.get(request_id)
        if engine_id is not None and self._llm is not None:
            await self._llm.abort(engine_id, internal=False)

    def _check_free(self, request_id: str) -> None:
        if request_id in self._inflight:
            raise InvalidArgument(f"request_id {request_id!r} is already in flight", field="request_id")

    async def _stream(self, request: LmGenerateRequest, seed: int) -> AsyncIterator[LmEvent]:
        assert self._llm is not None
        self._check_free(request.request_id)
        engine_id = f"{request.request_id}-{uuid.uuid4().hex[:12]}"
        self._inflight[request.request_id] = engine_id
        timeline = RequestTimeline(request.request_id, seed, self._tracker)
        prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
        outputs = self._llm.generate(prompt, sampling_params(request, engine_id, seed), engine_id)
        try:
            async with contextlib.aclosing(outputs):  # closing our stream aborts the vLLM request
                async for output in outputs:
                    completion = output.outputs[0]
                    if timeline.add(list(completion.token_ids)) and not output.finished:
                        yield LmProgress(request.request_id, tuple(timeline.token_ids))
                    if output.finished:
                        yield finished_event(timeline, completion.finish_reason, completion.stop_reason)
                        return
        except (EngineDeadError, EngineGenerateError) as exc:
            raise Internal(f"the LM engine failed: {exc.__class__.__name__}") from exc
        finally:
            self._inflight.pop(request.request_id, None)
            self._tracker.record_finished()


def sampling_params(request: LmGenerateRequest, engine_id: str, seed: int) -> SamplingParams:
    """vLLM samples greedily; the processor forces each row to the token our pipeline picked."""
    role = RowRole.COND if request.uses_guidance else RowRole.SINGLE
    args = RowArgs(
        key=engine_id,
        role=role,
        settings=request.settings(seed),
        constraint=request.constraint,
        uncond_prompt_token_ids=tuple(request.uncond_prompt_token_ids or ()) if request.uses_guidance else None,
    )
    return SamplingParams(
        n=1,
        temperature=0.0,
        max_tokens=request.max_tokens,
        stop_token_ids=list(request.stop_token_ids),
        ignore_eos=True,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=args.to_extra_args(),
    )


def finished_event(timeline: RequestTimeline, reason: str | None, stop_reason: Any) -> LmFinished:
    """The final event for vLLM's finish reason; ``"error"`` (e.g. a broken guided pair) raises."""
    if reason not in _FINISH_REASONS:
        detail = stop_reason if isinstance(stop_reason, str) and stop_reason.startswith(PAIR_ERROR_PREFIX) else None
        raise Internal(detail or f"LM generation failed (finish reason {reason!r})")
    return LmFinished(
        request_id=timeline.request_id,
        token_ids=tuple(timeline.token_ids),
        finish_reason=_FINISH_REASONS[reason],
        seed=timeline.seed,
        time_to_first_token_s=timeline.time_to_first_token_s,
        duration_s=timeline.elapsed_s,
    )
