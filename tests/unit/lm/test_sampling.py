"""The shared sampling pipeline (no model, no vLLM): guidance formula, batched filters, seeded
sampling, and the batched decision of many requests (constraints, windows, seeds, batch mates)."""

from __future__ import annotations

import pytest
import torch

from lm_service.constraints.masking import TokenWindow
from lm_service.engine.decoding import DecodeRow, GuidedDecoder, decode_step
from lm_service.engine.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    cfg_combine,
    force_tokens,
    pick_tokens,
    sample_inverse_cdf,
    step_uniform,
    top_k_filter,
    top_p_filter,
)
from lm_service.engine.types import SamplingSettings

NEG_INF = float("-inf")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _top_p_one(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    return top_p_filter(logits.reshape(1, -1), torch.tensor([top_p], dtype=torch.float64))[0]


def test_cfg_combine_is_linear_in_raw_logits_float32_and_per_row() -> None:
    cond = torch.tensor([[2.0, 0.0, -1.0], [1.0, 1.0, 1.0]], dtype=torch.bfloat16)
    uncond = torch.tensor([[1.0, 1.0, -1.0], [0.0, 2.0, 1.0]], dtype=torch.bfloat16)
    out = cfg_combine(cond, uncond, torch.tensor([3.0, 2.0]))
    assert out.dtype == torch.float32
    assert out.tolist() == [[4.0, -2.0, -1.0], [2.0, 0.0, 1.0]]  # u + s (c - u)


def test_cfg_with_a_scale_tensor_equals_the_scalar_formula_bit_for_bit() -> None:
    cond, uncond = _randn(3, 500, seed=0), _randn(3, 500, seed=1)
    batched = cfg_combine(cond, uncond, torch.tensor([1.5, 2.0, 3.7]))
    for row, scale in enumerate((1.5, 2.0, 3.7)):
        assert torch.equal(batched[row], uncond[row] + scale * (cond[row] - uncond[row]))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_per_row() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, 1.0], [2.0, -2.0, 3.0, 1.0]])
    rows, columns = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 1, 2])
    out = apply_repetition_penalty(logits, rows, columns, torch.tensor([2.0, 4.0]))
    assert out.tolist() == [[1.0, -4.0, 3.0, 1.0], [2.0, -2.0, 0.75, 1.0]]
    assert logits[0].tolist() == [2.0, -2.0, 3.0, 1.0]  # input untouched


def test_repetition_penalty_matches_the_scalar_formula_bit_for_bit() -> None:
    logits = _randn(1, 300, seed=2)
    ids = torch.arange(0, 300, 3)
    out = apply_repetition_penalty(logits, torch.zeros_like(ids), ids, torch.tensor([1.3]))
    picked = logits[0, ids]
    assert torch.equal(out[0, ids], torch.where(picked < 0, picked * 1.3, picked / 1.3))


def test_temperature_scales_each_row() -> None:
    logits = torch.tensor([[2.0, -4.0], [2.0, -4.0]])
    assert apply_temperature(logits, torch.tensor([2.0, 0.5])).tolist() == [[1.0, -2.0], [4.0, -8.0]]
    assert apply_temperature(logits, torch.tensor([1.0, 1.0])) is logits


def test_top_k_keeps_each_rows_k_largest() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]] * 3)
    out = top_k_filter(logits, torch.tensor([2, 0, 3]))
    assert torch.isfinite(out).tolist() == [[False, True, False, False, True], [True] * 5,
                                            [False, True, True, False, True]]
    assert top_k_filter(logits, torch.tensor([0, 0, 9])) is logits


def test_top_p_keeps_the_token_that_crosses_p_and_always_the_top_token() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isfinite(_top_p_one(logits, 0.7)).tolist() == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert torch.isfinite(_top_p_one(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(_top_p_one(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(_top_p_one(logits, 1e-6)).tolist() == [True, False, False, False]
    batch = logits.repeat(2, 1)
    assert top_p_filter(batch, torch.tensor([1.0, 1.0], dtype=torch.float64)) is batch


def test_top_p_filter_works_on_unsorted_vocab_order() -> None:
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    assert torch.isfinite(_top_p_one(logits, 0.7)).tolist() == [False, True, False, True]


def _top_p_by_full_sort(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    values, order = torch.sort(logits, descending=True)
    probs = torch.softmax(values, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    drop[0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), NEG_INF)


@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
@pytest.mark.parametrize("shape", ["plain", "masked", "outlier"])
def test_top_p_keeps_the_same_set_as_a_full_sort(scale: float, top_p: float, shape: str) -> None:
    """Peaked and flat rows, rows with masked (-inf) ids, a row whose values crowd a few buckets."""
    logits = _randn(5000, seed=3) * scale
    if shape == "masked":
        logits[::3] = NEG_INF
    elif shape == "outlier":
        logits[7] = logits.max() + 40.0 * scale  # one far value: the rest share few histogram buckets
    assert torch.equal(torch.isfinite(_top_p_one(logits, top_p)), torch.isfinite(_top_p_by_full_sort(logits, top_p)))


def test_top_p_rows_are_filtered_on_their_own() -> None:
    """A flat row (kept set beyond the candidates) next to a peaked one and an unfiltered one."""
    rows = torch.stack([_randn(5000, seed=4) * 0.01, _randn(5000, seed=5) * 8.0, _randn(5000, seed=6)])
    out = top_p_filter(rows, torch.tensor([0.999, 0.3, 1.0], dtype=torch.float64))
    assert torch.equal(out[0], _top_p_one(rows[0], 0.999))
    assert torch.equal(out[1], _top_p_one(rows[1], 0.3))
    assert torch.equal(out[2], rows[2])


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_masked_tokens() -> None:
    logits = torch.tensor([0.1, 0.0, 0.6, 0.3]).log()  # log(0) = -inf
    num_draws = 1000
    uniforms = (torch.arange(num_draws, dtype=torch.float64) + 0.5) / num_draws
    counts = torch.bincount(sample_inverse_cdf(logits.repeat(num_draws, 1), uniforms), minlength=4)
    assert counts[1] == 0
    for token, p in enumerate((0.1, 0.0, 0.6, 0.3)):
        assert abs(int(counts[token]) / num_draws - p) <= 2 / num_draws


def test_sampling_a_window_equals_sampling_the_row_masked_outside_it() -> None:
    full = _randn(4, 3000, seed=7)
    window = torch.tensor(sorted({5, 17, 18, 19, 400, 2999} | set(range(1000, 1600))))
    masked = torch.full_like(full, NEG_INF)
    masked[:, window] = full[:, window]
    settings = dict(temperature=[0.85, 1.0, 1.3, 0.7], top_k=[0, 40, 0, 5], top_p=[0.9, 1.0, 0.5, 0.95])
    for step in range(20):
        uniforms = [step_uniform(seed, step) for seed in range(4)]
        whole = pick_tokens(masked, uniforms=uniforms, **settings)
        reduced = window[pick_tokens(full[:, window], uniforms=uniforms, **settings)]
        assert torch.equal(whole, reduced)


def test_a_rows_token_does_not_depend_on_its_batch_mates() -> None:
    rows = _randn(6, 4000, seed=8) * 3
    temperature, top_k, top_p = [1.0, 0.85, 0.0, 1.2, 0.9, 1.0], [0, 50, 0, 0, 1, 7], [0.9, 1.0, 1.0, 0.3, 1.0, 0.99]
    for step in range(10):
        uniforms = [step_uniform(seed, step) for seed in range(6)]
        together = pick_tokens(rows, temperature, top_k, top_p, uniforms).tolist()
        alone = [int(pick_tokens(rows[i:i + 1], [temperature[i]], [top_k[i]], [top_p[i]], [uniforms[i]])[0])
                 for i in range(6)]
        assert together == alone


def test_step_uniform_depends_only_on_seed_and_step() -> None:
    draws = [step_uniform(7, step) for step in range(2000)]
    assert draws == [step_uniform(7, step) for step in range(2000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert len(set(draws)) == 2000
    assert abs(sum(draws) / len(draws) - 0.5) < 0.03
    deciles = [sum(1 for u in draws if i / 10 <= u < (i + 1) / 10) for i in range(10)]
    assert min(deciles) > 150 and max(deciles) < 250
    neighbour = [step_uniform(8, step) for step in range(2000)]
    assert not set(draws[1:]) & set(neighbour)  # nearby seeds are not shifted copies of one stream


def test_pick_tokens_greedy_and_top_k_one_ignore_the_random_number() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]] * 4)
    picked = pick_tokens(logits, [0.0, 1.5, 1.0, 1.0], [0, 1, 0, 0], [1.0, 1.0, 1e-9, 1.0], [0.999] * 4)
    assert picked.tolist()[:3] == [1, 1, 1]  # greedy, top_k 1, a tiny top_p keeps only the top token
    assert picked.tolist()[3] != 1  # plain sampling reaches the tail at u ~ 1


def test_force_tokens_leaves_one_finite_logit_per_row() -> None:
    logits = _randn(4, 10, seed=9)
    untouched = logits[1].clone()
    force_tokens(logits, torch.tensor([0, 2, 3]), torch.tensor([3, 7, 3]))
    assert torch.argmax(logits, dim=-1)[[0, 2, 3]].tolist() == [3, 7, 3]
    assert torch.isfinite(logits).sum(dim=-1).tolist() == [1, 10, 1, 1]
    assert torch.equal(logits[1], untouched)


class _Allow:
    """A test constraint: only ``allowed`` tokens, finished after ``length`` tokens."""

    def __init__(self, allowed: list[int], length: int, fail_at: int = -1) -> None:
        self.allowed, self.length, self.fail_at, self.seen = allowed, length, fail_at, []

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if len(self.seen) == self.fail_at:
            raise RuntimeError("fails on purpose")
        keep = torch.full_like(logits, NEG_INF)
        keep[self.allowed] = 0.0
        return logits + keep

    def advance(self, token_id: int) -> None:
        self.seen.append(token_id)

    @property
    def is_finished(self) -> bool:
        return len(self.seen) >= self.length


class _Windowed(_Allow):
    """``_Allow`` that also declares its allowed tokens as a window (every other step blocks the
    window's first half)."""

    def __init__(self, window: torch.Tensor, length: int) -> None:
        super().__init__(window.tolist(), length)
        self.window = TokenWindow(window)
        half = torch.arange(window.numel()) < window.numel() // 2
        self.half_blocked = TokenWindow(window, half)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        window = self.allowed_window()
        allowed = window.ids if window.blocked is None else window.ids[~window.blocked]
        keep = torch.full_like(logits, NEG_INF)
        keep[allowed] = 0.0
        return logits + keep

    def allowed_window(self) -> TokenWindow:
        return self.half_blocked if len(self.seen) % 2 else self.window


def _run(decoder: GuidedDecoder, cond_rows: list[torch.Tensor], uncond_rows: list[torch.Tensor] | None) -> list[int]:
    out: list[int] = []
    for step, cond in enumerate(cond_rows):
        out.append(decoder.next_token(cond, None if uncond_rows is None else uncond_rows[step], out))
    return out


def test_decoder_masks_after_guidance_and_stops_when_the_constraint_finishes() -> None:
    cond = list(_randn(4, 20, seed=10))
    uncond = list(_randn(4, 20, seed=11))
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
    rows = list(_randn(8, 30, seed=12))
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
    rows = list(_randn(12, 100, seed=13))
    runs = {seed: _run(GuidedDecoder(SamplingSettings(temperature=1.0, seed=seed), [1]), rows, None) for seed in (1, 2)}
    assert runs[1] == _run(GuidedDecoder(SamplingSettings(temperature=1.0, seed=1), [1]), rows, None)
    assert runs[1] != runs[2]


def test_repetition_penalty_in_the_decoder_covers_the_prompt_and_the_output() -> None:
    logits = torch.tensor([0.0, 3.0, 2.0, 2.5])
    plain = GuidedDecoder(SamplingSettings(temperature=0.0), [1])
    penalized = GuidedDecoder(SamplingSettings(temperature=0.0, repetition_penalty=2.0), [1])
    assert plain.next_token(logits, None, []) == 1
    assert penalized.next_token(logits, None, []) == 3  # 3/2 < 2.5
    assert penalized.next_token(logits, None, [3]) == 2  # 3/2, 2.5/2 < 2


def test_guided_decoder_requires_the_unconditional_row() -> None:
    decoder = GuidedDecoder(SamplingSettings(cfg_scale=2.0), [1])
    with pytest.raises(ValueError):
        decoder.next_token(torch.zeros(4), None, [])


def _mixed_requests(num_steps: int, width: int):
    """Five requests (guided, constrained, windowed, penalised, greedy) and their logits per step."""
    window = torch.tensor([3] + list(range(40, width - 10)))
    specs = [
        (SamplingSettings(temperature=0.9, top_p=0.95, cfg_scale=2.5, seed=1, stop_token_ids=(0,)), None),
        (SamplingSettings(temperature=1.0, top_k=20, seed=2, stop_token_ids=(0,)),
         lambda: _Allow(list(range(10, width, 3)), length=100)),
        (SamplingSettings(temperature=0.8, cfg_scale=1.5, repetition_penalty=1.4, seed=3, stop_token_ids=(0,)),
         lambda: _Windowed(window, length=100)),
        (SamplingSettings(temperature=1.1, repetition_penalty=0.7, seed=4), None),
        (SamplingSettings(temperature=0.0, cfg_scale=3.0), None),
    ]
    cond = _randn(num_steps, len(specs), width, seed=14) * 2
    uncond = _randn(num_steps, len(specs), width, seed=15) * 2
    return specs, cond, uncond


def test_decode_step_gives_each_request_the_tokens_it_gets_alone() -> None:
    specs, cond, uncond = _mixed_requests(num_steps=12, width=300)
    alone = []
    for i, (settings, factory) in enumerate(specs):
        decoder = GuidedDecoder(settings, [5, 6, 7], factory)
        guided = settings.cfg_scale > 1
        alone.append(_run(decoder, list(cond[:, i]), list(uncond[:, i]) if guided else None))
    decoders = [GuidedDecoder(settings, [5, 6, 7], factory) for settings, factory in specs]
    together: list[list[int]] = [[] for _ in specs]
    for step in range(12):
        logits = torch.cat([uncond[step], cond[step]])  # [10, W]: all uncond rows first, then cond
        rows = [DecodeRow(d, together[i], len(specs) + i, i if d.uses_guidance else None)
                for i, d in enumerate(decoders)]
        for i, token in enumerate(decode_step(logits, rows)):
            together[i].append(token)
    assert together == alone
    assert len({tuple(tokens) for tokens in together}) == len(specs)


def test_a_windowed_constraint_decides_like_its_full_row_mask() -> None:
    window = torch.tensor([2] + list(range(50, 250)))
    settings = SamplingSettings(temperature=0.9, top_p=0.9, cfg_scale=2.0, repetition_penalty=1.2, seed=5)
    cond, uncond = list(_randn(16, 260, seed=16)), list(_randn(16, 260, seed=17))

    class _RowMaskOnly(_Windowed):
        allowed_window = None  # the engine sees no window and masks the full row

        def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
            window = _Windowed.allowed_window(self)
            allowed = window.ids if window.blocked is None else window.ids[~window.blocked]
            keep = torch.full_like(logits, NEG_INF)
            keep[allowed] = 0.0
            return logits + keep

    windowed = _run(GuidedDecoder(settings, [60, 61], lambda: _Windowed(window, 100)), cond, uncond)
    full_row = _run(GuidedDecoder(settings, [60, 61], lambda: _RowMaskOnly(window, 100)), cond, uncond)
    assert windowed == full_row
    assert all(t in window.tolist() for t in windowed)


def test_logits_computed_for_the_window_only_give_the_same_tokens() -> None:
    window = torch.tensor([2] + list(range(50, 250)))
    settings = SamplingSettings(temperature=1.0, top_k=30, cfg_scale=2.0, seed=6)
    full = _randn(10, 2, 260, seed=18)
    expected = _run(GuidedDecoder(settings, [1], lambda: _Windowed(window, 100)), list(full[:, 0]), list(full[:, 1]))
    decoder = GuidedDecoder(settings, [1], lambda: _Windowed(window, 100))
    out: list[int] = []
    for step in range(10):
        ids = decoder.plan(out).window.ids
        result = decode_step(full[step][:, ids], [DecodeRow(decoder, out, 0, 1)], columns=ids)[0]
        out.append(result)
    assert out == expected


def test_a_failing_or_empty_constraint_ends_only_its_own_request() -> None:
    logits = _randn(3, 50, seed=19)
    broken = GuidedDecoder(SamplingSettings(temperature=0.0, stop_token_ids=(1,)), [], lambda: _Allow([4], 9, 0))
    empty = GuidedDecoder(SamplingSettings(temperature=0.0, stop_token_ids=(7,)), [], lambda: _Allow([], 9))
    healthy = GuidedDecoder(SamplingSettings(temperature=0.0), [])
    results = decode_step(logits, [DecodeRow(broken, [], 0), DecodeRow(empty, [], 1), DecodeRow(healthy, [], 2)])
    assert isinstance(results[0], RuntimeError)
    assert results[1] == 7  # nothing allowed: the stop token
    assert results[2] == int(torch.argmax(logits[2]))
