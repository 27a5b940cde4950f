"""GatewayService: thin translations onto the orchestrator and the LM pass-through."""

from __future__ import annotations

from typing import AsyncIterator, Optional

import grpc

from gateway.orchestrator import Orchestrator
from gateway.passthrough import LmPassthrough
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc


def _deadline(context: grpc.aio.ServicerContext):
    """The client's remaining time, re-read at each backend call (None: no deadline)."""

    def remaining() -> Optional[float]:
        value = context.time_remaining()
        return None if value is None or value > 10**8 else max(value, 0.001)

    return remaining


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, orchestrator: Orchestrator, passthrough: LmPassthrough) -> None:
        self.orchestrator = orchestrator
        self.passthrough = passthrough

    async def Generate(self, request: gw.GenerateRequest, context) -> AsyncIterator[gw.GenerateEvent]:
        async for event in self.orchestrator.generate(request, _deadline(context)):
            yield event

    async def Understand(self, request: gw.UnderstandRequest, context) -> gw.UnderstandResponse:
        return await self.passthrough.understand(request, _deadline(context))

    async def CreateSample(self, request: gw.CreateSampleRequest, context) -> gw.CreateSampleResponse:
        return await self.passthrough.create_sample(request, _deadline(context))

    async def FormatSample(self, request: gw.FormatSampleRequest, context) -> gw.FormatSampleResponse:
        return await self.passthrough.format_sample(request, _deadline(context))
