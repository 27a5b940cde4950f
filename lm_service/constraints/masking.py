"""In-place masking primitives shared by the constraints (all work on one row of logits)."""

from __future__ import annotations

import torch

from shared.errors import Internal

NEG_INF = float("-inf")


def keep_only(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Set every entry of ``logits`` ([V]) to -inf except ``ids`` ([K] int64, same device)."""
    kept = logits.index_select(0, ids)  # [K]
    logits.fill_(NEG_INF)
    return logits.index_copy_(0, ids, kept)


def keep_one(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """Set every entry of ``logits`` ([V]) to -inf except ``token_id``."""
    kept = logits[token_id].clone()
    logits.fill_(NEG_INF)
    logits[token_id] = kept
    return logits


def block_padding(logits: torch.Tensor, num_tokens: int) -> None:
    """Disallow the ids of a padded logits width ([V], V >= num_tokens).

    Raises ``Internal`` when the logits are narrower than the tokenizer (a wrong model/tokenizer pair).
    """
    width = logits.shape[-1]
    if width < num_tokens:
        raise Internal(f"logits have {width} entries but the tokenizer has {num_tokens} tokens")
    if width > num_tokens:
        logits[num_tokens:] = NEG_INF
