"""In-place masking primitives shared by the constraints (all work on one row of logits), and the
token windows a constraint declares when its allowed tokens are known before the logits."""

from __future__ import annotations

import functools
from dataclasses import dataclass

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


@dataclass(frozen=True)
class TokenWindow:
    """A step's allowed tokens known before the logits: a subset of a fixed window of ids.

    ``ids`` ([K] int64, ascending, CPU) is one tensor object for every step of a phase, so that the
    engine batches the rows that share it and may compute only these rows of the output projection.
    ``blocked`` ([K] bool) marks the window's ids disallowed at this step; None: all are allowed.
    """

    ids: torch.Tensor
    blocked: torch.Tensor | None = None


@dataclass(frozen=True)
class CodeWindows:
    """The three steps of the audio-code state over one window: the codes and EOS."""

    codes_or_eos: TokenWindow   # no target: a code or EOS
    codes_only: TokenWindow     # target not reached yet: EOS blocked
    eos_only: TokenWindow       # target reached: EOS forced


@functools.lru_cache(maxsize=8)
def code_windows(code_start_id: int, code_end_id: int, eos_id: int) -> CodeWindows:
    """The windows of the codes ``[code_start_id, code_end_id)`` plus ``eos_id``, built once."""
    ids = torch.unique(torch.cat([torch.arange(code_start_id, code_end_id), torch.tensor([eos_id])]))  # [K] sorted
    is_eos = ids == eos_id  # [K]
    return CodeWindows(TokenWindow(ids), TokenWindow(ids, is_eos), TokenWindow(ids, ~is_eos))
