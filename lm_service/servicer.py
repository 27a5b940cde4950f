"""LmService: thin translations onto the planner and the LM tasks."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Iterator

from lm_service import convert as lm_convert
from lm_service.plan import Planner, PlanProgress
from lm_service.tasks import LmTasks
from shared import convert, metrics
from shared.errors import ResourceExhausted
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.lm.v1 import lm_pb2, lm_pb2_grpc
from shared.telemetry import StageSpans
from shared.types import CreateSampleParams, FormatSampleParams, UnderstandParams
from shared.validation import validate_create_sample, validate_format_sample, validate_understand


class LmServicer(lm_pb2_grpc.LmServiceServicer):
    def __init__(self, planner: Planner, tasks: LmTasks, max_pending: int) -> None:
        self.planner = planner
        self.tasks = tasks
        self.max_pending = max_pending
        self.pending = 0

    @contextlib.contextmanager
    def _admit(self) -> Iterator[None]:
        """Bounded admission: beyond ``max_pending`` requests in flight, RESOURCE_EXHAUSTED."""
        if self.pending >= self.max_pending:
            metrics.LM_REJECTED.inc()
            raise ResourceExhausted(f"LM service is at capacity ({self.pending} requests in flight, "
                                    f"limit {self.max_pending}); retry later")
        self.pending += 1
        metrics.LM_QUEUE_DEPTH.set(self.pending)
        try:
            yield
        finally:
            self.pending -= 1
            metrics.LM_QUEUE_DEPTH.set(self.pending)

    async def Plan(self, request: lm_pb2.PlanRequest, context) -> AsyncIterator[lm_pb2.PlanEvent]:
        plan = lm_convert.plan_input(request)
        spans = StageSpans(__name__, "lm")
        with self._admit():
            try:
                async for event in self.planner.plan(plan):
                    if isinstance(event, PlanProgress):
                        spans.enter("phase1_metadata" if event.stage == "lm_metadata" else "phase2_codes")
                    yield lm_convert.plan_event(event)
            finally:
                spans.close()

    async def Understand(self, request: lm_pb2.UnderstandRequest, context) -> lm_pb2.UnderstandResponse:
        params = convert.simple_from_pb(request.params, UnderstandParams)
        validate_understand(params)
        with self._admit():
            result = await self.tasks.understand(request.request_id, params)
        return lm_pb2.UnderstandResponse(result=convert.simple_to_pb(result, common_pb2.UnderstandResult))

    async def CreateSample(self, request: lm_pb2.CreateSampleRequest, context) -> lm_pb2.CreateSampleResponse:
        params = convert.simple_from_pb(request.params, CreateSampleParams)
        validate_create_sample(params)
        with self._admit():
            result = await self.tasks.create_sample(request.request_id, params)
        return lm_pb2.CreateSampleResponse(result=convert.simple_to_pb(result, common_pb2.CreateSampleResult))

    async def FormatSample(self, request: lm_pb2.FormatSampleRequest, context) -> lm_pb2.FormatSampleResponse:
        params = convert.simple_from_pb(request.params, FormatSampleParams)
        validate_format_sample(params)
        with self._admit():
            result = await self.tasks.format_sample(request.request_id, params)
        return lm_pb2.FormatSampleResponse(result=convert.simple_to_pb(result, common_pb2.FormatSampleResult))
