"""Pure tensor functions that turn next-token logits into tokens, many rows at once (both backends).

Pipeline for one step (``pick_tokens`` runs steps 4-7; ``decoding.decode_step`` runs all):

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
6. temperature (``<= 0``: greedy, the argmax);
7. sampling by inverse CDF in token order with one uniform number per row from ``step_uniform(seed,
   step)``: the same seed and inputs give the same token whatever else is in the batch, and a
   request that is preempted and recomputed redraws the same numbers.

Logits are ``[R, W]``: R rows (requests), W columns (the vocabulary, or a window of it in ascending
token order, see ``decoding``); per-row settings are ``[R]`` tensors. Every row is computed on its own
(no value of a row depends on another row), and a column holding ``-inf`` never changes another
column's result, so sampling a window gives the same token as sampling the whole row with every id
outside the window at ``-inf``. Functions return new tensors unless they say otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK = float("-inf")
_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, the splitmix64 increment
_TOP_P_BUCKETS = 4096
_MIN_SPAN = 1e-6  # a row whose likely values differ by less puts them in few buckets (no overflow)


def _mix64(value: int) -> int:
    """The splitmix64 finaliser: a bijection of 64-bit integers that scrambles every bit."""
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def step_uniform(seed: int, step: int) -> float:
    """A uniform number in ``[0, 1)`` that depends only on ``(seed, step)``.

    Counter-based (no generator state): the ``step + 1``-th output of a splitmix64 stream keyed by the
    mixed seed, ``mix64(mix64(seed) + (step + 1) * gamma)``, of which the top 53 bits make the float.
    Mixing the seed first keeps the streams of nearby seeds (0, 1, 2, ...) unrelated.
    """
    key = _mix64(seed & _MASK64)
    bits = _mix64((key + (step + 1) * _GOLDEN_GAMMA) & _MASK64)
    return (bits >> 11) * (1.0 / (1 << 53))


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` in float32; ``scale``: a number or ``[R]`` per row."""
    cond32 = cond.to(torch.float32)      # [R, W]
    uncond32 = uncond.to(torch.float32)  # [R, W]
    if isinstance(scale, torch.Tensor):
        scale = scale.to(torch.float32).reshape(-1, 1)  # [R, 1]
    return uncond32 + scale * (cond32 - uncond32)  # [R, W]


def apply_repetition_penalty(
    logits: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """Divide positive / multiply negative logits at ``(rows[i], columns[i])`` by ``penalty[rows[i]]``.

    ``rows``, ``columns``: ``[N]`` int64 (a row's columns may repeat); ``penalty``: ``[R]``.
    """
    if rows.numel() == 0:
        return logits
    picked = logits[rows, columns]  # [N]
    factor = penalty.to(logits.dtype)[rows]  # [N]
    out = logits.clone()  # [R, W]
    out[rows, columns] = torch.where(picked < 0, picked * factor, picked / factor)
    return out


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``logits / temperature`` per row (``temperature``: ``[R]``, every entry ``> 0``)."""
    if bool((temperature == 1.0).all()):
        return logits
    return logits / temperature.to(logits.dtype).reshape(-1, 1)  # [R, W]


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (ties at the boundary stay); ``0`` keeps all."""
    width = logits.shape[-1]
    active = (top_k > 0) & (top_k < width)  # [R]
    if not bool(active.any()):
        return logits
    k_max = int(top_k[active].max())
    values = torch.topk(logits, k_max, dim=-1).values  # [R, k_max] descending
    kth = values.gather(1, (top_k.clamp(1, k_max) - 1).reshape(-1, 1))  # [R, 1]
    threshold = torch.where(active.reshape(-1, 1), kth, torch.full_like(kth, _MASK))  # [R, 1]
    return logits.masked_fill(logits < threshold, _MASK)  # [R, W]


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of most likely tokens whose probability reaches ``top_p``.

    A token is kept when the probability of the tokens strictly more likely than it is below
    ``top_p``: the token that crosses ``top_p`` is kept, and so is the most likely token.
    ``top_p >= 1`` keeps all.
    """
    active = top_p < 1.0  # [R]
    if not bool(active.any()):
        return logits
    if bool(active.all()):
        return logits.masked_fill(~_top_p_keep(logits, top_p), _MASK)  # [R, W]
    rows = active.nonzero().flatten()  # [A]
    chosen = logits[rows]  # [A, W]
    out = logits.clone()  # [R, W]
    out[rows] = chosen.masked_fill(~_top_p_keep(chosen, top_p[rows]), _MASK)
    return out


def _top_p_keep(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``[R, W]`` bool: the tokens ``top_p_filter`` keeps, found without sorting whole rows.

    A histogram of each row's values (``_TOP_P_BUCKETS`` equal-width buckets between its lowest and
    highest finite value) gives the bucket where the probability counted from the top reaches
    ``top_p``: tokens in higher buckets are kept, tokens in lower ones dropped, and only the tokens
    of that bucket are sorted to place the boundary exactly. (A model that spreads its probability
    over most of the vocabulary, like a random-weight one, would otherwise sort the whole row.)
    """
    num_rows, num_buckets = logits.shape[0], _TOP_P_BUCKETS
    best = logits.amax(dim=-1, keepdim=True)  # [R, 1]
    weights = torch.exp(logits - best).to(torch.float64)  # [R, W] unnormalised probabilities, 0 where -inf
    target = top_p.to(torch.float64).reshape(-1, 1) * weights.sum(dim=-1, keepdim=True)  # [R, 1] top_p's weight
    lowest = torch.where(weights > 0, logits, best).amin(dim=-1, keepdim=True)  # [R, 1]
    scale = num_buckets / (best - lowest).clamp(min=_MIN_SPAN)  # [R, 1]
    bucket = ((logits - lowest) * scale).floor_().clamp_(0, num_buckets - 1).long()  # [R, W]
    mass = torch.zeros((num_rows, num_buckets), dtype=torch.float64, device=logits.device)
    mass.scatter_add_(1, bucket, weights)  # [R, N] weight per bucket
    from_top = mass.flip(-1).cumsum(dim=-1)  # [R, N] weight of the j+1 highest buckets
    crossing_rank = torch.searchsorted(from_top, target).clamp(max=num_buckets - 1)  # [R, 1]
    above = torch.where(crossing_rank > 0, from_top.gather(1, (crossing_rank - 1).clamp(min=0)), 0.0)  # [R, 1]
    crossing = num_buckets - 1 - crossing_rank  # [R, 1]
    keep = bucket > crossing  # [R, W]
    in_crossing = (bucket == crossing) & (weights > 0)  # [R, W]
    for row in range(num_rows):
        members = in_crossing[row].nonzero().flatten()  # [M]
        members = members[torch.sort(logits[row, members], descending=True).indices]  # [M] most likely first
        member_weights = weights[row, members]  # [M]
        before = above[row] + torch.cumsum(member_weights, dim=0) - member_weights  # [M]
        keep[row, members[before < target[row]]] = True
    keep[torch.arange(num_rows, device=logits.device), torch.argmax(logits, dim=-1)] = True
    return keep


def sample_inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Column ``[R]`` (int64) of each row's inverse-CDF sample of ``softmax(logits)`` at ``uniforms``.

    ``uniforms``: ``[R]`` float64 in ``[0, 1)``. The CDF is a float64 running sum in column order, so
    a column's value depends only on the columns before it: ``-inf`` columns (weight 0) change
    nothing, and a column with weight 0 is never picked.
    """
    width = logits.shape[-1]
    weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)  # [R, W] 0 where -inf
    cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)  # [R, W]
    target = uniforms.to(torch.float64).reshape(-1, 1) * cdf[:, -1:]  # [R, 1]
    index = torch.searchsorted(cdf, target, right=True).reshape(-1).clamp(max=width - 1)  # [R]
    empty = weights.gather(1, index.reshape(-1, 1)).reshape(-1) <= 0  # [R] rounding at the top end
    if bool(empty.any()):
        last = width - 1 - torch.argmax((weights.flip(-1) > 0).to(torch.int8), dim=-1)  # [R]
        index = torch.where(empty, last, index)
    return index


def pick_tokens(
    logits: torch.Tensor,
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    uniforms: Sequence[float],
) -> torch.Tensor:
    """Steps 4-7 of the module pipeline on penalised, masked float32 logits ``[R, W]`` → columns ``[R]``.

    A greedy row (``temperature <= 0`` or ``top_k == 1``) takes its argmax and ignores its uniform.
    """
    device = logits.device
    sampled = [row for row, (t, k) in enumerate(zip(temperature, top_k)) if t > 0.0 and k != 1]
    if len(sampled) < len(temperature):
        index = torch.argmax(logits, dim=-1)  # [R]
        if not sampled:
            return index
    rows = torch.tensor(sampled, dtype=torch.long, device=device)  # [S]
    chosen = logits if len(sampled) == len(temperature) else logits.index_select(0, rows)  # [S, W]
    chosen = top_k_filter(chosen, torch.tensor([top_k[r] for r in sampled], dtype=torch.long, device=device))
    chosen = top_p_filter(chosen, torch.tensor([top_p[r] for r in sampled], dtype=torch.float64, device=device))
    chosen = apply_temperature(chosen, torch.tensor([temperature[r] for r in sampled], device=device))
    draws = sample_inverse_cdf(chosen, torch.tensor([uniforms[r] for r in sampled], dtype=torch.float64,
                                                    device=device))  # [S]
    return draws if len(sampled) == len(temperature) else index.index_copy(0, rows, draws)


def has_allowed_token(logits: torch.Tensor) -> torch.Tensor:
    """``[R]`` bool: False for a row whose every entry is ``-inf`` (a constraint allowed nothing)."""
    return logits.amax(dim=-1) > _MASK


def force_tokens(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """In place: in each row ``rows[i]`` every logit but ``tokens[i]`` becomes ``-inf``, that one 0."""
    logits.index_fill_(0, rows, _MASK)
    logits[rows, tokens] = 0.0
