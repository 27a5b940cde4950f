"""Task recipes, latent lengths, windows and batch assembly (reference-dit §4.5-4.11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_service import conditioning as c
from dit_service.conditioning import RowInputs, SourcePlan
from shared.errors import InvalidArgument

SILENCE = torch.arange(40 * 64, dtype=torch.float32).reshape(1, 40, 64)  # [1, 40, 64], distinct frames


@pytest.mark.parametrize("duration_s, frames", [(10.0, 250), (12.34, 307), (600.0, 15000), (0.0, 750), (-1.0, 750)])
def test_text2music_length_follows_the_reference_rounding(duration_s, frames):
    assert c.text2music_frames(duration_s) == frames


def test_full_span_tasks_take_the_source_length_without_window():
    for task in ("cover", "extract", "complete"):
        assert c.plan_source(100, task, 0.5, 1.5) == SourcePlan(num_frames=100)


def test_repaint_window_in_frames():
    assert c.plan_source(100, "repaint", 0.5, 1.5).window == (12, 37)   # floor(s * 25)
    assert c.plan_source(100, "repaint", 1.0, -1).window == (25, 100)   # -1: end of the source
    assert c.plan_source(100, "lego", 0.0, -1).window == (0, 100)       # lego default: whole span
    assert c.plan_source(100, "repaint", 10.0, -1).window == (99, 100)  # start clamped into the source


def test_outpainting_pads_the_source_and_moves_the_window():
    left = c.plan_source(100, "repaint", -1.0, 2.0)
    assert (left.pad_left_frames, left.pad_right_frames, left.num_frames, left.window) == (25, 0, 125, (0, 75))
    right = c.plan_source(100, "repaint", 3.0, 6.0)
    assert (right.pad_left_frames, right.pad_right_frames, right.num_frames, right.window) == (0, 50, 150, (75, 150))


def test_empty_source_is_invalid():
    with pytest.raises(InvalidArgument, match="src_audio"):
        c.plan_source(0, "cover")


def test_silence_latent_is_tiled_beyond_its_length():
    frames = c.silence_frames(SILENCE, 30, 95)
    assert frames.shape == (65, 64)
    assert torch.equal(frames[10], SILENCE[0, 0]) and torch.equal(frames[64], SILENCE[0, 14])


def test_pad_source_uses_silence_frames_at_their_positions():
    source = torch.full((10, 64), -1.0)
    padded = c.pad_source(source, SourcePlan(num_frames=15, pad_left_frames=2, pad_right_frames=3), SILENCE)
    assert padded.shape == (15, 64)
    assert torch.equal(padded[:2], SILENCE[0, :2]) and torch.equal(padded[2:12], source)
    assert torch.equal(padded[12:], SILENCE[0, 12:15])


def test_reference_clip_is_30_s_of_three_segments_one_per_third():
    ramp = np.tile(np.arange(3 * 1_440_000, dtype=np.float32), (2, 1))  # [2, 90 s]
    clip = c.reference_clip(ramp, seed=5)
    assert clip.shape == (2, 1_440_000)
    segments = clip[0].reshape(3, 480_000)
    for index, segment in enumerate(segments):
        assert index * 1_440_000 <= segment[0] and segment[-1] < (index + 1) * 1_440_000
        assert np.all(np.diff(segment) == 1)  # contiguous
    assert np.array_equal(clip, c.reference_clip(ramp, seed=5))
    assert not np.array_equal(clip, c.reference_clip(ramp, seed=6))


def test_short_reference_is_tiled_to_30_s():
    short = np.ones((2, 48_000), dtype=np.float32)
    assert c.reference_clip(short, seed=0).shape == (2, 1_440_000)


def _source(frames: int) -> torch.Tensor:
    return torch.full((frames, 64), 7.0)


def test_assemble_text2music_row_is_silence_with_a_full_mask_and_at_least_128_frames():
    batch = c.assemble([RowInputs(num_frames=100)], SILENCE, torch.float32, torch.device("cpu"))
    assert batch.src_latents.shape == (1, 128, 64)
    assert torch.equal(batch.src_latents[0], c.silence_frames(SILENCE, 0, 128))
    assert torch.all(batch.chunk_masks == 1.0) and not batch.is_covers.any()
    assert batch.hints is None and batch.repaint is None
    assert torch.equal(batch.refer_packed[0], c.silence_frames(SILENCE, 0, 750))
    assert batch.num_frames == (100,)


def test_assemble_repaint_row_silences_the_window_and_plans_injection():
    row = RowInputs(num_frames=150, src_latents=_source(150), window=(20, 60), silence_window=True)
    other = RowInputs(num_frames=200)
    batch = c.assemble([row, other], SILENCE, torch.float32, torch.device("cpu"))
    src = batch.src_latents[0]  # [200, 64]
    assert torch.equal(src[20:60], c.silence_frames(SILENCE, 20, 60))
    assert torch.all(src[:20] == 7.0) and torch.all(src[60:150] == 7.0)
    assert torch.equal(src[150:], c.silence_frames(SILENCE, 150, 200))
    mask = batch.chunk_masks[0, :, 0]
    assert mask[20:60].eq(1).all() and mask[:20].eq(0).all() and mask[60:].eq(0).all()
    plan = batch.repaint
    assert plan is not None and plan.mask[0, 20:60].all() and not plan.mask[0, :20].any()
    assert plan.mask[1].all()  # other rows are left alone by injection and crossfade
    assert torch.all(plan.clean_latents[0, :150] == 7.0)


def test_assemble_lego_row_keeps_the_source_inside_the_window():
    row = RowInputs(num_frames=130, src_latents=_source(130), window=(10, 30))
    batch = c.assemble([row], SILENCE, torch.float32, torch.device("cpu"))
    assert torch.all(batch.src_latents[0, :130] == 7.0)
    assert batch.chunk_masks[0, 10:30].eq(1).all() and batch.chunk_masks[0, :10].eq(0).all()
    assert batch.repaint is None


def test_assemble_cover_rows_use_hints_and_the_non_cover_set_silences_them():
    hints = torch.full((135, 64), 3.0)
    cover = RowInputs(num_frames=135, is_cover=True, hints=hints)
    plain = RowInputs(num_frames=135, src_latents=_source(135))
    batch = c.assemble([cover, plain], SILENCE, torch.float32, torch.device("cpu"))
    assert batch.is_covers.tolist() == [True, False]
    assert torch.all(batch.src_latents[0, :135] == 3.0) and torch.all(batch.hints[0, :135] == 3.0)
    assert torch.equal(batch.hints[1], c.silence_frames(SILENCE, 0, 135))
    assert torch.equal(batch.non_cover_src[0], c.silence_frames(SILENCE, 0, 135))
    assert torch.equal(batch.non_cover_src[1], batch.src_latents[1])


def test_assemble_packs_one_timbre_reference_per_row():
    refer = torch.full((750, 64), 2.0)
    batch = c.assemble([RowInputs(num_frames=130, refer_latents=refer), RowInputs(num_frames=130)],
                       SILENCE, torch.float32, torch.device("cpu"))
    assert batch.refer_packed.shape == (2, 750, 64) and batch.refer_order.tolist() == [0, 1]
    assert torch.all(batch.refer_packed[0] == 2.0)
