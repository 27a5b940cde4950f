"""Requests, events and settings of the LM engine: pure data that crosses process boundaries.

A request names its prompts by token ids (the caller renders and tokenizes them), its sampling
settings, and optionally an unconditional prompt (classifier-free guidance) and a token
constraint. Both engine backends (vLLM and transformers) take the same ``LmGenerateRequest`` and
stream the same ``LmEvent``s.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from shared.errors import InvalidArgument, out_of_range


class FinishReason(str, enum.Enum):
    """Why generation ended."""

    STOP = "stop"          # a stop token was sampled (it is the last token of the output)
    LENGTH = "length"      # max_tokens reached, or the sequence reached max_model_len
    ABORT = "abort"        # the caller aborted the request


@dataclass(frozen=True)
class ConstraintRef:
    """Names a token-constraint builder and the pure-data spec it is built from.

    The builder runs wherever the logits are (for vLLM: inside the engine's worker process), so it
    is named by import path, not passed as an object.

    Attributes:
        builder: ``"package.module:function"``; called as ``builder(vocab, spec, prompt_token_ids)``
            and returning an object with ``mask_logits(logits[V] float32) -> logits``,
            ``advance(token_id)`` and ``is_finished``.
        spec: JSON-like data (dicts, lists, strings, numbers, booleans) the builder understands.
        vocab_loader: ``"package.module:function"`` called once per process as
            ``vocab_loader(tokenizer_dir)``; its result is passed to every ``builder`` call.
            Empty: the builder gets ``None`` as vocab.
    """

    builder: str
    spec: Mapping[str, Any] = field(default_factory=dict)
    vocab_loader: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"builder": self.builder, "spec": dict(self.spec), "vocab_loader": self.vocab_loader}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> "ConstraintRef":
        return cls(builder=data["builder"], spec=data.get("spec") or {}, vocab_loader=data.get("vocab_loader", ""))


@dataclass(frozen=True)
class SamplingSettings:
    """How one request picks its next token (reference §5; see ``sampling.py`` for the order).

    ``temperature <= 0`` (or ``top_k == 1``) is greedy. ``top_k == 0`` and ``top_p == 1.0`` switch
    those filters off, ``repetition_penalty == 1.0`` the penalty, ``cfg_scale == 1.0`` guidance.
    ``seed`` makes sampling reproducible: the same seed and inputs give the same tokens whatever
    else is in the batch.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    cfg_scale: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "temperature": float(self.temperature),
            "top_k": int(self.top_k),
            "top_p": float(self.top_p),
            "repetition_penalty": float(self.repetition_penalty),
            "cfg_scale": float(self.cfg_scale),
            "seed": int(self.seed),
            "stop_token_ids": [int(t) for t in self.stop_token_ids],
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> "SamplingSettings":
        return cls(
            temperature=float(data["temperature"]),
            top_k=int(data["top_k"]),
            top_p=float(data["top_p"]),
            repetition_penalty=float(data["repetition_penalty"]),
            cfg_scale=float(data["cfg_scale"]),
            seed=int(data["seed"]),
            stop_token_ids=tuple(int(t) for t in data["stop_token_ids"]),
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(frozen=True)
class LmGenerateRequest:
    """One generation: a conditional prompt, optionally its unconditional twin, and settings.

    Guidance is active when ``cfg_scale > 1`` and then needs ``uncond_prompt_token_ids``; the
    sampled token is appended to both streams and only the conditional output is returned.
    ``seed`` None: the engine draws one (reported in the final event). ``stop_token_ids``: the
    output ends with the first of these that is sampled.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    uncond_prompt_token_ids: tuple[int, ...] | None = None
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    constraint: ConstraintRef | None = None

    @property
    def uses_guidance(self) -> bool:
        return self.cfg_scale > 1.0

    def settings(self, seed: int) -> SamplingSettings:
        """The sampling settings with the seed the engine resolved."""
        return SamplingSettings(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            cfg_scale=self.cfg_scale,
            seed=seed,
            stop_token_ids=tuple(self.stop_token_ids),
        )


@dataclass(frozen=True)
class LmProgress:
    """Tokens generated so far (cumulative), sent as generation advances."""

    request_id: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class LmFinished:
    """The final output. ``token_ids`` ends with the stop token when ``finish_reason`` is STOP."""

    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    seed: int
    time_to_first_token_s: float
    duration_s: float


LmEvent = Union[LmProgress, LmFinished]


def validate_request(request: LmGenerateRequest, vocab_size: int, max_model_len: int) -> None:
    """Raise ``InvalidArgument`` naming the first field that is out of range.

    Output is not checked against ``max_model_len``: a sequence (either stream of a guided pair)
    that reaches it ends the request with ``FinishReason.LENGTH``.
    """
    _check_prompt("prompt_token_ids", request.prompt_token_ids, vocab_size)
    if request.max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be >= 1, got {request.max_tokens!r}", field="max_tokens")
    _check_length("prompt_token_ids", len(request.prompt_token_ids), max_model_len)
    if request.temperature < 0.0:
        raise InvalidArgument(f"temperature must be >= 0, got {request.temperature!r}", field="temperature")
    if request.top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0: off), got {request.top_k!r}", field="top_k")
    if not 0.0 < request.top_p <= 1.0:
        raise out_of_range("top_p", request.top_p, "0 (exclusive)", 1.0)
    if request.repetition_penalty <= 0.0:
        raise InvalidArgument(
            f"repetition_penalty must be > 0 (1.0: off), got {request.repetition_penalty!r}", field="repetition_penalty"
        )
    if request.cfg_scale < 1.0:
        raise InvalidArgument(f"cfg_scale must be >= 1.0 (1.0: off), got {request.cfg_scale!r}", field="cfg_scale")
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise out_of_range("seed", request.seed, 0, 2**63 - 1)
    for token in request.stop_token_ids:
        if not 0 <= token < vocab_size:
            raise out_of_range("stop_token_ids", token, 0, vocab_size - 1)
    if request.constraint is not None and not request.stop_token_ids:
        raise InvalidArgument("a constrained request needs stop_token_ids (the constraint ends with one)",
                              field="stop_token_ids")
    if request.uses_guidance:
        if not request.uncond_prompt_token_ids:
            raise InvalidArgument("cfg_scale > 1 needs uncond_prompt_token_ids", field="uncond_prompt_token_ids")
        _check_prompt("uncond_prompt_token_ids", request.uncond_prompt_token_ids, vocab_size)
        _check_length("uncond_prompt_token_ids", len(request.uncond_prompt_token_ids), max_model_len)


def _check_prompt(name: str, token_ids: tuple[int, ...], vocab_size: int) -> None:
    if not token_ids:
        raise InvalidArgument(f"{name} must not be empty", field=name)
    low, high = min(token_ids), max(token_ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise out_of_range(name, bad, 0, vocab_size - 1)


def _check_length(name: str, prompt_len: int, max_model_len: int) -> None:
    if prompt_len >= max_model_len:
        raise InvalidArgument(
            f"{name} holds {prompt_len} tokens; it must be shorter than max_model_len {max_model_len}",
            field=name,
        )
