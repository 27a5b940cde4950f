"""Retake / extend / edit requests resolved against finished items of the (real, SQLite) job store,
and the validation of their fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.jobs.sqlite_store import SqliteJobStore
from gateway.studio_ops import JobSources, resolve, retake_terms, retake_weights
from shared import convert
from shared.errors import InvalidArgument, NotFound
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.types import GenerationConfig, GenerationParams
from shared.validation import validate_generation

SONG = GenerationParams(caption="lo-fi piano", lyrics="[verse] la la", bpm=90, duration=12.0, seed=41,
                        audio_codes="<|audio_code_5|><|audio_code_6|>")


@pytest.fixture
def sources(tmp_path: Path) -> JobSources:
    return JobSources(SqliteJobStore(tmp_path / "jobs", retention_s=1000.0))


async def _finished_job(sources: JobSources, request_id: str, items: list[GenerationParams],
                        caller: str = "anonymous") -> None:
    """A job whose items finished with these parameters (and a file each)."""
    await sources.store.create(request_id, caller, 1.0)
    for index, params in enumerate(items):
        item = gw.AudioItem(item_index=index, seed=params.seed, params=convert.params_to_pb(params))
        await sources.store.append(request_id, gw.GenerateEvent(item_finished=item).SerializeToString())
        await sources.store.save_file(request_id, index, "wav", f"{request_id}-{index}".encode())


def _retake(source: str, item: int = 0, seeds=(7,), variance: float = 0.3, **extra) -> GenerationParams:
    return GenerationParams(task_type="retake", source_request_id=source, source_item_index=item,
                            retake_seeds=list(seeds), retake_variance=variance, **extra)


async def test_retake_reruns_the_source_item_with_mixed_noise(sources: JobSources) -> None:
    await _finished_job(sources, "song", [SONG, dataclasses.replace(SONG, seed=42)])
    plan = await resolve(_retake("song", item=1, seeds=(7, 8)), GenerationConfig(batch_size=2), sources, False)
    assert plan.dit_params == dataclasses.replace(SONG, seed=42)  # the LM's codes, text and settings as they were
    assert plan.items == ((7, retake_terms(((42, 1.0),), 7, 0.3)), (8, retake_terms(((42, 1.0),), 8, 0.3)))
    assert plan.vae_seed == 41  # the source job's first seed, as its VAE encoding used
    first = plan.item_params[0]
    assert (first.task_type, first.seed, first.retake_seeds, first.caption, first.audio_codes) == \
        ("retake", 7, [7], SONG.caption, SONG.audio_codes)
    request = gw.GenerateRequest(params=convert.params_to_pb(_retake("song")))
    message = plan.synthesize_request("r1", request)
    assert [(t.seed, t.weight) for t in message.items[1].noise_mix] == list(plan.items[1][1])
    assert message.params.task_type == "text2music" and message.vae_seed == 41


async def test_a_retake_of_a_retake_mixes_into_its_mix(sources: JobSources) -> None:
    await _finished_job(sources, "song", [SONG])
    first = await resolve(_retake("song", seeds=(7,), variance=0.4), GenerationConfig(batch_size=1), sources, False)
    await _finished_job(sources, "retake1", list(first.item_params))
    second = await resolve(_retake("retake1", seeds=(9,), variance=0.5), GenerationConfig(batch_size=1), sources, False)
    assert second.dit_params == SONG
    assert second.items == ((9, retake_terms(first.items[0][1], 9, 0.5)),)
    keep, new = retake_weights(0.5)
    assert dict(second.items[0][1]) == pytest.approx({41: keep * retake_weights(0.4)[0],
                                                      7: keep * retake_weights(0.4)[1], 9: new})


async def test_retake_of_an_item_made_from_an_upload_needs_it_again(sources: JobSources) -> None:
    cover = dataclasses.replace(SONG, task_type="cover", audio_codes="")
    await _finished_job(sources, "cover", [cover])
    with pytest.raises(InvalidArgument, match="send the same src_audio") as caught:
        await resolve(_retake("cover"), GenerationConfig(batch_size=1), sources, False)
    assert caught.value.field == "src_audio"
    plan = await resolve(_retake("cover"), GenerationConfig(batch_size=1), sources, True)
    assert plan.src_audio is None and plan.dit_params.task_type == "cover"


async def test_extend_and_edit_of_an_item_send_its_file_and_inherit_its_text(sources: JobSources) -> None:
    await _finished_job(sources, "song", [SONG])
    extend = GenerationParams(task_type="extend", source_request_id="song", extend_left_seconds=1.0, seed=3)
    plan = await resolve(extend, GenerationConfig(batch_size=1, seeds=[3]), sources, False)
    assert plan.src_audio == b"song-0" and plan.items == ((3, ()),)
    assert (plan.dit_params.caption, plan.dit_params.lyrics, plan.dit_params.bpm) == (SONG.caption, SONG.lyrics, 90)
    edit = GenerationParams(task_type="edit", source_request_id="song", caption="my own caption",
                            edit_target_lyrics="new words")
    plan = await resolve(edit, GenerationConfig(batch_size=1), sources, False)
    assert (plan.dit_params.caption, plan.dit_params.lyrics) == ("my own caption", SONG.lyrics)
    message = plan.synthesize_request("e1", gw.GenerateRequest(params=convert.params_to_pb(edit)))
    assert message.params.src_audio.data == b"song-0" and not message.HasField("vae_seed")


async def test_missing_sources_and_other_callers_jobs_are_not_found(sources: JobSources) -> None:
    await _finished_job(sources, "song", [SONG], caller="key:alice")
    with pytest.raises(NotFound) as caught:
        await resolve(_retake("nope"), GenerationConfig(batch_size=1), sources, False)
    assert caught.value.field == "source_request_id"
    with pytest.raises(NotFound) as caught:
        await resolve(_retake("song", item=3), GenerationConfig(batch_size=1), sources, False)
    assert caught.value.field == "source_item_index"
    with pytest.raises(NotFound, match="of yours"):
        await sources.check_owner(common_pb2.GenerationParams(source_request_id="song"), "key:bob")
    await sources.check_owner(common_pb2.GenerationParams(source_request_id="song"), "key:alice")


@pytest.mark.parametrize(("changes", "field"), [
    ({"task_type": "retake"}, "source_request_id"),
    ({"task_type": "retake", "source_request_id": "j", "retake_variance": 1.5}, "retake_variance"),
    ({"task_type": "retake", "source_request_id": "j", "retake_seeds": [2**33]}, "retake_seeds"),
    ({"task_type": "retake", "source_request_id": "j", "retake_seeds": [1] * 9}, "retake_seeds"),
    ({"retake_seeds": [1]}, "retake_seeds"),
    ({"source_request_id": "j"}, "source_request_id"),
    ({"task_type": "extend", "source_request_id": "j"}, "extend_right_seconds"),
    ({"task_type": "extend", "extend_left_seconds": 1.0}, "src_audio"),
    ({"task_type": "extend", "source_request_id": "j", "extend_left_seconds": -1.0}, "extend_left_seconds"),
    ({"task_type": "edit", "source_request_id": "j", "edit_n_min": 0.6, "edit_n_max": 0.4}, "edit_n_min"),
    ({"task_type": "edit", "source_request_id": "j", "edit_n_max": 1.2}, "edit_n_max"),
    ({"task_type": "edit", "source_request_id": "j", "edit_mode": "swap"}, "edit_mode"),
    ({"task_type": "edit", "source_request_id": "j", "edit_mode": "remix"}, "edit_target_caption"),
    ({"task_type": "edit", "source_request_id": "j", "source_item_index": 8}, "source_item_index"),
    ({"cfg_type": "pag"}, "cfg_type"),
    ({"cfg_type": "cfg", "use_adg": True}, "cfg_type"),
])
def test_bad_studio_fields_name_the_field(changes, field) -> None:
    params = dataclasses.replace(GenerationParams(caption="x"), **changes)
    with pytest.raises(InvalidArgument) as caught:
        validate_generation(params, GenerationConfig())
    assert caught.value.field == field


def test_good_studio_requests_pass_validation() -> None:
    for params in (_retake("j", seeds=(-1, 5), variance=1.0),
                   GenerationParams(task_type="extend", src_audio=b"RIFF", extend_right_seconds=2.0),
                   GenerationParams(task_type="edit", source_request_id="j", edit_mode="remix",
                                    edit_target_caption="metal", edit_n_min=0.6, edit_n_max=0.8, cfg_type="cfg_star")):
        validate_generation(params, GenerationConfig())
