"""CFG batch doubling, APG, ADG and the cfg interval."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_service.guidance import (
    GuidanceSettings,
    MomentumBuffer,
    adg,
    apg,
    double_batch,
    double_conditions,
    guide,
    project,
    split_cfg,
)
from dit_service.sampler import SamplerSettings
from shared.errors import InvalidArgument

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "golden"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(1234)


def test_base_apg_replays_the_saved_trajectory() -> None:
    """Saved raw DiT outputs (batch [cond ; null]) -> APG -> Euler reproduce every next input."""
    out = load_file(GOLDEN / "cases" / "base_cfg_apg" / "outputs.safetensors")
    states, velocities = out["traj_decoder_hidden_states"], out["traj_decoder_velocity"]
    sampler = SamplerSettings(is_turbo=False, shift=3.0, num_steps=6).build()
    settings, momentum = GuidanceSettings(scale=3.0), MomentumBuffer()
    x = out["noise"]
    for k in range(sampler.num_steps):
        assert torch.equal(double_batch(x), states[k])
        velocity = guide(velocities[k], x, sampler.timestep(k), settings, momentum)
        x = sampler.step(velocity, k, x)
    torch.testing.assert_close(x, out["target_latents"], rtol=0, atol=1e-6)


def test_doubled_conditions_put_the_null_embedding_in_the_second_half() -> None:
    enc, context, null = torch.randn(2, 5, 4), torch.randn(2, 3, 8), torch.randn(1, 1, 4)
    enc2, context2 = double_conditions(enc, context, null)
    assert enc2.shape == (4, 5, 4) and context2.shape == (4, 3, 8)
    assert torch.equal(enc2[:2], enc) and torch.equal(enc2[2:], null.expand(2, 5, 4))
    assert torch.equal(context2[:2], context) and torch.equal(context2[2:], context)
    cond, uncond = split_cfg(torch.cat([enc, -enc]))
    assert torch.equal(cond, enc) and torch.equal(uncond, -enc)


def test_apg_with_scale_one_is_the_conditional_prediction() -> None:
    cond, uncond = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    torch.testing.assert_close(apg(cond, uncond, 1.0, MomentumBuffer()), cond, rtol=0, atol=0)


def test_apg_adds_only_the_part_orthogonal_to_cond_over_time() -> None:
    cond, uncond = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    update = (apg(cond, uncond, 3.0, None) - cond) / 2.0
    dots = (update.double() * cond.double()).sum(dim=1)  # [B, C]: time axis reduced
    assert dots.abs().max() < 1e-5
    assert update.abs().max() > 1e-3


def test_apg_clips_the_difference_norm_over_time() -> None:
    cond = torch.randn(1, 16, 3)
    uncond = cond - 100.0 * torch.randn(1, 16, 3)
    update = (apg(cond, uncond, 2.0, None) - cond).double()
    assert update.norm(dim=1).max() <= 2.5 + 1e-5
    small = cond - 1e-3 * torch.randn(1, 16, 3)
    _, expected = project(cond - small, cond)
    torch.testing.assert_close(apg(cond, small, 2.0, None) - cond, expected, rtol=0, atol=1e-6)


def test_momentum_buffer_keeps_a_negative_running_average() -> None:
    buffer = MomentumBuffer()
    d1, d2 = torch.randn(3), torch.randn(3)
    assert torch.equal(buffer.update(d1), d1)
    torch.testing.assert_close(buffer.update(d2), d2 - 0.75 * d1)


def test_projection_splits_into_parallel_and_orthogonal_parts() -> None:
    value, direction = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    parallel, orthogonal = project(value, direction)
    torch.testing.assert_close(parallel + orthogonal, value)
    assert (orthogonal.double() * direction.double()).sum(dim=1).abs().max() < 1e-5


def _adg_expected(angle: float, scale: float) -> torch.Tensor:
    """ADG in 2-D with x = 0, sigma = 1, x0_uncond = e1 and x0_cond at ``angle`` from it."""
    weight = max(scale - 1, 0) + 1e-3
    new = min(weight * angle, 3.14 / 6)  # the reference's literal clip, not pi / 6
    x0_new = (math.cos(new) * math.cos(angle), math.cos(new) * math.sin(angle) + math.sin(new))
    return -torch.tensor(x0_new, dtype=torch.float64).view(1, 1, 2)


@pytest.mark.parametrize(("angle", "scale"), [(0.2, 2.0), (0.2, 10.0), (1.0, 1.2)])
def test_adg_rotates_the_clean_estimate_with_a_clipped_angle(angle: float, scale: float) -> None:
    sample = torch.zeros(1, 1, 2, dtype=torch.float64)
    x0_cond = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64).view(1, 1, 2)
    x0_uncond = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 2)
    got = adg(sample, -x0_cond, -x0_uncond, 1.0, scale)
    torch.testing.assert_close(got, _adg_expected(angle, scale), rtol=0, atol=1e-6)


def test_adg_treats_frames_independently_and_keeps_dtype() -> None:
    sample, cond, uncond = torch.randn(2, 6, 64), torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    base = adg(sample, cond, uncond, 0.7, 4.0)
    changed = uncond.clone()
    changed[1, 3] += 1.0
    other = adg(sample, cond, changed, 0.7, 4.0)
    assert base.dtype == torch.float32
    differs = (base != other).any(dim=-1)  # [B, T]
    assert differs[1, 3] and int(differs.sum()) == 1


def test_cfg_interval_is_inclusive_and_compared_in_float32() -> None:
    settings = GuidanceSettings(scale=3.0, interval_start=0.3, interval_end=0.7)
    t07 = torch.tensor(0.7, dtype=torch.float32).item()  # 0.69999998..., below 0.7 in double
    assert settings.applies_at(t07) and settings.applies_at(0.3) and settings.applies_at(0.5)
    assert not settings.applies_at(0.71) and not settings.applies_at(0.29)


def test_guide_outside_the_interval_returns_cond_and_leaves_momentum_alone() -> None:
    settings = GuidanceSettings(scale=3.0, interval_start=0.3, interval_end=0.7)
    doubled, sample, momentum = torch.randn(4, 5, 3), torch.randn(2, 5, 3), MomentumBuffer()
    assert torch.equal(guide(doubled, sample, 0.9, settings, momentum), doubled[:2])
    assert momentum.running is None
    guided = guide(doubled, sample, 0.5, settings, momentum)
    assert momentum.running is not None
    torch.testing.assert_close(guided, apg(doubled[:2], doubled[2:], 3.0, MomentumBuffer()))


def test_guide_uses_adg_when_asked() -> None:
    settings = GuidanceSettings(scale=4.0, use_adg=True)
    doubled, sample = torch.randn(4, 5, 3), torch.randn(2, 5, 3)
    expected = adg(sample, doubled[:2], doubled[2:], 0.6, 4.0)
    assert torch.equal(guide(doubled, sample, 0.6, settings, MomentumBuffer()), expected)


def test_guidance_settings_validate_the_interval() -> None:
    assert not GuidanceSettings(scale=1.0).is_enabled and GuidanceSettings(scale=1.5).is_enabled
    with pytest.raises(InvalidArgument, match="cfg interval"):
        GuidanceSettings(scale=2.0, interval_start=0.8, interval_end=0.2).validate()
