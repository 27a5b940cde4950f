"""The API-key interceptor on a real server on 127.0.0.1: calls without a valid key are refused with
UNAUTHENTICATED before the servicer runs, either key is accepted as ``x-api-key`` or as a bearer
token, and health checks stay open. (``tests/reliability/test_auth.py`` checks the same through a
whole gateway process.)"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.auth import ApiKeyInterceptor
from shared.config import ServerConfig
from shared.grpc_server import GrpcServer, ServiceBinding
from shared.pb.acestep.dit.v1 import dit_pb2, dit_pb2_grpc

KEYS = ["key-one", "key-two"]
REFUSED = {
    "no key": (),
    "wrong key": (("x-api-key", "key-three"),),
    "empty key": (("x-api-key", ""),),
    "two keys run together": (("x-api-key", "key-onekey-two"),),
    "a prefix of a key": (("x-api-key", "key-"),),
    "bearer without a key": (("authorization", "Bearer "),),
    "another scheme": (("authorization", "Basic a2V5LW9uZQ=="),),
}
ACCEPTED = {
    "first key": (("x-api-key", "key-one"),),
    "second key": (("x-api-key", "key-two"),),
    "bearer token": (("authorization", "Bearer key-one"),),
    "bearer in lower case": (("authorization", "bearer key-two"),),
}


class CountingDit(dit_pb2_grpc.DitServiceServicer):
    def __init__(self) -> None:
        self.num_calls = 0

    async def EncodeAudio(self, request, context) -> dit_pb2.EncodeAudioResponse:
        self.num_calls += 1
        return dit_pb2.EncodeAudioResponse()

    async def Synthesize(self, request, context):
        self.num_calls += 1
        yield dit_pb2.SynthesizeEvent(done=dit_pb2.SynthesizeDone())


@pytest.fixture
async def secured():
    servicer = CountingDit()
    binding = ServiceBinding(dit_pb2_grpc.add_DitServiceServicer_to_server, servicer, "acestep.dit.v1.DitService")
    server = GrpcServer(ServerConfig(service_name="secured", metrics_port=-1), [binding], [ApiKeyInterceptor(KEYS)])
    port = await server.start()
    await server.mark_serving()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel, servicer
    await channel.close()
    await server.drain(grace_s=0)


async def _encode(channel: grpc.aio.Channel, metadata) -> None:
    await dit_pb2_grpc.DitServiceStub(channel).EncodeAudio(dit_pb2.EncodeAudioRequest(), metadata=metadata,
                                                           timeout=10)


async def _synthesize(channel: grpc.aio.Channel, metadata) -> None:
    async for _ in dit_pb2_grpc.DitServiceStub(channel).Synthesize(dit_pb2.SynthesizeRequest(), metadata=metadata,
                                                                   timeout=10):
        pass


@pytest.mark.parametrize("case", list(REFUSED))
async def test_calls_without_a_valid_key_are_unauthenticated(secured, case: str) -> None:
    channel, servicer = secured
    for call in (_encode, _synthesize):  # a unary and a streaming method
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(channel, REFUSED[case])
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, call.__name__
        details = raised.value.details()
        assert "API key" in details and "x-api-key" in details
        assert not any(key in details for key in KEYS), "keys are never echoed"
    assert servicer.num_calls == 0, "nothing runs for an unauthenticated call"


@pytest.mark.parametrize("case", list(ACCEPTED))
async def test_calls_with_either_key_are_served(secured, case: str) -> None:
    channel, servicer = secured
    await _encode(channel, ACCEPTED[case])
    await _synthesize(channel, ACCEPTED[case])
    assert servicer.num_calls == 2


async def test_health_checks_need_no_key(secured) -> None:
    channel, _ = secured
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
