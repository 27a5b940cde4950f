"""The shared server builder: health, reflection, error mapping, metrics, drain — on 127.0.0.1."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared import metrics
from shared.config import ServerConfig
from shared.errors import InvalidArgument, ResourceExhausted
from shared.grpc_server import ERROR_DETAIL_KEY, GrpcServer, ServiceBinding
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.lm.v1 import lm_pb2, lm_pb2_grpc


class _ProbeServicer(lm_pb2_grpc.LmServiceServicer):
    """Raises what the request asks for, so each mapping can be observed by a real client."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def Understand(self, request, context):
        codes = request.params.audio_codes
        if codes == "invalid":
            raise InvalidArgument("audio_codes must be codes, got 'invalid'", field="audio_codes")
        if codes == "full":
            raise ResourceExhausted("queue is full (8 waiting, limit 8)")
        if codes == "bug":
            raise RuntimeError("secret internal detail")
        if codes == "slow":
            self.started.set()
            await self.release.wait()
        return lm_pb2.UnderstandResponse(result=common_pb2.UnderstandResult(caption="ok"))

    async def Plan(self, request, context):
        yield lm_pb2.PlanEvent(progress=common_pb2.Progress(stage=common_pb2.STAGE_LM_METADATA, fraction=0.5))
        raise InvalidArgument("num_items must be in [1, 8], got 9", field="num_items")


@pytest.fixture
async def served():
    servicer = _ProbeServicer()
    binding = ServiceBinding(lm_pb2_grpc.add_LmServiceServicer_to_server, servicer, "acestep.lm.v1.LmService")
    server = GrpcServer(ServerConfig(service_name="probe", metrics_port=-1, drain_grace_s=5.0), [binding])
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield server, servicer, channel
    await channel.close()
    await server.drain(grace_s=0)


def _understand(channel, codes: str, **kwargs):
    stub = lm_pb2_grpc.LmServiceStub(channel)
    request = lm_pb2.UnderstandRequest(request_id="req-1", params=common_pb2.UnderstandParams(audio_codes=codes))
    return stub.Understand(request, **kwargs)


async def test_health_is_not_serving_until_marked(served) -> None:
    server, _, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "acestep.lm.v1.LmService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await server.mark_serving()
    reply = await stub.Check(health_pb2.HealthCheckRequest(service="acestep.lm.v1.LmService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(served) -> None:
    _, _, channel = served
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for reply in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in reply.list_services_response.service}
        assert {"acestep.lm.v1.LmService", "grpc.health.v1.Health"} <= names
        break


@pytest.mark.parametrize(
    "codes, status, fragment",
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "audio_codes must be codes"),
        ("full", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"),
        ("bug", grpc.StatusCode.INTERNAL, "internal error (request_id req-1)"),
    ],
)
async def test_errors_map_to_status_codes(served, codes, status, fragment) -> None:
    _, _, channel = served
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _understand(channel, codes)
    error = info.value
    assert error.code() == status
    assert fragment in error.details()
    assert "Traceback" not in error.details() and "secret internal detail" not in error.details()
    trailers = dict(error.trailing_metadata() or ())
    detail = common_pb2.ErrorDetail.FromString(trailers[ERROR_DETAIL_KEY])
    assert detail.code == status.name and detail.request_id == "req-1"
    if codes == "invalid":
        assert detail.field == "audio_codes"


async def test_stream_error_after_events(served) -> None:
    _, _, channel = served
    stub = lm_pb2_grpc.LmServiceStub(channel)
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in stub.Plan(lm_pb2.PlanRequest(request_id="req-2")):
            events.append(event)
    assert len(events) == 1 and events[0].progress.fraction == 0.5
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_items must be in [1, 8], got 9" in info.value.details()


async def test_metrics_count_requests_by_code(served) -> None:
    _, _, channel = served
    labels = ("acestep.lm.v1.LmService", "Understand")
    before = metrics.RPC_REQUESTS.labels(*labels, "OK")._value.get()
    await _understand(channel, "fine")
    assert metrics.RPC_REQUESTS.labels(*labels, "OK")._value.get() == before + 1
    assert metrics.RPC_IN_FLIGHT.labels(*labels)._value.get() == 0


async def test_drain_finishes_in_flight_and_refuses_new(served) -> None:
    server, servicer, channel = served
    await server.mark_serving()
    in_flight = asyncio.ensure_future(_understand(channel, "slow"))
    await asyncio.wait_for(servicer.started.wait(), 10.0)
    drain = asyncio.ensure_future(server.drain(grace_s=30.0))
    health = health_pb2_grpc.HealthStub(channel)
    while (await health.Check(health_pb2.HealthCheckRequest())).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        await asyncio.sleep(0.01)
    # While the in-flight call runs, the transport stays up: new calls, on the open connection and
    # on a new one, reach the server and are refused with UNAVAILABLE (never cut off as CANCELLED).
    fresh = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    for client in (channel, fresh):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _understand(client, "fine", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert "draining" in info.value.details()
    assert not in_flight.done() and not drain.done()
    servicer.release.set()
    reply = await in_flight
    assert reply.result.caption == "ok"
    await asyncio.wait_for(drain, 10.0)  # returns once the in-flight call is done, not after the grace period
    await fresh.close()
