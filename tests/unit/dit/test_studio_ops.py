"""The studio operations' math on the DiT side: retake noise mixing, the two-sided extend layout
and its crossfade, the flow-edit schedule and loop, and the cfg_type rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dit_service import conditioning, studio
from dit_service.conditioning import RowInputs
from dit_service.denoise import Conditions, DenoiseInputs, Randomness, crossfade_boundaries, denoise, seeded_noise
from dit_service.flow_edit import EditInputs, flow_edit
from dit_service.guidance import GuidanceSettings, MomentumBuffer, cfg, cfg_star, guide
from dit_service.planning import Sources, plan_request
from dit_service.sampler import SamplerSettings
from gateway.studio_ops import retake_terms, retake_weights
from shared.errors import InvalidArgument
from shared.types import GenerationParams

FRAMES, CHANNELS = 130, 64
SILENCE = torch.linspace(-1, 1, 200 * CHANNELS).reshape(1, 200, CHANNELS)


class _Oracle:
    """A decoder with the exact flow-matching velocity toward a target named by the condition:
    ``v = (x - target) / t`` with ``target = enc[:, 0, :64]`` on every frame (so sampling from
    any start lands on the target, and the flow edit moves the source by target - source)."""

    null_condition_emb = torch.zeros(1, 1, CHANNELS)

    def decoder(self, x, t, r, enc, context, **_):
        target = enc[:, :1, :CHANNELS].expand_as(x)  # [B, T, 64]
        return (x - target) / t[:, None, None]


def _conditions(target: torch.Tensor) -> Conditions:
    """Conditions whose oracle target is ``target [B, 64]``."""
    batch = target.shape[0]
    return Conditions(encoder_hidden_states=target[:, None, :].repeat(1, 3, 1),
                      context_latents=torch.zeros(batch, FRAMES, 2 * CHANNELS))


# --- retake -----------------------------------------------------------------------------------

def test_retake_weights_are_variance_preserving_with_exact_ends() -> None:
    assert retake_weights(0.0) == (1.0, 0.0) and retake_weights(1.0) == (0.0, 1.0)
    for variance in (0.1, 0.3, 0.5, 0.9):
        keep, new = retake_weights(variance)
        assert keep == pytest.approx(math.cos(variance * math.pi / 2)) and keep ** 2 + new ** 2 == pytest.approx(1.0)


def test_retake_terms_chain_and_endpoints() -> None:
    base = ((11, 1.0),)
    assert retake_terms(base, 22, 0.0) == base
    assert retake_terms(base, 22, 1.0) == ((22, 1.0),)
    once = retake_terms(base, 22, 0.3)
    twice = retake_terms(once, 33, 0.6)
    assert [seed for seed, _ in twice] == [11, 22, 33]
    assert sum(w * w for _, w in twice) == pytest.approx(1.0)  # independent draws: unit variance kept
    assert retake_terms(twice, 44, 0.0) == twice
    assert retake_terms(base, 11, 0.5) == ((11, sum(retake_weights(0.5))),)  # the same seed merges


def test_mixed_draws_are_the_weighted_seeded_draws() -> None:
    shape = (3, FRAMES, CHANNELS)
    keep, new = retake_weights(0.4)
    request = DenoiseInputs(conditions=_conditions(torch.zeros(3, CHANNELS)), sampling=SamplerSettings(is_turbo=True),
                            seeds=[5, 6, 7], noise_mix=[(), ((5, keep), (9, new)), ((9, 1.0),)])
    randomness = Randomness(request, shape, torch.float32, torch.device("cpu"))
    first, second = randomness.initial_noise(), randomness.draw()
    assert torch.equal(first[0], seeded_noise([5], FRAMES, torch.float32, torch.device("cpu"))[0])
    assert torch.equal(first[2], seeded_noise([9], FRAMES, torch.float32, torch.device("cpu"))[0])
    generators = [torch.Generator().manual_seed(s) for s in (5, 9)]
    draws = [[torch.randn((1, FRAMES, CHANNELS), generator=g) for _ in range(2)] for g in generators]
    torch.testing.assert_close(first[1], (keep * draws[0][0] + new * draws[1][0])[0], rtol=0, atol=0)
    torch.testing.assert_close(second[1], (keep * draws[0][1] + new * draws[1][1])[0], rtol=0, atol=0)


def test_noise_mix_needs_one_entry_per_item() -> None:
    request = DenoiseInputs(conditions=_conditions(torch.zeros(2, CHANNELS)), sampling=SamplerSettings(is_turbo=True),
                            seeds=[1, 2], noise_mix=[()])
    with pytest.raises(InvalidArgument, match="noise_mix"):
        Randomness(request, (2, FRAMES, CHANNELS), torch.float32, torch.device("cpu"))


# --- extend -----------------------------------------------------------------------------------

def test_extend_plan_pads_both_sides_and_generates_only_there() -> None:
    plan = conditioning.plan_extend(100, left_s=1.0, right_s=0.6)
    assert (plan.num_frames, plan.pad_left_frames, plan.pad_right_frames) == (100 + 25 + 15, 25, 15)
    assert plan.window is None and plan.windows == ((0, 25), (125, 140))
    assert conditioning.plan_extend(100, 0.0, 2.0).windows == ((100, 150),)
    with pytest.raises(InvalidArgument, match="extend_right_seconds"):
        conditioning.plan_extend(100, 0.0, 0.01)
    with pytest.raises(InvalidArgument, match="at most 600 s"):
        conditioning.plan_extend(100, 300.0, 300.0)


def test_soft_mask_ramps_into_the_kept_middle_from_both_spans() -> None:
    mask = studio.spans_mask(((0, 4), (12, 16)), 16)[None]  # generate 0-3 and 12-15, keep 4-11
    soft = studio.soft_mask(mask, 3)[0]
    ramp = torch.linspace(0, 1, 5)[1:-1]  # 0.25, 0.5, 0.75
    torch.testing.assert_close(soft[4:7], ramp.flip(0), rtol=0, atol=0)  # fading out after the left span
    torch.testing.assert_close(soft[9:12], ramp, rtol=0, atol=0)         # fading in before the right span
    assert soft[7:9].tolist() == [0.0, 0.0] and soft[:4].tolist() == [1.0] * 4
    short = studio.soft_mask(studio.spans_mask(((0, 2), (5, 7)), 7)[None], 3)[0]  # ramps meet: the larger wins
    assert short[2:5].tolist() == pytest.approx([0.75, 0.5, 0.75])


def test_one_span_crossfade_is_the_reference_ramp() -> None:
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 8:12] = True
    weight = crossfade_boundaries(torch.ones(1, 20, 1), torch.zeros(1, 20, 1), mask, 3)[0, :, 0]
    expected = torch.zeros(20)
    expected[5:8], expected[8:12], expected[12:15] = torch.tensor([0.25, 0.5, 0.75]), 1.0, torch.tensor([0.75, 0.5, 0.25])
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)


def test_extend_row_keeps_the_source_between_the_new_ends() -> None:
    source = torch.randn(60, CHANNELS, generator=torch.Generator().manual_seed(2))
    plan = conditioning.plan_extend(60, left_s=0.4, right_s=0.8)  # 10 + 60 + 20 frames
    padded = conditioning.pad_source(source, plan, SILENCE)
    row = RowInputs(num_frames=plan.num_frames, src_latents=padded, silence_window=True, windows=plan.windows)
    batch = conditioning.assemble([row], SILENCE, torch.float32, torch.device("cpu"))
    assert batch.chunk_masks[0, :, 0].tolist()[:90] == [1.0] * 10 + [0.0] * 60 + [1.0] * 20
    torch.testing.assert_close(batch.src_latents[0, 10:70], source, rtol=0, atol=0)
    torch.testing.assert_close(batch.src_latents[0, :10], SILENCE[0, :10], rtol=0, atol=0)
    torch.testing.assert_close(batch.repaint.clean_latents[0, 10:70], source, rtol=0, atol=0)
    conditions = Conditions(encoder_hidden_states=torch.full((1, 3, CHANNELS), 0.3),
                            context_latents=torch.zeros(1, batch.src_latents.shape[1], 2 * CHANNELS))
    out = denoise(_Oracle(), DenoiseInputs(conditions=conditions, sampling=SamplerSettings(is_turbo=True), seeds=[4],
                                           repaint=batch.repaint))
    fade = batch.repaint.crossfade_frames
    torch.testing.assert_close(out[0, 10 + fade:70 - fade], source[fade:60 - fade], rtol=0, atol=0)
    assert not torch.equal(out[0, 10:10 + fade], source[:fade])  # blended toward the new left part
    torch.testing.assert_close(out[0, :10], torch.full((10, CHANNELS), 0.3), rtol=0, atol=1e-5)  # generated


# --- edit -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_min", "n_max", "first_edit", "first_regular"),
                         [(0.0, 0.0, 8, 8), (0.0, 1.0, 0, 8), (0.25, 0.5, 4, 6), (0.5, 0.5, 4, 4), (0.0, 0.29, 6, 8)])
def test_edit_schedule_counts_steps_from_the_data_end(n_min, n_max, first_edit, first_regular) -> None:
    schedule = studio.edit_schedule(8, n_min, n_max)
    assert (schedule.first_edit, schedule.first_regular) == (first_edit, first_regular)
    phases = [schedule.phase(i) for i in range(8)]
    assert phases == ([studio.EditPhase.SKIP] * first_edit + [studio.EditPhase.EDIT] * (first_regular - first_edit)
                      + [studio.EditPhase.REGULAR] * (8 - first_regular))
    assert studio.edit_schedule(100, 0.0, 0.29).first_edit == 71  # no float truncation below 29 steps


def _edit(source_target, target_target, n_min=0.0, n_max=1.0, seed=3, sampling=None):
    x_src = torch.randn(2, FRAMES, CHANNELS, generator=torch.Generator().manual_seed(8))
    inputs = DenoiseInputs(conditions=_conditions(source_target), sampling=sampling or SamplerSettings(is_turbo=True),
                           seeds=[seed, seed + 1])
    request = EditInputs(source=inputs, target=_conditions(target_target), src_latents=x_src, n_min=n_min, n_max=n_max)
    return x_src, flow_edit(_Oracle(), request)


def test_flow_edit_moves_the_source_by_the_condition_change() -> None:
    a, b = torch.randn(2, CHANNELS), torch.randn(2, CHANNELS)
    x_src, out = _edit(a, b)
    torch.testing.assert_close(out, x_src + (b - a)[:, None, :], rtol=0, atol=1e-4)
    x_src, out = _edit(a, b, n_max=0.5)  # exact velocities: half the slice gives the same shift
    torch.testing.assert_close(out, x_src + (b - a)[:, None, :], rtol=0, atol=1e-4)


def test_flow_edit_leaves_the_source_when_nothing_changes() -> None:
    a, b = torch.randn(2, CHANNELS), torch.randn(2, CHANNELS)
    x_src, out = _edit(a, b, n_max=0.0)
    assert torch.equal(out, x_src)
    x_src, out = _edit(a, a.clone(), sampling=SamplerSettings(is_turbo=False, num_steps=6))
    assert torch.equal(out, x_src)


def test_flow_edit_regular_tail_samples_the_target_and_is_seeded() -> None:
    a, b = torch.randn(2, CHANNELS), torch.randn(2, CHANNELS)
    _, out = _edit(a, b, n_min=0.5, n_max=1.0)
    torch.testing.assert_close(out, b[:, None, :].expand_as(out), rtol=0, atol=1e-4)  # the oracle lands on b
    sde = SamplerSettings(is_turbo=False, infer_method="sde", num_steps=6)
    assert torch.equal(_edit(a, b, 0.5, 1.0, seed=5, sampling=sde)[1], _edit(a, b, 0.5, 1.0, seed=5, sampling=sde)[1])


def test_edit_plan_takes_the_target_text_by_mode() -> None:
    latents = Sources(src_latents=np.zeros((50, CHANNELS), dtype=np.float32))
    base = GenerationParams(task_type="edit", caption="jazz", lyrics="old words", edit_target_caption="metal",
                            edit_target_lyrics="new words", edit_n_min=0.1, edit_n_max=0.6)
    for mode, caption in (("only_lyrics", "jazz"), ("remix", "metal")):
        params = GenerationParams(**{**base.to_dict(), "edit_mode": mode})
        plan = plan_request(params, latents, has_codes=False, is_turbo=True, model_name="turbo", vae_seed=0)
        assert (plan.edit.target.caption, plan.edit.target.lyrics) == (caption, "new words")
        assert (plan.edit.n_min, plan.edit.n_max, plan.source_plan.num_frames) == (0.1, 0.6, 50)
    same = GenerationParams(**{**base.to_dict(), "edit_target_lyrics": ""})
    plan = plan_request(same, latents, has_codes=False, is_turbo=True, model_name="turbo", vae_seed=0)
    assert plan.edit.target.lyrics == "old words"
    with pytest.raises(InvalidArgument, match="resolved by the gateway"):
        plan_request(GenerationParams(task_type="retake"), latents, has_codes=False, is_turbo=True,
                     model_name="turbo", vae_seed=0)


# --- cfg_type ---------------------------------------------------------------------------------

def test_cfg_and_cfg_star_rules() -> None:
    cond, uncond = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    torch.testing.assert_close(cfg(cond, uncond, 4.0), uncond + 4.0 * (cond - uncond))
    assert torch.equal(cfg_star(cond, uncond, 4.0, step_index=1), torch.zeros_like(cond))
    alpha = (cond * uncond).sum(dim=(1, 2)) / ((uncond ** 2).sum(dim=(1, 2)) + 1e-8)
    expected = uncond * alpha[:, None, None] + 4.0 * (cond - uncond * alpha[:, None, None])
    torch.testing.assert_close(cfg_star(cond, uncond, 4.0, step_index=2), expected)
    doubled, sample = torch.cat([cond, uncond]), torch.randn(2, 5, 3)
    for cfg_type, want in (("cfg", cfg(cond, uncond, 4.0)), ("cfg_star", expected)):
        settings = GuidanceSettings(scale=4.0, cfg_type=cfg_type)
        torch.testing.assert_close(guide(doubled, sample, 0.5, settings, MomentumBuffer(), step_index=3), want)
    with pytest.raises(InvalidArgument, match="cfg_type"):
        GuidanceSettings(scale=4.0, cfg_type="pag").validate()
