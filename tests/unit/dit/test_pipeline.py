"""DitPipeline with the tiny checkpoints: condition recipes reach the model, rows drop cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dit_service import conditioning
from dit_service.pipeline import DitPipeline
from dit_service.planning import RowSpec, Sources, plan_request
from devtools import tiny_checkpoints as tc
from shared.errors import Cancelled
from shared.types import GenerationParams


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tc.write_all(folder, seed=0, steps=[step for step in tc.WRITER_STEPS if step.folder != tc.LM_DIR])
    return folder


@pytest.fixture(scope="module")
def turbo(root: Path) -> DitPipeline:
    return DitPipeline.load(root, tc.TURBO_DIR, "cpu", torch.float32)


@pytest.fixture(scope="module")
def base(root: Path) -> DitPipeline:
    return DitPipeline.load(root, tc.BASE_DIR, "cpu", torch.float32)


def rows_for(pipeline: DitPipeline, params: GenerationParams, seeds, sources: Sources = Sources()) -> list[RowSpec]:
    plan = plan_request(params, sources, has_codes=False, is_turbo=pipeline.is_turbo, model_name=pipeline.name,
                        vae_seed=0)
    return [RowSpec(plan, index, seed) for index, seed in enumerate(seeds)]


def latents_source(frames: int) -> Sources:
    return Sources(src_latents=np.random.default_rng(0).standard_normal((frames, 64)).astype(np.float32))


@pytest.mark.parametrize("variant", ["turbo", "base"])
def test_dropping_a_row_mid_run_leaves_the_other_rows_unchanged(variant, request):
    pipeline: DitPipeline = request.getfixturevalue(variant)
    params = GenerationParams(caption="ambient", duration=10.0, inference_steps=6, guidance_scale=5.0)
    prepared = pipeline.prepare(rows_for(pipeline, params, seeds=(1, 2, 3)))
    full = pipeline.denoise(prepared, live_rows=lambda: [0, 1, 2])
    steps_done = 0

    def count(step: int, num_steps: int) -> None:
        nonlocal steps_done
        steps_done = step + 1

    dropped = pipeline.denoise(prepared, live_rows=lambda: [0, 1, 2] if steps_done < 3 else [0, 2], on_step=count)
    assert steps_done == prepared.inputs.sampling.build().num_steps
    assert torch.allclose(dropped[[0, 2]], full[[0, 2]], atol=1e-5)
    assert not torch.allclose(dropped[1], full[1], atol=1e-3)


def test_denoising_stops_once_every_row_is_gone(turbo):
    prepared = turbo.prepare(rows_for(turbo, GenerationParams(duration=10.0), seeds=(1,)))
    with pytest.raises(Cancelled):
        turbo.denoise(prepared, live_rows=lambda: [])


def test_repaint_context_holds_silence_in_the_window_and_the_source_outside(turbo):
    params = GenerationParams(task_type="repaint", repainting_start=1.0, repainting_end=2.0)
    rows = rows_for(turbo, params, seeds=(4,), sources=latents_source(150))
    prepared = turbo.prepare(rows)
    context = prepared.inputs.conditions.context_latents[0]  # [T, 128]
    source = torch.from_numpy(rows[0].plan.given_src_latents)
    silence = conditioning.silence_frames(turbo.silence_latent, 0, 150)
    assert torch.equal(context[25:50, :64], silence[25:50])
    assert torch.equal(context[:25, :64], source[:25]) and torch.equal(context[50:150, :64], source[50:])
    assert context[25:50, 64:].eq(1).all() and context[:25, 64:].eq(0).all()
    assert prepared.inputs.repaint is not None and prepared.num_frames == (150,)


def test_cover_context_is_the_detokenized_source(turbo):
    rows = rows_for(turbo, GenerationParams(task_type="cover"), seeds=(4,), sources=latents_source(150))
    prepared = turbo.prepare(rows)
    source = torch.from_numpy(rows[0].plan.given_src_latents)[None]
    quantized, _, _ = turbo.model.tokenize(source, turbo.silence_latent)
    hints = turbo.model.detokenize(quantized)[0, :150]
    context = prepared.inputs.conditions.context_latents[0]
    assert torch.allclose(context[:150, :64], hints, atol=1e-6)
    assert context[:, 64:].eq(1).all()


def test_cover_strength_below_one_prepares_the_text2music_condition_set(turbo):
    params = GenerationParams(task_type="cover", audio_cover_strength=0.5)
    prepared = turbo.prepare(rows_for(turbo, params, seeds=(4,), sources=latents_source(150)))
    assert prepared.inputs.audio_cover_strength == 0.5
    non_cover = prepared.inputs.non_cover.context_latents[0]
    assert torch.equal(non_cover[:, :64], conditioning.silence_frames(turbo.silence_latent, 0, 150))
    cover_states = prepared.inputs.conditions.encoder_hidden_states
    non_cover_states = prepared.inputs.non_cover.encoder_hidden_states  # another instruction in the caption
    assert cover_states.shape != non_cover_states.shape or not torch.equal(cover_states, non_cover_states)


def test_decode_stops_each_row_at_its_own_length(turbo, monkeypatch):
    monkeypatch.setattr(turbo.vae, "decode_chunk_frames", 64)
    monkeypatch.setattr(turbo.vae, "decode_overlap_frames", 8)  # cores of 48 frames
    latents = torch.randn(2, 128, 64)
    tiles = list(turbo.decode_tiles(latents, num_frames=(40, 100), live_rows=lambda: [0, 1]))
    assert [tile.rows for tile in tiles] == [(0, 1), (1,), (1,)]
    assert tiles[-1].start_sample + tiles[-1].audio.shape[-1] == 100 * 1920
