"""Builds constraints where the logits are (inside the engine's worker process).

The engine names these two functions by import path (``ConstraintRef``); the spec travels as
plain data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from lm_service.constraints.spec import ConstraintSpec, TokenConstraint
from lm_service.constraints.vocab import BUILTIN_GENRES_PATH, ConstraintVocab
from shared.config import env_default


GENRES_FILE = "genres_vocab.txt"


def genres_vocab_path(tokenizer_dir: str) -> Path | None:
    """The genre vocabulary: ``ACESTEP_LM_GENRES_VOCAB`` (a path, or ``builtin`` for the packaged
    list, or ``none``), else the checkpoint folder's ``genres_vocab.txt``, else none (the reference
    without its file: free-text genres)."""
    chosen = env_default("lm_genres_vocab", "")
    if chosen == "builtin":
        return BUILTIN_GENRES_PATH
    if chosen == "none":
        return None
    if chosen:
        return Path(chosen)
    beside = Path(tokenizer_dir) / GENRES_FILE
    return beside if beside.is_file() else None


def load_vocab(tokenizer_dir: str) -> ConstraintVocab:
    """The token tables for the checkpoint's tokenizer (once per process)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    max_duration = env_default("lm_max_duration_s", 600, int)
    return ConstraintVocab.from_tokenizer(tokenizer, max_duration_s=max_duration,
                                          genres_path=genres_vocab_path(tokenizer_dir))


def build(vocab: ConstraintVocab, spec: Mapping[str, Any], prompt_token_ids: Sequence[int]) -> TokenConstraint:
    from lm_service.constraints import build_constraint

    return build_constraint(vocab, ConstraintSpec(**dict(spec)), prompt_token_ids)
