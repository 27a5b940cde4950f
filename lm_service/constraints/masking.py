"""In-place masking primitives shared by the constraints (all work on one row of logits)."""

from __future__ import annotations

import torch

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
    """Disallow the ids of a padded logits width ([V], V >= num_tokens)."""
    if logits.shape[0] > num_tokens:
        logits[num_tokens:] = NEG_INF
