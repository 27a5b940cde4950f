"""The ACE-Step REST compatibility layer's pure parts: the field table (defaults, spellings, lookup
order), the LM steps around a generation, query_result shapes, file ids and byte ranges."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from http_service import compat_audio as audio
from http_service import compat_flow as flow
from http_service.compat_fields import FIELDS, MAPPED, FieldError, markdown_table, read_release_task
from http_service.compat_results import ModelNames, missing_task, task_entry
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.types import CreateSampleResult, FormatSampleResult

REPO = Path(__file__).resolve().parents[3]
VALID = {"str": "abc", "int": 3, "float": 0.5, "bool": True, "timesteps": "0.9,0.5,0", "seed": 7}
EXPECTED = {"str": "abc", "int": 3, "float": 0.5, "bool": True, "timesteps": [0.9, 0.5, 0.0], "seed": 7}


def _target(request, spec):
    owner, name = spec.target.split(".", 1)
    return getattr(request.params if owner == "params" else request.config, name)


def test_an_empty_request_gets_upstreams_documented_defaults() -> None:
    request = read_release_task({})
    params, config = request.params, request.config
    assert (params.thinking, params.vocal_language, config.audio_format) == (False, "en", "mp3")
    assert (params.inference_steps, params.guidance_scale, params.shift, params.infer_method) == (8, 7.0, 3.0, "ode")
    assert (config.batch_size, config.use_random_seed, config.allow_lm_batch) == (2, True, True)
    assert (params.lm_temperature, params.lm_cfg_scale, params.lm_top_k, params.lm_top_p) == (0.85, 2.5, 0, 0.9)
    assert (params.use_cot_caption, params.use_cot_language, params.use_constrained_decoding) == (True, True, True)
    assert (params.duration, params.repainting_end, params.bpm, params.timesteps) == (-1.0, -1.0, None, None)
    assert params.lm_negative_prompt == "NO USER INPUT" and params.task_type == "text2music"
    assert params.instrumental  # no lyrics: instrumental, as upstream decides
    assert not (request.sample_mode or request.sample_query or request.use_format or request.audio_refs)


@pytest.mark.parametrize("spec", [f for f in FIELDS if f.fate == MAPPED and f.kind in VALID], ids=lambda f: f.name)
def test_every_spelling_of_a_mapped_field_reaches_its_target(spec) -> None:
    for spelling in spec.spellings:
        request = read_release_task({spelling: VALID[spec.kind]})
        assert _target(request, spec) == EXPECTED[spec.kind], spelling
        as_text = read_release_task({spelling: str(VALID[spec.kind]).lower()})  # a form sends text
        assert _target(as_text, spec) == EXPECTED[spec.kind], spelling


def test_values_are_looked_up_in_the_body_then_param_obj_then_metas() -> None:
    nested = {"param_obj": json.dumps({"bpm": 100, "duration": 30}), "metas": {"bpm": 90, "keyscale": "A minor",
                                                                             "genres": "echoed back"}}
    request = read_release_task({**nested, "audio_duration": 20})
    assert (request.params.bpm, request.params.duration, request.params.keyscale) == (100, 20.0, "A minor")
    assert read_release_task({"metas": {"bpm": "N/A"}}).params.bpm is None  # upstream's "unknown"


@pytest.mark.parametrize("body, field_name", [
    ({"inference_steps": "eight"}, "inference_steps"), ({"thinking": "maybe"}, "thinking"),
    ({"bpm": 120.5}, "bpm"), ({"prompt": ["a"]}, "prompt"), ({"timesteps": "0.9,x"}, "timesteps"),
    ({"duration": "inf"}, "duration"), ({"metas": "[1]"}, "metas"), ({"lm_backend": "tpu"}, "lm_backend"),
    ({"full_analysis_only": "true"}, "full_analysis_only"), ({"src_audio": "song.mp3"}, "src_audio"),
    ({"colour": "red"}, "'colour'"),
])
def test_unusable_values_are_refused_naming_the_field(body, field_name) -> None:
    with pytest.raises(FieldError) as caught:
        read_release_task(body)
    assert caught.value.message.startswith(f"{field_name}: ")


def test_seeds_apply_when_random_seeds_are_off() -> None:
    fixed = read_release_task({"use_random_seed": "false", "seed": "12345,67890"})
    assert (fixed.params.seed, fixed.config.seeds, fixed.config.use_random_seed) == (12345, [12345, 67890], False)
    assert read_release_task({"seed": 5}).config.seeds is None


def test_the_docs_hold_the_generated_field_table() -> None:
    text = (REPO / "docs" / "http-compat.md").read_text()
    embedded = re.search(r"<!-- fields:start -->\n(.*?)<!-- fields:end -->", text, re.S)
    assert embedded is not None and embedded.group(1) == markdown_table()


def test_a_sample_replaces_the_song_and_a_format_keeps_what_it_does_not_return() -> None:
    request = read_release_task({"sample_query": "a soft Bengali love song, instrumental"})
    asked = flow.sample_request(request)
    assert (asked.query, asked.vocal_language, asked.instrumental) == (request.sample_query, "bn", True)
    flow.apply_sample(request.params, CreateSampleResult(caption="c", lyrics="l", bpm=80, duration=30.0,
                                                         keyscale="D major", language="bn"))
    params = request.params
    assert (params.caption, params.lyrics, params.bpm, params.duration, params.vocal_language) == \
        ("c", "l", 80, 30.0, "bn")
    has_duration = flow.apply_format(params, FormatSampleResult(caption="better", bpm=None, duration=None))
    assert not has_duration and (params.caption, params.lyrics, params.bpm) == ("better", "l", 80)


def test_format_input_reads_param_obj_and_falls_back_to_the_request() -> None:
    asked = flow.read_format_input({"prompt": "pop", "lyrics": "la", "param_obj": '{"duration": 180.7, "key": "C major"}'})
    assert (asked.user_metadata.duration, asked.user_metadata.keyscale, asked.temperature) == (180.0, "C major", 0.85)
    data = flow.format_input_data(asked, FormatSampleResult(caption="Pop!", bpm=120))
    assert data == {"caption": "Pop!", "lyrics": "la", "bpm": 120, "key_scale": "C major", "time_signature": "",
                    "duration": 180.0, "vocal_language": "unknown"}


def _progress(stage, fraction) -> gw.GenerateEvent:
    return gw.GenerateEvent(progress=common_pb2.Progress(stage=stage, fraction=fraction, current=3, total=8))


def test_a_running_task_reports_progress_stage_and_text() -> None:
    job = gw.Job(request_id="t1", state=gw.JOB_STATE_RUNNING, created_unix_s=1700000000.5)
    entry = task_entry("t1", job, [_progress(common_pb2.STAGE_DIFFUSION, 0.5)], lambda i, f: "", ModelNames())
    (item,) = json.loads(entry["result"])
    assert entry["status"] == 0 and entry["progress_text"] == "diffusion 3/8"
    assert item["stage"] == "diffusion" and 0.45 < item["progress"] < 0.85 and item["create_time"] == 1700000000


def test_a_succeeded_task_lists_one_file_per_item_with_metas_and_seeds() -> None:
    params = common_pb2.GenerationParams(caption="lofi", lyrics="", duration=10.0, cot_bpm=88, keyscale="C major")
    items = [gw.AudioItem(item_index=i, seed=s, duration_s=10.0, format=common_pb2.AUDIO_FORMAT_MP3)
             for i, s in ((1, 22), (0, 11))]
    result = gw.GenerateResult(audios=items, params=params, lm_metadata=common_pb2.MusicMetadata(genres=["pop"]))
    job = gw.Job(request_id="t2", state=gw.JOB_STATE_SUCCEEDED, files=[gw.JobFile(item_index=0), gw.JobFile(item_index=1)])
    entry = task_entry("t2", job, [gw.GenerateEvent(result=result)],
                       lambda index, fmt: f"/v1/audio?path={index}.{fmt}", ModelNames("lm", "dit"))
    first, second = json.loads(entry["result"])
    assert entry["status"] == 1 and [first["file"], second["file"]] == ["/v1/audio?path=0.mp3", "/v1/audio?path=1.mp3"]
    assert first["metas"] == {"bpm": 88, "duration": 10.0, "genres": "pop", "keyscale": "C major", "timesignature": "N/A"}
    assert (first["seed_value"], first["prompt"], first["lm_model"], first["dit_model"]) == ("11,22", "lofi", "lm", "dit")


def test_failed_and_unknown_tasks_are_status_2_with_the_reason() -> None:
    failed = gw.GenerateEvent(failed=gw.JobFailed(error=common_pb2.ErrorDetail(code="CANCELLED", message="stop")))
    entry = task_entry("t3", gw.Job(state=gw.JOB_STATE_CANCELLED), [failed], lambda i, f: "", ModelNames())
    assert (entry["status"], json.loads(entry["result"])[0]["error"]) == (2, "CANCELLED: stop")
    assert missing_task("nope")["status"] == 2


@pytest.mark.parametrize("request_id", ["0f3c9a", "my job/1 ü", "x" * 128])
def test_file_ids_round_trip_and_only_canonical_ids_parse(request_id) -> None:
    token = audio.file_id(request_id, 3, "flac")
    assert audio.parse_file_id(token) == audio.FileRef(request_id, 3, "flac")
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.flac", token)
    assert audio.parse_file_id(token[:-5] + ".mp3") == audio.FileRef(request_id, 3, "mp3")  # the gateway checks it
    assert audio.ref_from_reference(f"http://any.host:8001/v1/audio?path={token}") == audio.FileRef(request_id, 3, "flac")
    assert audio.parse_file_id(token.replace(".flac", "=.flac")) is None


@pytest.mark.parametrize("value", ["/etc/passwd", "../x.mp3", "a.mp3", "YQ.mp3", "YQoxMDA.mp3", "YQo.mp3",
                                   "/v1/audio?path=%2Ftmp%2Fa.mp3"])
def test_anything_else_is_not_a_file_id(value) -> None:
    assert audio.ref_from_reference(value) is None


@pytest.mark.parametrize("header, expected", [
    (None, None), ("bytes=0-9", (0, 9)), ("bytes=90-", (90, 99)), ("bytes=-10", (90, 99)), ("bytes=95-200", (95, 99)),
    ("bytes=5-2", None), ("bytes=0-1,4-5", None), ("items=0-1", None), ("bytes=-", None),
])
def test_byte_ranges(header, expected) -> None:
    assert audio.parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0", "bytes=200-300"])
def test_unsatisfiable_byte_ranges(header) -> None:
    with pytest.raises(audio.RangeNotSatisfiable):
        audio.parse_range(header, 100)
