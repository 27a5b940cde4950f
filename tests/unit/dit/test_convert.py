"""Synthesize / EncodeAudio protobufs <-> DiT engine requests and events."""

from __future__ import annotations

import numpy as np
import pytest

from dit_service import convert
from dit_service.events import (
    Accepted,
    BatchInfo,
    Done,
    EncodedAudio,
    FileChunk,
    ItemDone,
    PcmChunk,
    Progress,
    SynthesisItem,
)
from shared import convert as shared_convert
from shared.errors import InvalidArgument
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.dit.v1 import dit_pb2
from shared.types import GenerationParams


def message(**kwargs) -> dit_pb2.SynthesizeRequest:
    params = shared_convert.params_to_pb(GenerationParams(caption="pop", seed=42, task_type="lego"))
    return dit_pb2.SynthesizeRequest(request_id="r", params=params, **kwargs)


def test_request_defaults_to_one_item_seeded_by_params_and_flac():
    request = convert.synthesis_request(message(), timeout_s=12.5)
    assert request.items == (SynthesisItem(seed=42),)
    assert (request.audio_format, request.timeout_s, request.params.caption) == ("flac", 12.5, "pop")


def test_request_items_format_and_latents():
    latents = np.arange(6 * 64, dtype=np.float32).reshape(6, 64)
    request = convert.synthesis_request(message(
        items=[dit_pb2.SynthesisItem(seed=-1), dit_pb2.SynthesisItem(seed=7, audio_codes=[1, 63999])],
        audio_format=common_pb2.AUDIO_FORMAT_OGG, stream_pcm=True,
        src_latents=dit_pb2.Tensor(shape=[6, 64], float32_le=latents.astype("<f4").tobytes())), None)
    assert request.items == (SynthesisItem(-1), SynthesisItem(7, (1, 63999)))
    assert request.audio_format == "ogg" and request.stream_pcm
    assert np.array_equal(request.src_latents.to_numpy("src_latents"), latents)
    # uploaded latents stand in for src_audio when the shared validation checks source tasks
    assert convert.params_for_validation(request).src_audio


def test_request_without_id_gets_a_fresh_one():
    first = convert.synthesis_request(dit_pb2.SynthesizeRequest(), None)
    second = convert.synthesis_request(dit_pb2.SynthesizeRequest(), None)
    assert first.request_id and first.request_id != second.request_id


@pytest.mark.parametrize("kwargs, field", [
    ({"items": [dit_pb2.SynthesisItem(seed=-2)]}, "items[0].seed"),
    ({"items": [dit_pb2.SynthesisItem(audio_codes=[64000])]}, "items.audio_codes"),
    ({"items": [dit_pb2.SynthesisItem()] * 9}, "items"),
    ({"audio_format": 99}, "audio_format"),
])
def test_invalid_requests_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        convert.synthesis_request(message(**kwargs), None)
    assert info.value.field == field


def test_latents_with_the_wrong_byte_count_are_invalid():
    request = convert.synthesis_request(message(src_latents=dit_pb2.Tensor(shape=[2, 64], float32_le=b"\0" * 8)), None)
    with pytest.raises(InvalidArgument, match="src_latents holds 8 bytes"):
        request.src_latents.to_numpy("src_latents")


def test_every_event_converts():
    events = [
        (Accepted("r", 3), "accepted"),
        (BatchInfo(4, 2, 8), "batch"),
        (Progress("diffusion", 0.5, 4, 8), "progress"),
        (PcmChunk(1, 48_000, 2, 960, b"\1\2\3\4", True), "audio"),
        (FileChunk(1, "mp3", 10, b"abc", True, 13), "file"),
        (ItemDone(1, 9, 48_000, 480_000, 10.0), "item_done"),
        (Done({"dit_total_time_cost": 1.5}), "done"),
    ]
    converted = [convert.synthesize_event(event) for event, _ in events]
    assert [c.WhichOneof("event") for c in converted] == [kind for _, kind in events]
    assert converted[1].batch.num_requests == 2
    assert converted[2].progress.stage == common_pb2.STAGE_DIFFUSION and converted[2].progress.total == 8
    assert converted[3].audio.start_sample == 960 and converted[3].audio.is_last
    assert converted[4].file.format == common_pb2.AUDIO_FORMAT_MP3 and converted[4].file.total_bytes == 13
    assert converted[5].item_done.seed == 9 and converted[5].item_done.duration_s == 10.0
    assert converted[6].done.time_costs.seconds["dit_total_time_cost"] == 1.5
    with pytest.raises(TypeError):
        convert.synthesize_event(object())


def test_encode_audio_response_carries_float32_latents():
    latents = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    response = convert.encode_audio_response(EncodedAudio(latents, [1, 2], 0.2))
    assert list(response.latents.shape) == [5, 64] and list(response.codes) == [1, 2]
    assert np.array_equal(np.frombuffer(response.latents.float32_le, dtype="<f4").reshape(5, 64), latents)
