"""Builds constraints where the logits are (inside the engine's worker process).

The engine names these two functions by import path (``ConstraintRef``); the spec travels as
plain data.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from lm_service.constraints.spec import ConstraintSpec, TokenConstraint
from lm_service.constraints.vocab import ConstraintVocab
from shared.config import env_default


def load_vocab(tokenizer_dir: str) -> ConstraintVocab:
    """The token tables for the checkpoint's tokenizer (once per process)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    max_duration = env_default("lm_max_duration_s", 600, int)
    return ConstraintVocab.from_tokenizer(tokenizer, max_duration_s=max_duration)


def build(vocab: ConstraintVocab, spec: Mapping[str, Any], prompt_token_ids: Sequence[int]) -> TokenConstraint:
    from lm_service.constraints import build_constraint

    return build_constraint(vocab, ConstraintSpec(**dict(spec)), prompt_token_ids)
