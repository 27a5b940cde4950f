"""One trace per request: the client's W3C context crosses gRPC metadata into the server span, and
stage spans hang under the server span."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.config import ServerConfig
from shared.grpc_server import GrpcServer, ServiceBinding
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.lm.v1 import lm_pb2, lm_pb2_grpc
from shared.telemetry import StageSpans

EXPORTER = InMemorySpanExporter()


class _StagedServicer(lm_pb2_grpc.LmServiceServicer):
    async def Plan(self, request, context):
        spans = StageSpans(__name__, "lm")
        try:
            for stage in ("phase1_metadata", "phase1_metadata", "phase2_codes"):
                spans.enter(stage)
                yield lm_pb2.PlanEvent(progress=common_pb2.Progress(message=stage))
        finally:
            spans.close()


@pytest.fixture(scope="module")
def provider() -> TracerProvider:
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        trace.set_tracer_provider(current)
    current.add_span_processor(SimpleSpanProcessor(EXPORTER))
    return current


async def test_client_context_reaches_server_and_stage_spans(provider: TracerProvider) -> None:
    binding = ServiceBinding(lm_pb2_grpc.add_LmServiceServicer_to_server, _StagedServicer(), "acestep.lm.v1.LmService")
    server = GrpcServer(ServerConfig(service_name="trace-probe"), [binding])
    port = await server.start()
    EXPORTER.clear()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=aio_client_interceptors()) as channel:
            with trace.get_tracer("test").start_as_current_span("client-request") as root:
                stub = lm_pb2_grpc.LmServiceStub(channel)
                events = [e async for e in stub.Plan(lm_pb2.PlanRequest(request_id="t1"))]
        assert len(events) == 3
    finally:
        await server.drain(grace_s=0)
    finished = EXPORTER.get_finished_spans()
    spans = {s.name: s for s in finished if s.kind != trace.SpanKind.CLIENT}
    trace_id = root.get_span_context().trace_id
    server_span = spans["/acestep.lm.v1.LmService/Plan"]
    assert server_span.kind == trace.SpanKind.SERVER
    assert server_span.context.trace_id == trace_id
    for name in ("lm.phase1_metadata", "lm.phase2_codes"):
        assert spans[name].context.trace_id == trace_id
        assert spans[name].parent.span_id == server_span.context.span_id
    assert sum(s.name == "lm.phase1_metadata" for s in EXPORTER.get_finished_spans()) == 1
