"""Pure tensor functions that turn next-token logits into one token (shared by both backends).

Pipeline for one request and one step (``pick_token`` runs steps 4-7; ``GuidedDecoder`` runs all):

1. classifier-free guidance on the raw logits in float32: ``u + s * (c - u)`` (reference §5.2;
   not log-softmax based);
2. the token constraint masks disallowed tokens with ``-inf``;
3. repetition penalty (the transformers formula) over the conditional prompt and generated tokens,
   as the reference PyTorch backend applies it;
4. top-k;
5. top-p on the untempered logits, as the reference PyTorch backend does (keeps the smallest set of
   most likely tokens whose probability reaches ``p``; the token that crosses ``p`` and the top
   token are always kept) - applied, unlike the reference nano-vllm path, where an inverted flag
   drops it (§5.3);
6. temperature (``<= 0``: greedy);
7. sampling by inverse CDF with one uniform number drawn from a generator seeded by
   ``(seed, step)``: the same seed and inputs give the same token whatever else is in the batch,
   and a request that is preempted and recomputed redraws the same numbers.

All functions take one row ``[V]`` and return a new float32 row unless they say otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK = float("-inf")
_SEED_MASK = (1 << 63) - 1
_STEP_MULTIPLIER = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads consecutive steps apart
_TOP_P_CANDIDATES = 1024


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` in float32."""
    cond32 = cond.to(torch.float32)      # [V]
    uncond32 = uncond.to(torch.float32)  # [V]
    return uncond32 + scale * (cond32 - uncond32)  # [V]


def apply_repetition_penalty(logits: torch.Tensor, token_ids: Sequence[int], penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of every token in ``token_ids`` by ``penalty``."""
    if penalty == 1.0 or not token_ids:
        return logits
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)  # [N]
    picked = logits[ids]  # [N]
    penalized = torch.where(picked < 0, picked * penalty, picked / penalty)  # [N]
    out = logits.clone()  # [V]
    out[ids] = penalized
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``; a temperature ``<= 0`` (greedy) leaves the logits as they are."""
    if temperature <= 0.0 or temperature == 1.0:
        return logits
    return logits / temperature  # [V]


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (ties at the boundary stay); ``0`` keeps all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, top_k).values[-1]  # scalar
    return logits.masked_fill(logits < threshold, _MASK)  # [V]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``.

    The token whose probability crosses ``top_p`` is kept, and so is the most likely token.
    ``top_p >= 1`` keeps all.
    """
    if top_p >= 1.0:
        return logits
    # Sorting the whole vocabulary is slow; the kept set almost always lies in the top few
    # hundred tokens, so look there first and sort everything only when it does not.
    num_candidates = min(_TOP_P_CANDIDATES, logits.shape[-1])
    values, order = torch.topk(logits, num_candidates)  # [K], [K] descending
    probs = torch.exp(values - torch.logsumexp(logits, dim=-1))  # [K] probabilities over all of V
    if num_candidates < logits.shape[-1] and float(probs.sum()) < top_p:
        values, order = torch.sort(logits, descending=True)  # [V], [V]
        probs = torch.softmax(values, dim=-1)  # [V]
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [K] probability of strictly better tokens
    keep = mass_before < top_p  # [K]
    keep[0] = True
    kept = order[keep]  # [N]
    out = torch.full_like(logits, _MASK)  # [V]
    out[kept] = logits[kept]
    return out


def step_uniform(seed: int, step: int) -> float:
    """A uniform number in ``[0, 1)`` that depends only on ``(seed, step)``."""
    mixed = (seed * 6364136223846793005 + (step + 1) * _STEP_MULTIPLIER) & _SEED_MASK
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mixed)
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def sample_from_logits(logits: torch.Tensor, uniform: float) -> int:
    """Inverse-CDF sample of ``softmax(logits)`` at ``uniform`` in ``[0, 1)``.

    Returns a token with non-zero probability; ``-inf`` entries are never picked.
    """
    probs = torch.softmax(logits.to(torch.float32), dim=-1)  # [V]
    cdf = torch.cumsum(probs, dim=-1)  # [V]
    target = torch.tensor([uniform], dtype=cdf.dtype, device=cdf.device) * cdf[-1]  # [1]
    index = int(torch.searchsorted(cdf, target, right=True)[0])
    index = min(index, logits.shape[-1] - 1)
    if probs[index] <= 0:  # rounding at the top end of the cdf: take the last token with mass
        index = int(torch.nonzero(probs > 0)[-1, 0])
    return index


def pick_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, uniform: float) -> int:
    """Steps 4-7 of the module pipeline on penalised, masked float32 logits ``[V]``.

    Greedy (``temperature <= 0`` or ``top_k == 1``) returns the argmax and ignores ``uniform``.
    """
    if temperature <= 0.0 or top_k == 1:
        return int(torch.argmax(logits))
    filtered = top_p_filter(top_k_filter(logits, top_k), top_p)  # [V]
    return sample_from_logits(apply_temperature(filtered, temperature), uniform)


def has_allowed_token(logits: torch.Tensor) -> bool:
    """False when every entry is ``-inf`` (a constraint allowed nothing)."""
    return bool(torch.isfinite(logits).any()) or bool((logits == float("inf")).any())


def force_token(row: torch.Tensor, token_id: int) -> None:
    """In place: every logit but ``token_id`` becomes ``-inf`` and ``token_id`` becomes 0."""
    row.fill_(_MASK)
    row[token_id] = 0.0
