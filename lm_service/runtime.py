"""What every LM task needs: the engine, the tokenizer and chat template, and request building.

``LmRuntime`` turns a rendered chat prompt plus a constraint spec into an engine request, runs it
and decodes the result. The engine is either backend (vLLM or transformers); both take the same
``LmGenerateRequest`` and stream the same events.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Callable, Optional, Protocol

from lm_service.constraints.spec import ConstraintSpec
from lm_service.engine.types import ConstraintRef, LmEvent, LmFinished, LmGenerateRequest, LmProgress
from lm_service.prompts import ChatPrompt
from shared.constants import NUM_AUDIO_CODES
from shared.errors import Internal

log = logging.getLogger(__name__)
CONSTRAINT_BUILDER = "lm_service.constraint_bridge:build"
VOCAB_LOADER = "lm_service.constraint_bridge:load_vocab"
MODEL_LEN_HEADROOM = 64


class Engine(Protocol):
    def submit(self, request: LmGenerateRequest) -> AsyncIterator[LmEvent]: ...

    async def abort(self, request_id: str) -> None: ...


@dataclass(frozen=True)
class SamplingInput:
    """User-facing sampling knobs of one LM call (0 / 1.0 switch top-k / top-p off)."""

    temperature: float = 0.85
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    cfg_scale: float = 1.0
    seed: Optional[int] = None


@dataclass(frozen=True)
class GenerationOutput:
    token_ids: tuple[int, ...]
    text: str
    seed: int
    duration_s: float


class LmRuntime:
    def __init__(self, engine: Engine, tokenizer: Any, chat_template: str, max_model_len: int) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_model_len = max_model_len
        self.eos_id = int(tokenizer.eos_token_id)
        self.code_start_id = int(tokenizer.convert_tokens_to_ids("<|audio_code_0|>"))
        if self.code_start_id == tokenizer.unk_token_id or self.code_start_id < 0:
            raise Internal("the LM tokenizer has no <|audio_code_0|> token")

    def encode_prompt(self, prompt: ChatPrompt) -> tuple[int, ...]:
        text = prompt.render(self.chat_template)
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def budget(self, prompt_len: int, wanted: Optional[int]) -> int:
        """``wanted`` new tokens capped by the model length (with the reference's headroom)."""
        room = self.max_model_len - MODEL_LEN_HEADROOM - prompt_len
        if room < 1:
            raise Internal(f"prompt of {prompt_len} tokens leaves no room in max_model_len {self.max_model_len}")
        return room if wanted is None else max(1, min(room, wanted))

    def request(self, prompt: ChatPrompt, spec: Optional[ConstraintSpec], sampling: SamplingInput,
                max_new_tokens: Optional[int], uncond: Optional[ChatPrompt] = None,
                request_id: str = "") -> LmGenerateRequest:
        ids = self.encode_prompt(prompt)
        uncond_ids = self.encode_prompt(uncond) if uncond is not None and sampling.cfg_scale > 1.0 else None
        longest = max(len(ids), len(uncond_ids or ()))
        constraint = None
        if spec is not None:
            constraint = ConstraintRef(CONSTRAINT_BUILDER, _spec_to_wire(spec), VOCAB_LOADER)
        return LmGenerateRequest(
            request_id=request_id or uuid.uuid4().hex, prompt_token_ids=ids,
            max_tokens=self.budget(longest, max_new_tokens), uncond_prompt_token_ids=uncond_ids,
            cfg_scale=sampling.cfg_scale if uncond_ids else 1.0, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
            seed=sampling.seed, stop_token_ids=(self.eos_id,), constraint=constraint)

    async def run(self, request: LmGenerateRequest,
                  on_progress: Optional[Callable[[int], None]] = None) -> GenerationOutput:
        """Run to completion; ``on_progress(num_tokens)`` as tokens arrive. Cancelling the caller
        aborts the request (both CFG sequences) in the engine."""
        try:
            async for event in self.engine.submit(request):
                if isinstance(event, LmProgress) and on_progress is not None:
                    on_progress(len(event.token_ids))
                elif isinstance(event, LmFinished):
                    text = self.tokenizer.decode(list(event.token_ids), skip_special_tokens=False)
                    return GenerationOutput(tuple(event.token_ids), text, event.seed, event.duration_s)
        except asyncio.CancelledError:
            await self.engine.abort(request.request_id)
            raise
        raise Internal(f"LM request {request.request_id} ended without a result")

    def codes_of(self, token_ids: tuple[int, ...]) -> list[int]:
        start = self.code_start_id
        return [t - start for t in token_ids if start <= t < start + NUM_AUDIO_CODES]


def _spec_to_wire(spec: ConstraintSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["user_metadata"] = {k: v for k, v in dict(spec.user_metadata).items() if v is not None}
    return data
