"""API-key authentication: a gateway started with ACESTEP_API_KEYS=k1,k2 in front of the shared
backends refuses calls without a valid key (UNAUTHENTICATED, saying how to send one), serves
calls with either key, and keeps health checks and reflection open."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway import sdk
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc
from shared.types import GenerationConfig, GenerationParams
from tests.reliability.conftest import (
    STARTUP_TIMEOUT_S,
    Fleet,
    assert_song_result,
    generate,
    health,
    song_request,
    spawn_gateway,
    stop_process,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

KEYS = "k1,k2"
BAD_METADATA = {
    "no key": (),
    "wrong key": (("x-api-key", "k3"),),
    "empty key": (("x-api-key", ""),),
    "key with a suffix": (("x-api-key", "k1k2"),),
    "bearer without key": (("authorization", "Bearer "),),
    "basic scheme": (("authorization", "Basic azE="),),
}


@pytest.fixture(scope="module")
def secured(fleet: Fleet):
    service = spawn_gateway(fleet.workdir, "auth-gateway", [fleet.service("dit0"), fleet.service("dit1")],
                            [fleet.service("lm0"), fleet.service("lm1")], {"ACESTEP_API_KEYS": KEYS}, ())
    service.wait_port(STARTUP_TIMEOUT_S)
    yield service
    stop_process(service)


@pytest.mark.parametrize("case", list(BAD_METADATA))
async def test_calls_without_a_valid_key_are_unauthenticated(secured, case: str) -> None:
    outcome = await generate(secured.address, song_request(thinking=False), metadata=BAD_METADATA[case])
    assert outcome.code == "UNAUTHENTICATED", outcome.describe()
    assert "API key" in outcome.details and "x-api-key" in outcome.details
    assert "k1" not in outcome.details and "k2" not in outcome.details, "keys must never be echoed"
    assert outcome.kinds == [], "nothing may run for an unauthenticated call"


async def test_unary_calls_need_a_key_too(secured) -> None:
    async with grpc.aio.insecure_channel(secured.address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        request = gw.FormatSampleRequest(params=common_pb2.FormatSampleParams(caption="x", temperature=0.85))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.FormatSample(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("metadata", [(("x-api-key", "k1"),), (("authorization", "Bearer k2"),),
                                      (("authorization", "bearer  k1 "),)])
async def test_either_key_is_accepted(secured, metadata) -> None:
    request = song_request(thinking=False, seed=12)
    assert_song_result(await generate(secured.address, request, metadata=metadata), request)


def test_sdk_sends_its_api_key(secured) -> None:
    params = GenerationParams(caption="sdk with key", duration=10.0, thinking=False, use_cot_metas=False,
                              use_cot_caption=False, use_cot_language=False, bpm=120)
    config = GenerationConfig(batch_size=1, audio_format="wav")
    ok = sdk.generate_music(sdk.AceStepClient(secured.address, api_key="k2", timeout_s=120), params, config)
    assert ok.success, ok.error
    refused = sdk.generate_music(sdk.AceStepClient(secured.address, timeout_s=120), params, config)
    assert not refused.success and refused.error.startswith("UNAUTHENTICATED")


async def test_health_and_reflection_stay_open(secured) -> None:
    assert await health(secured.address) == "SERVING"
    assert await health(secured.address, "acestep.gateway.v1.GatewayService") == "SERVING"
    async with grpc.aio.insecure_channel(secured.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        names = [s.name async for reply in replies for s in reply.list_services_response.service]
    assert "acestep.gateway.v1.GatewayService" in names
