"""Timestep schedules and the flow-matching sampler (turbo / base, ODE / SDE)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_service import schedules
from dit_service.sampler import FlowMatchSampler, SamplerSettings, add_noise, predict_x0
from shared.errors import Internal, InvalidArgument

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "golden"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(1234)


def _outputs(case: str) -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "cases" / case / "outputs.safetensors")


def _shifted(shift: float, u: float) -> float:
    return shift * u / (1 + (shift - 1) * u)


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0])
def test_turbo_tables_are_the_shifted_eight_step_grid(shift: float) -> None:
    table = schedules.TURBO_SHIFT_TABLES[shift]
    assert len(table) == schedules.TURBO_NUM_STEPS
    for i, value in enumerate(table):
        assert value == pytest.approx(_shifted(shift, 1 - i / 8), abs=1e-15)


def test_valid_timesteps_are_the_distinct_table_values_descending() -> None:
    union = {v for table in schedules.TURBO_SHIFT_TABLES.values() for v in table}
    assert len(schedules.VALID_TIMESTEPS) == 20
    assert set(schedules.VALID_TIMESTEPS) == union
    assert list(schedules.VALID_TIMESTEPS) == sorted(union, reverse=True)


@pytest.mark.parametrize(
    ("shift", "snapped"), [(1.3, 1.0), (1.5, 1.0), (1.51, 2.0), (2.5, 2.0), (2.6, 3.0), (5.0, 3.0), (0.2, 1.0)]
)
def test_shift_snaps_to_nearest_supported_value_smaller_on_ties(shift: float, snapped: float) -> None:
    assert schedules.snap_shift(shift) == snapped
    assert schedules.turbo_timesteps(shift) == schedules.TURBO_SHIFT_TABLES[snapped]


def test_non_positive_shift_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="shift"):
        schedules.snap_shift(0.0)


def test_custom_timesteps_follow_the_documented_example() -> None:
    got = schedules.snap_custom_timesteps([0.97, 0.76, 0.615, 0.5, 0.395, 0.28, 0.18, 0.085, 0])
    expected_table_values = [(3.0, 1), (2.0, 3), (1.0, 3), (1.0, 4), (2.0, 6), (3.0, 7), (2.0, 7), (1.0, 7)]
    assert got == tuple(schedules.TURBO_SHIFT_TABLES[s][i] for s, i in expected_table_values)


def test_custom_timesteps_strip_only_trailing_zeros_and_truncate_to_twenty() -> None:
    assert schedules.snap_custom_timesteps([0.5, 0.0, 0.3, 0.0, 0.0]) == (0.5, 0.125, 0.3)
    assert schedules.snap_custom_timesteps([0.0, 0.0]) is None
    assert schedules.snap_custom_timesteps([]) is None
    assert len(schedules.snap_custom_timesteps([0.9] * 25)) == 20
    # an all-zero list falls back to the shift table
    assert schedules.turbo_timesteps(2.0, [0.0]) == schedules.TURBO_SHIFT_TABLES[2.0]


@pytest.mark.parametrize(("value", "snapped"), [(0.45, 0.5), (0.3875, 0.4), (0.9772727272727273, 1.0)])
def test_custom_timestep_ties_go_to_the_first_valid_value(value: float, snapped: float) -> None:
    assert schedules.snap_custom_timesteps([value]) == (snapped,)


def test_custom_timesteps_of_the_golden_case() -> None:
    inputs = load_file(GOLDEN / "cases" / "turbo_custom_timesteps" / "inputs.safetensors")
    got = schedules.turbo_timesteps(3.0, inputs["timesteps"].tolist())
    assert got == (0.9545454545454546, 0.7692307692307693, 0.5454545454545454, 0.3)


@pytest.mark.parametrize(("num_steps", "shift"), [(1, 1.0), (6, 3.0), (30, 2.0), (200, 5.0)])
def test_base_schedule_runs_from_one_to_exactly_zero(num_steps: int, shift: float) -> None:
    grid = schedules.base_timesteps(num_steps, shift)
    assert len(grid) == num_steps + 1
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert all(a > b for a, b in zip(grid, grid[1:]))
    assert grid == schedules.round_to_dtype(grid)
    for i, value in enumerate(grid):
        assert value == pytest.approx(_shifted(shift, 1 - i / num_steps), abs=1e-6)


def test_base_schedule_rejects_zero_steps() -> None:
    with pytest.raises(InvalidArgument, match="num_steps"):
        schedules.base_timesteps(0, 3.0)


def test_schedules_match_the_timesteps_the_reference_fed_the_dit() -> None:
    turbo = SamplerSettings(is_turbo=True, shift=3.0).build()
    saved = _outputs("turbo_text2music_ode")["traj_decoder_timestep"][:, 0]
    assert torch.equal(torch.tensor(turbo.timesteps, dtype=torch.float32), saved)
    base = SamplerSettings(is_turbo=False, shift=3.0, num_steps=6).build()
    saved = _outputs("base_cfg_apg")["traj_decoder_timestep"][:, 0]
    assert torch.equal(torch.tensor(base.timesteps, dtype=torch.float32), saved)


def test_turbo_ode_replays_the_saved_trajectory_exactly() -> None:
    out = _outputs("turbo_text2music_ode")
    states, velocities = out["traj_decoder_hidden_states"], out["traj_decoder_velocity"]
    sampler = SamplerSettings(is_turbo=True, shift=3.0).build()
    x = out["noise"]
    for k in range(sampler.num_steps):
        assert torch.equal(x, states[k])
        x = sampler.step(velocities[k], k, x)
    assert torch.equal(x, out["target_latents"])


def _oracle_run(sampler: FlowMatchSampler, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Sample with the exact velocity of the straight path towards ``x0``; count noise draws."""
    x = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    draws = 0
    for k in range(sampler.num_steps):
        t = sampler.timestep(k)
        velocity = (x - x0) / t
        eps = None
        if sampler.needs_renoise(k):
            eps, draws = torch.randn(x0.shape, generator=generator, dtype=torch.float64), draws + 1
        x = sampler.step(velocity, k, x, renoise=eps)
    return x, draws


@pytest.mark.parametrize(
    ("settings", "expected_draws"),
    [
        (SamplerSettings(is_turbo=True, infer_method="ode", shift=3.0), 0),
        (SamplerSettings(is_turbo=True, infer_method="sde", shift=1.0), 7),
        (SamplerSettings(is_turbo=True, infer_method="sde", timesteps=(0.97, 0.5)), 1),
        (SamplerSettings(is_turbo=False, infer_method="ode", shift=3.0, num_steps=5), 0),
        (SamplerSettings(is_turbo=False, infer_method="sde", shift=3.0, num_steps=5), 5),
    ],
)
def test_exact_velocity_lands_on_the_data(settings: SamplerSettings, expected_draws: int) -> None:
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 7, 4, generator=generator, dtype=torch.float64)
    got, draws = _oracle_run(settings.build(), x0, generator)
    assert draws == expected_draws
    torch.testing.assert_close(got, x0, rtol=0, atol=1e-10)


def test_turbo_last_step_jumps_to_the_clean_estimate() -> None:
    sampler = SamplerSettings(is_turbo=True, shift=3.0).build()
    x, v = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
    last = sampler.num_steps - 1
    assert sampler.level_after(last) is None
    assert torch.equal(sampler.step(v, last, x), x - v * sampler.timestep(last))


def test_base_sde_renoises_to_the_unshifted_grid() -> None:
    sampler = SamplerSettings(is_turbo=False, infer_method="sde", shift=3.0, num_steps=4).build()
    x, v, eps = torch.randn(1, 5, 3), torch.randn(1, 5, 3), torch.randn(1, 5, 3)
    for k in range(4):
        level = 1.0 - (k + 1) / 4
        assert sampler.level_after(k) == level
        if k > 0:  # the model runs at shifted times, above the unshifted grid
            assert sampler.timestep(k) > 1.0 - k / 4
        expected = add_noise(predict_x0(x, v, sampler.timestep(k)), eps, level)
        assert torch.equal(sampler.step(v, k, x, renoise=eps), expected)


def test_ode_step_is_euler_to_the_next_timestep() -> None:
    sampler = SamplerSettings(is_turbo=False, shift=2.0, num_steps=3).build()
    x, v = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    grid = schedules.base_timesteps(3, 2.0)
    for k in range(3):
        torch.testing.assert_close(sampler.step(v, k, x), x - v * (grid[k] - grid[k + 1]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("is_turbo", "strength", "start", "remaining"),
    [(True, 0.4, 0.6428571428571429, 3), (True, 1.0, 0.3, 1), (True, 0.01, 1.0, 8), (False, 0.5, None, 2)],
)
def test_cover_noise_start_truncates_the_schedule(is_turbo: bool, strength: float, start: float | None, remaining: int):
    sampler = SamplerSettings(is_turbo=is_turbo, shift=3.0, num_steps=6).build()
    full = sampler.timesteps
    level = sampler.start_from_source(strength)
    if start is not None:
        assert level == start
    else:  # base: nearest scheduled float32 value to 1 - strength
        assert level == min(full, key=lambda t: abs(t - (1 - strength)))
    assert sampler.num_steps == remaining
    assert sampler.timesteps == full[-remaining:]
    assert sampler.timestep(0) == pytest.approx(level, abs=1e-7)


def test_cover_noise_strength_out_of_range_is_rejected() -> None:
    sampler = SamplerSettings(is_turbo=True).build()
    with pytest.raises(InvalidArgument, match="cover_noise_strength"):
        sampler.start_from_source(1.5)


def test_misuse_raises_typed_errors() -> None:
    with pytest.raises(InvalidArgument, match="infer_method"):
        FlowMatchSampler(is_turbo=True, infer_method="heun")
    with pytest.raises(Internal, match="set_timesteps"):
        FlowMatchSampler(is_turbo=True).step(torch.zeros(1), 0, torch.zeros(1))
    sde = SamplerSettings(is_turbo=True, infer_method="sde").build()
    with pytest.raises(Internal, match="renoise"):
        sde.step(torch.zeros(1, 2, 3), 0, torch.zeros(1, 2, 3))


def test_bf16_models_see_bf16_rounded_timesteps() -> None:
    """The reference builds its schedule tensor in the model dtype (documented bf16 values)."""
    turbo = SamplerSettings(is_turbo=True, shift=3.0).build(torch.bfloat16)
    assert turbo.timesteps == (1.0, 0.953125, 0.8984375, 0.83203125, 0.75, 0.64453125, 0.5, 0.30078125)
    base = SamplerSettings(is_turbo=False, shift=3.0, num_steps=6).build(torch.bfloat16)
    assert base.timesteps == schedules.round_to_dtype(base.timesteps, torch.bfloat16)
    assert base.timesteps != SamplerSettings(is_turbo=False, shift=3.0, num_steps=6).build().timesteps
    x, v = torch.randn(1, 4, 3, dtype=torch.bfloat16), torch.randn(1, 4, 3, dtype=torch.bfloat16)
    step_size = torch.tensor(turbo.timestep(0) - turbo.timestep(1), dtype=torch.bfloat16)
    assert torch.equal(turbo.step(v, 0, x), x - v * step_size)
