"""Builds per-request token constraints from a ``ConstraintRef`` (pure data) where the logits are.

vLLM runs the model (and the logits processor) in a worker process, so a request cannot carry a
constraint object: it carries the builder's import path and a JSON-like spec, and the constraint
is built here, in whichever process samples. The vocabulary a builder needs is loaded once per
process and tokenizer folder and cached.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from lm_service.engine.types import ConstraintRef

_vocab_cache: dict[tuple[str, str], Any] = {}
_vocab_lock = threading.Lock()


@runtime_checkable
class TokenConstraint(Protocol):
    """A stateful per-request token filter (e.g. the metadata FSM)."""

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits[V]`` float32 with disallowed tokens set to ``-inf`` (may work in place)."""

    def advance(self, token_id: int) -> None:
        """Consume the token that was sampled."""

    @property
    def is_finished(self) -> bool:
        """True once the constraint accepts nothing but the end of the output."""


@runtime_checkable
class TokenWindow(Protocol):
    """A step's allowed tokens known before the logits (``lm_service.constraints.masking.TokenWindow``).

    ``ids``: ``[K]`` int64 ascending token ids, the same tensor object at every step of a phase;
    ``blocked``: ``[K]`` bool, the ids disallowed at this step, or None when all are allowed.
    """

    ids: torch.Tensor
    blocked: torch.Tensor | None


def allowed_window(constraint: TokenConstraint) -> TokenWindow | None:
    """The constraint's window for its current step, if it declares one.

    Optional part of the constraint protocol: ``allowed_window()`` returns the window whose unblocked
    ids are exactly what ``mask_logits`` would leave finite at this step, or None when the mask
    depends on the logits. The engine then decides the request inside the window (and the
    transformers backend computes only the window's rows of the output projection).
    """
    declare = getattr(constraint, "allowed_window", None)
    return None if declare is None else declare()


def resolve_callable(path: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (``"package.module.function"`` also works)."""
    module_name, sep, attr_path = path.partition(":")
    if not sep:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:function'")
    target: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    if not callable(target):
        raise ValueError(f"{path!r} does not name a callable")
    return target


def load_vocab(loader_path: str, tokenizer_dir: str) -> Any:
    """The vocabulary ``loader_path(tokenizer_dir)`` returns, built once per process."""
    if not loader_path:
        return None
    key = (loader_path, tokenizer_dir)
    with _vocab_lock:
        if key not in _vocab_cache:
            _vocab_cache[key] = resolve_callable(loader_path)(tokenizer_dir)
        return _vocab_cache[key]


def build_constraint(ref: ConstraintRef, prompt_token_ids: Sequence[int], tokenizer_dir: str) -> TokenConstraint:
    """A fresh constraint for one request, in its initial state."""
    vocab = load_vocab(ref.vocab_loader, tokenizer_dir)
    constraint = resolve_callable(ref.builder)(vocab, ref.spec, list(prompt_token_ids))
    if not isinstance(constraint, TokenConstraint):
        raise TypeError(
            f"{ref.builder} returned {type(constraint).__name__}, which lacks mask_logits/advance/is_finished"
        )
    return constraint
