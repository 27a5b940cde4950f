"""The LM engine on transformers: the reference for tests and the engine where vLLM is absent.

Same API and events as ``VllmLmEngine`` and the same token pipeline (``decoding.decode_step``): a
guided request runs its conditional and unconditional prompts as one left-padded batch
``[cond, uncond]`` with a KV cache (the reference PyTorch backend's layout), an unguided one as a
batch of one. Requests run one at a time, in submission order, in a worker thread; the model is
loaded in float32 (reference §1.5 for CPU).

When the request's constraint declares the next step's allowed tokens as a window (the audio codes
and EOS), only those rows of the output projection are computed (contiguous slices of the head's
weight, no copy): at the real vocabulary that is under a third of the head's work per code.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from lm_service.engine.config import LmEngineConfig
from lm_service.engine.constraint_hook import build_constraint
from lm_service.engine.decoding import DecodeRow, GuidedDecoder, decided, decode_step
from lm_service.engine.stats import EngineStats, RequestTimeline, StatsTracker
from lm_service.engine.types import FinishReason, LmEvent, LmFinished, LmGenerateRequest, LmProgress, validate_request
from lm_service.engine.weights import needs_tie_flag
from shared.errors import Internal, InvalidArgument, NotReady

logger = logging.getLogger(__name__)

_PAD_ID = 0  # any id: padded positions are masked out
_MAX_HEAD_GAP = 64  # window ids closer than this share one slice of the output projection


class HfGeneration:
    """One request's generation, step by step (synchronous; runs in the worker thread).

    Args:
        model: a causal LM returning ``logits`` and ``past_key_values``.
        request: the validated request.
        seed: the resolved sampling seed.
        max_model_len: a stream that reaches this many tokens ends the request (LENGTH).
        tokenizer_dir: where a constraint's vocabulary loader reads the tokenizer.
        reduced_head: compute only the window's rows of the output projection when the constraint
            declares one (False: always the whole head; the tokens are the same).
    """

    def __init__(self, model, request: LmGenerateRequest, seed: int, max_model_len: int, tokenizer_dir: str,
                 reduced_head: bool = True) -> None:
        self._model = model
        self._reduced_head = reduced_head
        self._columns: torch.Tensor | None = None  # [K] token ids of the logits' columns; None: all
        self._request = request
        self._max_model_len = max_model_len
        prompts = [list(request.prompt_token_ids)]
        if request.uses_guidance:
            prompts.append(list(request.uncond_prompt_token_ids or ()))
        self._prompt_lens = [len(p) for p in prompts]
        factory = None
        if request.constraint is not None:
            ref, cond_prompt = request.constraint, prompts[0]
            factory = lambda: build_constraint(ref, cond_prompt, tokenizer_dir)  # noqa: E731
        self._decoder = GuidedDecoder(request.settings(seed), prompts[0], factory)
        self._prompts = prompts
        self.output_token_ids: list[int] = []
        self._logits: torch.Tensor | None = None
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None

    @property
    def num_logit_columns(self) -> int:
        """Columns of the last computed logits: the vocabulary, or the window of a reduced head."""
        return 0 if self._logits is None else int(self._logits.shape[-1])

    @torch.inference_mode()
    def prefill(self) -> None:
        device = self._model.device
        width = max(self._prompt_lens)
        ids = torch.full((len(self._prompts), width), _PAD_ID, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(self._prompts), width), dtype=torch.long)  # [B, T]
        for row, prompt in enumerate(self._prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        self._mask, self._positions = mask.to(device), positions.to(device)
        self._forward(ids.to(device), self._positions)

    @torch.inference_mode()
    def step(self) -> tuple[int, FinishReason | None]:
        """Pick and append the next token; return it and the finish reason if the request ended."""
        assert self._logits is not None, "prefill() first"
        row = DecodeRow(self._decoder, self.output_token_ids, 0, 1 if len(self._prompts) == 2 else None)
        token = decided(decode_step(self._logits, [row], self._columns)[0])
        self.output_token_ids.append(token)
        reason = self._finish_reason(token)
        if reason is None:
            batch = len(self._prompts)
            new_ids = torch.full((batch, 1), token, dtype=torch.long, device=self._model.device)  # [B, 1]
            self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=-1)  # [B, T+1]
            self._positions = self._positions[:, -1:] + 1  # [B, 1]
            self._forward(new_ids, self._positions)
        return token, reason

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        window = self._next_window()
        inputs = dict(input_ids=input_ids, attention_mask=self._mask, position_ids=positions,
                      past_key_values=self._cache, use_cache=True)
        if window is None:
            out = self._model(**inputs, logits_to_keep=1)
            self._cache, self._columns = out.past_key_values, None
            self._logits = out.logits[:, -1, :].to(torch.float32)  # [B, V]
            return
        out = self._model.base_model(**inputs)
        self._cache, self._columns = out.past_key_values, window
        head = self._model.get_output_embeddings()
        self._logits = window_logits(out.last_hidden_state[:, -1, :], head.weight, window)  # [B, K]

    def _next_window(self) -> torch.Tensor | None:
        """The window ids of the next step when the head may be reduced to them, else None."""
        if not self._reduced_head or getattr(self._model.get_output_embeddings(), "bias", None) is not None:
            return None
        plan = self._decoder.plan(self.output_token_ids)
        return None if plan.window is None else plan.window.ids

    def _finish_reason(self, token: int) -> FinishReason | None:
        """vLLM's order: a stop token first, then max_tokens or max_model_len."""
        if token in self._request.stop_token_ids:
            return FinishReason.STOP
        num_out = len(self.output_token_ids)
        if num_out >= self._request.max_tokens or max(self._prompt_lens) + num_out >= self._max_model_len:
            return FinishReason.LENGTH
        return None


@dataclass
class _Job:
    request: LmGenerateRequest
    seed: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    aborted: bool = False


class HfLmEngine:
    """Async LM engine on transformers with the ``VllmLmEngine`` API (one request at a time)."""

    def __init__(self, config: LmEngineConfig) -> None:
        self.config = config
        self._model = None
        self._tracker = StatsTracker()
        self._pending: collections.deque[_Job] = collections.deque()
        self._jobs: dict[str, _Job] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._running_seqs = 0

    async def start(self) -> None:
        if self._model is None:
            self._model = await asyncio.to_thread(self._load)
            self._loop_task = asyncio.create_task(self._run())

    def _load(self):
        dtype = torch.float32 if self.config.dtype in ("float32", "auto") else getattr(torch, self.config.dtype)
        extra = {"tie_word_embeddings": True} if needs_tie_flag(self.config.model_dir) else {}
        model = AutoModelForCausalLM.from_pretrained(str(self.config.model_dir), dtype=dtype, **extra)
        return model.to(self.config.device).eval()

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        self._model = None

    @property
    def vocab_size(self) -> int:
        return int(self._model.config.vocab_size) if self._model is not None else 0

    def stats(self) -> EngineStats:
        waiting = sum(2 if job.request.uses_guidance else 1 for job in self._pending)
        self._tracker.record_queue(self._running_seqs, waiting)
        return self._tracker.snapshot()

    def submit(self, request: LmGenerateRequest) -> AsyncIterator[LmEvent]:
        """Validate ``request`` and return its event stream; iterating it queues the work."""
        if self._model is None:
            raise NotReady("the LM engine is not started")
        validate_request(request, self.vocab_size, self.config.max_model_len)
        self._check_free(request.request_id)
        return self._stream(_Job(request, request.seed if request.seed is not None else secrets.randbits(63)))

    async def abort(self, request_id: str) -> None:
        """Stop ``request_id``: a queued request ends at once, a running one after its current step."""
        job = self._jobs.get(request_id)
        if job is None:
            return
        job.aborted = True
        if job in self._pending:
            self._pending.remove(job)
            self._tracker.record_finished()
            timeline = RequestTimeline(request_id, job.seed, self._tracker)
            job.events.put_nowait(_finished(job, timeline, FinishReason.ABORT))

    def _check_free(self, request_id: str) -> None:
        if request_id in self._jobs:
            raise InvalidArgument(f"request_id {request_id!r} is already in flight", field="request_id")

    async def _stream(self, job: _Job) -> AsyncIterator[LmEvent]:
        self._check_free(job.request.request_id)
        self._jobs[job.request.request_id] = job
        self._pending.append(job)
        self._wakeup.set()
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, LmFinished):
                    return
        finally:
            job.aborted = True
            if job in self._pending:
                self._pending.remove(job)
            self._jobs.pop(job.request.request_id, None)

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            job = self._pending.popleft()
            self._running_seqs = 2 if job.request.uses_guidance else 1
            try:
                await self._generate(job)
            except Exception as exc:  # the request fails; the engine goes on
                logger.exception("LM request %s failed", job.request.request_id)
                job.events.put_nowait(Internal(f"LM generation failed: {exc.__class__.__name__}"))
            finally:
                self._running_seqs = 0
                self._tracker.record_finished()

    async def _generate(self, job: _Job) -> None:
        timeline = RequestTimeline(job.request.request_id, job.seed, self._tracker)
        generation = HfGeneration(
            self._model, job.request, job.seed, self.config.max_model_len, str(self.config.model_dir)
        )
        reason: FinishReason | None = None
        if not job.aborted:
            await asyncio.to_thread(generation.prefill)
        while reason is None:
            if job.aborted:
                reason = FinishReason.ABORT
                break
            token, reason = await asyncio.to_thread(generation.step)
            timeline.add([token])
            if reason is None:
                job.events.put_nowait(LmProgress(job.request.request_id, tuple(timeline.token_ids)))
        job.events.put_nowait(_finished(job, timeline, reason))


def window_logits(hidden: torch.Tensor, weight: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight[window].T`` in float32 without copying the weight: ``[B, H]`` → ``[B, K]``.

    ``window`` ([K], ascending ids) is split into runs of ids at most ``_MAX_HEAD_GAP`` apart; each
    run is one product with a slice (view) of ``weight`` ([V, H]), and the few rows between the ids
    of a run are computed and dropped.
    """
    columns = []
    for low, high, keep in _head_runs(window):
        run = torch.nn.functional.linear(hidden, weight[low:high])  # [B, high - low]
        columns.append(run if keep is None else run.index_select(1, keep.to(run.device)))
    return torch.cat(columns, dim=1).to(torch.float32)  # [B, K]


_runs_cache: dict[int, tuple[torch.Tensor, list[tuple[int, int, torch.Tensor | None]]]] = {}


def _head_runs(window: torch.Tensor) -> list[tuple[int, int, torch.Tensor | None]]:
    """(first id, end id, positions to keep or None for all) per run of ``window``; cached per
    window tensor (the entry keeps it alive, so its id is not reused)."""
    cached = _runs_cache.get(id(window))
    if cached is not None and cached[0] is window:
        return cached[1]
    ids, runs, start = window.tolist(), [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or ids[end] - ids[end - 1] > _MAX_HEAD_GAP:
            low, high = ids[start], ids[end - 1] + 1
            keep = None if high - low == end - start else window[start:end] - low  # [n]
            runs.append((low, high, keep))
            start = end
    _runs_cache[id(window)] = (window, runs)
    return runs


def _finished(job: _Job, timeline: RequestTimeline, reason: FinishReason) -> LmFinished:
    return LmFinished(
        request_id=job.request.request_id,
        token_ids=tuple(timeline.token_ids),
        finish_reason=reason,
        seed=job.seed,
        time_to_first_token_s=timeline.time_to_first_token_s,
        duration_s=timeline.elapsed_s,
    )
