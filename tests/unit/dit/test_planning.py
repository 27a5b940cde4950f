"""Request policy: variant support, LM codes, lengths, instructions and batch compatibility keys."""

from __future__ import annotations

import numpy as np
import pytest

from dit_service.planning import RowSpec, Sources, item_codes, plan_request
from shared.audio_codes import format_codes
from shared.errors import InvalidArgument
from shared.types import GenerationParams

SOURCE = Sources(src_audio=np.zeros((2, 48_000 * 3), dtype=np.float32))  # 3 s = 75 frames


def plan(params: GenerationParams, sources: Sources = Sources(), has_codes: bool = False, is_turbo: bool = True):
    return plan_request(params, sources, has_codes=has_codes, is_turbo=is_turbo, model_name="acestep-v15-turbo",
                        vae_seed=0)


@pytest.mark.parametrize("task", ["lego", "extract", "complete"])
def test_turbo_refuses_base_only_tasks_naming_task_type(task):
    with pytest.raises(InvalidArgument) as info:
        plan(GenerationParams(task_type=task), SOURCE)
    assert info.value.field == "task_type"
    assert f"task_type {task!r} is not supported by the turbo model acestep-v15-turbo" in info.value.message


def test_base_accepts_every_task():
    for task in ("text2music", "cover", "repaint", "lego", "extract", "complete"):
        assert plan(GenerationParams(task_type=task), SOURCE, is_turbo=False).task_type == task


def test_turbo_step_limit():
    with pytest.raises(InvalidArgument, match=r"inference_steps must be in \[1, 20\] steps for turbo models, got 21"):
        plan(GenerationParams(inference_steps=21))
    assert plan(GenerationParams(inference_steps=21), is_turbo=False).num_steps == 21


def test_turbo_runs_its_fixed_schedule_without_guidance():
    turbo = plan(GenerationParams(inference_steps=20, guidance_scale=9.0, shift=3.0))
    assert turbo.num_steps == 8 and not turbo.guidance.is_enabled
    base = plan(GenerationParams(inference_steps=12, guidance_scale=9.0, use_adg=True), is_turbo=False)
    assert base.num_steps == 12 and base.guidance.scale == 9.0 and base.guidance.use_adg


def test_text2music_with_codes_is_a_cover_of_the_hints():
    params = GenerationParams(task_type="text2music", duration=30.0, caption="x")
    request = plan(params, has_codes=True)
    assert (request.task_type, request.is_cover) == ("cover", True)
    assert request.instruction == "Generate audio semantic tokens based on the given conditions:"
    row = RowSpec(request, 0, seed=1, codes=tuple(range(40)))
    assert request.num_frames_for(row) == 200  # 5 frames per code


def test_lengths_of_text2music_and_source_tasks():
    twelve = plan(GenerationParams(duration=12.0))
    assert twelve.num_frames_for(RowSpec(twelve, 0, 0)) == 300
    repaint = plan(GenerationParams(task_type="repaint", repainting_start=1.0, repainting_end=4.0), SOURCE)
    assert repaint.source_plan.num_frames == 100 and repaint.source_plan.window == (25, 100)  # outpainted by 1 s


def test_cover_needs_a_source_or_codes():
    with pytest.raises(InvalidArgument, match="requires src_audio or audio_codes"):
        plan(GenerationParams(task_type="cover"))


def test_instructions_name_tracks():
    lego = plan(GenerationParams(task_type="lego", track_name="guitar"), SOURCE, is_turbo=False)
    assert lego.instruction == "Generate the GUITAR track based on the audio context:"
    complete = plan(GenerationParams(task_type="complete", track_classes=["drums", "bass"]), SOURCE, is_turbo=False)
    assert complete.instruction == "Complete the input track with DRUMS | BASS:"
    custom = plan(GenerationParams(instruction="Make it loud:"))
    assert custom.instruction == "Make it loud:"


def test_metas_and_lyrics_of_an_item():
    request = plan(GenerationParams(caption="pop", bpm=120, keyscale="C major", timesignature="4", duration=42.7,
                                    instrumental=True))
    text = request.text_for(RowSpec(request, 0, 0))
    assert text.metas == {"bpm": 120, "keyscale": "C major", "timesignature": "4", "duration": "42 seconds"}
    assert text.lyrics == "[Instrumental]"
    source = plan(GenerationParams(task_type="cover"), SOURCE)
    assert source.text_for(RowSpec(source, 0, 0)).metas["duration"] == "3 seconds"


def test_instrumental_ignores_the_lyrics():
    """The documents: instrumental=True gives an instrumental "regardless of lyrics"."""
    request = plan(GenerationParams(caption="pop", lyrics="[Verse]\nsing along", instrumental=True))
    assert request.text_for(RowSpec(request, 0, 0)).lyrics == "[Instrumental]"
    sung = plan(GenerationParams(caption="pop", lyrics="[Verse]\nsing along"))
    assert sung.text_for(RowSpec(sung, 0, 0)).lyrics == "[Verse]\nsing along"


def test_item_codes_come_from_the_items_or_the_shared_string():
    shared = GenerationParams(audio_codes=format_codes([5, 6, 7]))
    assert item_codes(shared, [[], []]) == [(5, 6, 7), (5, 6, 7)]
    assert item_codes(GenerationParams(), [[1, 2], [3]]) == [(1, 2), (3,)]
    with pytest.raises(InvalidArgument, match="every item or none"):
        item_codes(GenerationParams(), [[1, 2], []])
    assert item_codes(GenerationParams(task_type="repaint"), [[1, 2]]) == [()]


def test_batch_keys_group_requests_that_can_share_a_denoising_batch():
    key = lambda params, **kw: plan(params, **kw).batch_key  # noqa: E731
    assert key(GenerationParams(caption="a", seed=1)) == key(GenerationParams(caption="b", duration=200.0))
    assert key(GenerationParams(guidance_scale=3.0)) == key(GenerationParams(guidance_scale=9.0))  # turbo: no CFG
    assert key(GenerationParams(shift=1.0)) != key(GenerationParams(shift=3.0))
    assert key(GenerationParams(shift=2.9)) == key(GenerationParams(shift=3.0))  # snapped to the same table
    assert key(GenerationParams(infer_method="sde")) != key(GenerationParams())
    base = {"is_turbo": False}
    assert key(GenerationParams(guidance_scale=3.0), **base) != key(GenerationParams(guidance_scale=9.0), **base)
    assert key(GenerationParams(inference_steps=10), **base) != key(GenerationParams(inference_steps=12), **base)
    # the cover strength only matters to cover rows
    assert key(GenerationParams(audio_cover_strength=0.5)) == key(GenerationParams())
    cover = GenerationParams(task_type="cover", audio_cover_strength=0.5)
    assert key(cover, sources=SOURCE) != key(GenerationParams(task_type="cover"), sources=SOURCE)


def test_lora_blend_is_planned_without_splitting_batches():
    blended = plan(GenerationParams(lora_id="my-style", lora_scale=0.5, loras=[("other", 1.0), ("off", 0.0)]))
    assert blended.loras == (("my-style", 0.5), ("other", 1.0))  # scale 0 is no adapter at all
    assert blended.batch_key == plan(GenerationParams()).batch_key
    with pytest.raises(InvalidArgument, match=r"loras\[0\].scale must be in \[0.0, 1.0\]"):
        plan(GenerationParams(loras=[("other", 1.5)]))


def test_silent_reference_audio_is_refused():
    silent = Sources(refer_audio=np.zeros((2, 48_000), dtype=np.float32))
    with pytest.raises(InvalidArgument, match="reference_audio is silent"):
        plan(GenerationParams(), silent)
