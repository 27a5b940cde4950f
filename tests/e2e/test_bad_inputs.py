"""Bad requests come back with INVALID_ARGUMENT and a message naming the offending field."""

from __future__ import annotations

import pytest

from gateway import sdk
from shared.grpc_server import ERROR_DETAIL_KEY
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.types import GenerationConfig, UnderstandParams
from shared import convert
from tests.e2e.conftest import MAX_AUDIO_BYTES
from tests.e2e.helpers import dits, events_of, quick_params, rpc_count, rpc_error

OK_CONFIG = GenerationConfig(batch_size=1, audio_format="wav")
CORRUPT_AUDIO = b"RIFF\x10\x00\x00\x00WAVEfmt this is not a wave file at all"

# (case, params overrides, config, field named in the message and the error detail)
GATEWAY_CASES = [
    ("caption too long", dict(caption="x" * 513), OK_CONFIG, "caption"),
    ("bpm out of range", dict(bpm=500), OK_CONFIG, "bpm"),
    ("duration too short", dict(duration=5.0), OK_CONFIG, "duration"),
    ("batch too large", {}, GenerationConfig(batch_size=9), "batch_size"),
    ("unknown task", dict(task_type="remix"), OK_CONFIG, "task_type"),
    ("unknown track", dict(task_type="lego", track_name="kazoo", src_audio=b"x"), OK_CONFIG, "track_name"),
    ("repaint without source", dict(task_type="repaint", repainting_start=1.0, repainting_end=5.0), OK_CONFIG,
     "src_audio"),
    ("bad audio codes", dict(audio_codes="<|audio_code_12|>oops<|audio_code_7|>"), OK_CONFIG, "audio_codes"),
    ("upload over the limit", dict(task_type="cover", src_audio=b"\0" * (MAX_AUDIO_BYTES + 1)), OK_CONFIG,
     "src_audio"),
]


def _detail(error) -> common_pb2.ErrorDetail:
    trailer = dict(error.trailing_metadata() or ())
    return common_pb2.ErrorDetail.FromString(trailer[ERROR_DETAIL_KEY])


@pytest.mark.parametrize("overrides, config, field", [case[1:] for case in GATEWAY_CASES],
                         ids=[case[0] for case in GATEWAY_CASES])
def test_refused_by_the_gateway(stub, stack, overrides, config, field) -> None:
    synthesized_before = rpc_count(dits(stack), "Synthesize", "OK", "INVALID_ARGUMENT", "CANCELLED")
    error = rpc_error(lambda: events_of(stub, quick_params(**overrides), config))
    assert error.code().name == "INVALID_ARGUMENT"
    assert field in error.details(), error.details()
    detail = _detail(error)
    assert (detail.code, detail.field) == ("INVALID_ARGUMENT", field)
    assert rpc_count(dits(stack), "Synthesize", "OK", "INVALID_ARGUMENT", "CANCELLED") == synthesized_before


def test_corrupt_upload_is_refused_by_the_dit(stub, stack) -> None:
    refused_before = rpc_count(dits(stack), "Synthesize", "INVALID_ARGUMENT")
    params = quick_params(task_type="cover", src_audio=CORRUPT_AUDIO)
    error = rpc_error(lambda: events_of(stub, params, OK_CONFIG))
    assert error.code().name == "INVALID_ARGUMENT"
    assert "src_audio could not be decoded" in error.details()
    assert rpc_count(dits(stack), "Synthesize", "INVALID_ARGUMENT") == refused_before + 1  # not retried


def test_unknown_audio_format_in_the_sdk(client) -> None:
    result = sdk.generate_music(client, quick_params(), GenerationConfig(batch_size=1, audio_format="aiff"))
    assert not result.success
    assert result.error.startswith("INVALID_ARGUMENT: audio_format must be one of"), result.error


def test_unknown_audio_format_on_the_wire(stub) -> None:
    request = sdk.build_request(quick_params(), OK_CONFIG)
    request.config.audio_format = 42  # an enum value this API does not define
    error = rpc_error(lambda: stub.Generate(request))
    assert error.code().name == "INVALID_ARGUMENT"
    assert error.details().startswith("audio_format"), error.details()


def test_lm_task_with_bad_sampling_is_refused(stub) -> None:
    params = convert.simple_to_pb(UnderstandParams(temperature=3.0), common_pb2.UnderstandParams)
    error = rpc_error(lambda: stub.Understand(gw.UnderstandRequest(params=params)))
    assert error.code().name == "INVALID_ARGUMENT"
    assert error.details().startswith("temperature must be in [0.0, 2.0]"), error.details()
