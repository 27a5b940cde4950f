"""What every LM task needs: the engine, the tokenizer and chat template, and request building.

``LmRuntime`` turns a rendered chat prompt plus a constraint spec into an engine request, runs it
and decodes the result. The engine is either backend (vLLM or transformers); both take the same
``LmGenerateRequest`` and stream the same events.
"""

from __future__ import annotations

import asyncio
import contextlib
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


@dataclass(frozen=True)
class LmCall:
    """One finished engine call as the runtime saw it (for observers: conformance, debugging)."""

    request: LmGenerateRequest
    prompt: str
    uncond_prompt: Optional[str]
    output: GenerationOutput


Observer = Callable[[LmCall], None]


class LmRuntime:
    def __init__(self, engine: Engine, tokenizer: Any, chat_template: str, max_model_len: int,
                 max_text_tokens: int = 0) -> None:
        self.engine = engine
        self.max_text_tokens = max_text_tokens
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_model_len = max_model_len
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = tokenizer.pad_token_id
        self.observers: list[Observer] = []
        self._texts: dict[str, tuple[str, Optional[str]]] = {}
        self.code_start_id = int(tokenizer.convert_tokens_to_ids("<|audio_code_0|>"))
        if self.code_start_id == tokenizer.unk_token_id or self.code_start_id < 0:
            raise Internal("the LM tokenizer has no <|audio_code_0|> token")

    def encode_prompt(self, prompt: ChatPrompt) -> tuple[int, ...]:
        return self._encode(prompt.render(self.chat_template))

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_budget(self, reference_budget: int) -> int:
        """The token budget of a text phase (CoT, understand/create/format): the reference's, or
        ``max_text_tokens`` when that is set and smaller (``--max-text-tokens``; codes are never capped)."""
        return min(reference_budget, self.max_text_tokens) if self.max_text_tokens > 0 else reference_budget

    def stop_ids(self, constrained: bool, guided: bool) -> tuple[int, ...]:
        """The reference's own decoding loops (constrained or guided) stop on EOS or the pad token;
        plain unguided, unconstrained generation (transformers ``generate``) on EOS only."""
        if (constrained or guided) and self.pad_id is not None and int(self.pad_id) != self.eos_id:
            return (self.eos_id, int(self.pad_id))
        return (self.eos_id,)

    def budget(self, prompt_len: int, wanted: Optional[int]) -> int:
        """``wanted`` new tokens capped by the model length (with the reference's headroom)."""
        room = self.max_model_len - MODEL_LEN_HEADROOM - prompt_len
        if room < 1:
            raise Internal(f"prompt of {prompt_len} tokens leaves no room in max_model_len {self.max_model_len}")
        return room if wanted is None else max(1, min(room, wanted))

    def request(self, prompt: ChatPrompt, spec: Optional[ConstraintSpec], sampling: SamplingInput,
                max_new_tokens: Optional[int], uncond: Optional[ChatPrompt] = None,
                request_id: str = "") -> LmGenerateRequest:
        text = prompt.render(self.chat_template)
        uncond_text = uncond.render(self.chat_template) if uncond is not None and sampling.cfg_scale > 1.0 else None
        ids = self._encode(text)
        uncond_ids = self._encode(uncond_text) if uncond_text is not None else None
        longest = max(len(ids), len(uncond_ids or ()))
        constraint = None
        if spec is not None:
            constraint = ConstraintRef(CONSTRAINT_BUILDER, _spec_to_wire(spec), VOCAB_LOADER)
        request_id = request_id or uuid.uuid4().hex
        if self.observers:
            self._texts[request_id] = (text, uncond_text)
        return LmGenerateRequest(
            request_id=request_id, prompt_token_ids=ids,
            max_tokens=self.budget(longest, max_new_tokens), uncond_prompt_token_ids=uncond_ids,
            cfg_scale=sampling.cfg_scale if uncond_ids else 1.0, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
            seed=sampling.seed, stop_token_ids=self.stop_ids(constraint is not None, uncond_ids is not None),
            constraint=constraint)

    async def run(self, request: LmGenerateRequest,
                  on_progress: Optional[Callable[[int], None]] = None) -> GenerationOutput:
        """Run to completion; ``on_progress(num_tokens)`` as tokens arrive. Cancelling the caller
        aborts the request (both CFG sequences) in the engine."""
        try:
            async with contextlib.aclosing(self.engine.submit(request)) as events:
                async for event in events:
                    if isinstance(event, LmProgress) and on_progress is not None:
                        on_progress(len(event.token_ids))
                    elif isinstance(event, LmFinished):
                        text = self.tokenizer.decode(list(event.token_ids), skip_special_tokens=False)
                        output = GenerationOutput(tuple(event.token_ids), text, event.seed, event.duration_s)
                        self._notify(request, output)
                        return output
        except asyncio.CancelledError:
            await self.engine.abort(request.request_id)
            raise
        finally:
            self._texts.pop(request.request_id, None)
        raise Internal(f"LM request {request.request_id} ended without a result")

    def _notify(self, request: LmGenerateRequest, output: GenerationOutput) -> None:
        if not self.observers:
            return
        prompt, uncond = self._texts.get(request.request_id, ("", None))
        for observer in self.observers:
            observer(LmCall(request, prompt, uncond, output))

    def codes_of(self, token_ids: tuple[int, ...]) -> list[int]:
        start = self.code_start_id
        return [t - start for t in token_ids if start <= t < start + NUM_AUDIO_CODES]


def _spec_to_wire(spec: ConstraintSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["user_metadata"] = {k: v for k, v in dict(spec.user_metadata).items() if v is not None}
    return data
