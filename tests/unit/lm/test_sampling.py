"""The shared sampling pipeline (no model, no vLLM): guidance formula, filters, seeded sampling,
and the per-request decoder's constraint and seed handling."""

from __future__ import annotations

import pytest
import torch

from lm_service.engine.decoding import GuidedDecoder
from lm_service.engine.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    cfg_combine,
    force_token,
    pick_token,
    sample_from_logits,
    step_uniform,
    top_k_filter,
    top_p_filter,
)
from lm_service.engine.types import SamplingSettings

NEG_INF = float("-inf")


def test_cfg_combine_is_linear_in_raw_logits_and_float32() -> None:
    cond = torch.tensor([2.0, 0.0, -1.0], dtype=torch.bfloat16)
    uncond = torch.tensor([1.0, 1.0, -1.0], dtype=torch.bfloat16)
    out = cfg_combine(cond, uncond, 3.0)
    assert out.dtype == torch.float32
    assert out.tolist() == [4.0, -2.0, -1.0]  # u + 3 (c - u)


def test_cfg_scale_one_returns_the_conditional_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    assert torch.allclose(cfg_combine(cond, uncond, 1.0), cond, atol=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([2.0, -2.0, 3.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 3.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 3.0, 1.0]  # input untouched
    assert apply_repetition_penalty(logits, [0], 1.0) is logits


def test_temperature_scales_and_zero_means_untouched() -> None:
    logits = torch.tensor([2.0, -4.0])
    assert apply_temperature(logits, 2.0).tolist() == [1.0, -2.0]
    assert apply_temperature(logits, 0.0) is logits


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0, 2.5])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [False, True, False, False, True]
    assert top_k_filter(logits, 0) is logits


def test_top_p_keeps_the_token_that_crosses_p_and_always_the_top_token() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(top_p_filter(logits, 1e-6)).tolist() == [True, False, False, False]
    assert top_p_filter(logits, 1.0) is logits


def test_top_p_filter_works_on_unsorted_vocab_order() -> None:
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [False, True, False, True]


def _top_p_by_full_sort(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    values, order = torch.sort(logits, descending=True)
    probs = torch.softmax(values, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    drop[0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), NEG_INF)


@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_top_p_keeps_the_same_set_as_a_full_sort_for_peaked_and_flat_distributions(scale: float, top_p: float) -> None:
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(3)) * scale
    assert torch.equal(torch.isfinite(top_p_filter(logits, top_p)), torch.isfinite(_top_p_by_full_sort(logits, top_p)))


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_masked_tokens() -> None:
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log()  # log(0) = -inf
    num_draws = 1000
    counts = [0, 0, 0, 0]
    for i in range(num_draws):
        counts[sample_from_logits(logits, (i + 0.5) / num_draws)] += 1
    assert counts[1] == 0
    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / num_draws - p) <= 2 / num_draws


def test_step_uniform_depends_only_on_seed_and_step() -> None:
    draws = [step_uniform(7, step) for step in range(200)]
    assert draws == [step_uniform(7, step) for step in range(200)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert len(set(draws)) == 200
    assert draws != [step_uniform(8, step) for step in range(200)]
    mean = sum(draws) / len(draws)
    assert abs(mean - 0.5) < 0.1


def test_pick_token_greedy_and_top_k_one_ignore_the_random_number() -> None:
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert pick_token(logits, 0.0, 0, 1.0, 0.999) == 1
    assert pick_token(logits, 1.5, 1, 1.0, 0.999) == 1
    assert pick_token(logits, 1.0, 0, 1e-9, 0.999) == 1  # a tiny top_p keeps only the top token
    assert pick_token(logits, 1.0, 0, 1.0, 0.999) != 1  # plain sampling reaches the tail at u ~ 1


def test_force_token_leaves_one_finite_logit() -> None:
    row = torch.randn(10)
    force_token(row, 3)
    assert int(torch.argmax(row)) == 3
    assert torch.isfinite(row).sum() == 1


class _Allow:
    """A test constraint: only ``allowed`` tokens, finished after ``length`` tokens."""

    def __init__(self, allowed: list[int], length: int) -> None:
        self.allowed, self.length, self.seen = allowed, length, []

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        keep = torch.full_like(logits, NEG_INF)
        keep[self.allowed] = 0.0
        return logits + keep

    def advance(self, token_id: int) -> None:
        self.seen.append(token_id)

    @property
    def is_finished(self) -> bool:
        return len(self.seen) >= self.length


def _run(decoder: GuidedDecoder, cond_rows: list[torch.Tensor], uncond_rows: list[torch.Tensor] | None) -> list[int]:
    out: list[int] = []
    for step, cond in enumerate(cond_rows):
        out.append(decoder.next_token(cond, None if uncond_rows is None else uncond_rows[step], out))
    return out


def test_decoder_masks_after_guidance_and_stops_when_the_constraint_finishes() -> None:
    torch.manual_seed(0)
    cond = [torch.randn(20) for _ in range(4)]
    uncond = [torch.randn(20) for _ in range(4)]
    settings = SamplingSettings(temperature=0.0, cfg_scale=2.0, stop_token_ids=(19,))
    made: list[_Allow] = []

    def factory() -> _Allow:
        made.append(_Allow([2, 5, 7], length=3))
        return made[-1]

    tokens = _run(GuidedDecoder(settings, [1, 2], factory), cond, uncond)
    assert tokens[3] == 19 and all(t in (2, 5, 7) for t in tokens[:3])
    for step in range(3):
        combined = uncond[step] + 2.0 * (cond[step] - uncond[step])
        masked = torch.full((20,), NEG_INF)
        masked[[2, 5, 7]] = combined[[2, 5, 7]]
        assert tokens[step] == int(torch.argmax(masked))
    assert made[0].seen == tokens[:3]


def test_decoder_rebuilt_midway_continues_identically() -> None:
    """vLLM drops a preempted request's decoder; a new one must pick the same tokens."""
    torch.manual_seed(1)
    rows = [torch.randn(30) for _ in range(8)]
    settings = SamplingSettings(temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=11, stop_token_ids=(0,))

    def factory() -> _Allow:
        return _Allow(list(range(1, 30, 2)), length=100)

    whole = _run(GuidedDecoder(settings, [3, 4], factory), rows, None)
    first = GuidedDecoder(settings, [3, 4], factory)
    out: list[int] = []
    for step in range(4):
        out.append(first.next_token(rows[step], None, out))
    second = GuidedDecoder(settings, [3, 4], factory)
    for step in range(4, 8):
        out.append(second.next_token(rows[step], None, out))
    assert out == whole


def test_decoder_seed_changes_sampled_tokens() -> None:
    torch.manual_seed(2)
    rows = [torch.randn(100) for _ in range(12)]
    runs = {seed: _run(GuidedDecoder(SamplingSettings(temperature=1.0, seed=seed), [1]), rows, None) for seed in (1, 2)}
    assert runs[1] == _run(GuidedDecoder(SamplingSettings(temperature=1.0, seed=1), [1]), rows, None)
    assert runs[1] != runs[2]


def test_repetition_penalty_in_the_decoder_covers_the_prompt() -> None:
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0])
    plain = GuidedDecoder(SamplingSettings(temperature=0.0), [1])
    penalized = GuidedDecoder(SamplingSettings(temperature=0.0, repetition_penalty=2.0), [1])
    assert plain.next_token(logits, None, []) == 1
    assert penalized.next_token(logits, None, []) == 2  # 3/2 < 2


def test_guided_decoder_requires_the_unconditional_row() -> None:
    decoder = GuidedDecoder(SamplingSettings(cfg_scale=2.0), [1])
    with pytest.raises(ValueError):
        decoder.next_token(torch.zeros(4), None, [])
