"""LmService: thin translations onto the planner and the LM tasks."""

from __future__ import annotations

from typing import AsyncIterator

from lm_service import convert as lm_convert
from lm_service.plan import PlanCodes, Planner, PlanMetadata, PlanProgress
from lm_service.tasks import LmTasks
from shared import convert, faults, metrics
from shared.admission import Admission, AdmissionMetrics
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.lm.v1 import lm_pb2, lm_pb2_grpc
from shared.telemetry import StageSpans
from shared.types import CreateSampleParams, FormatSampleParams, UnderstandParams
from shared.validation import validate_create_sample, validate_format_sample, validate_understand


class LmServicer(lm_pb2_grpc.LmServiceServicer):
    """Admission in units: a task is one, a plan as many as its code items (each a guided pair in
    the engine); ``max_active`` units are served at once, ``max_queued`` more wait in line."""

    def __init__(self, planner: Planner, tasks: LmTasks, max_active: int, max_queued: int) -> None:
        self.planner = planner
        self.tasks = tasks
        self.admission = Admission("LM service", max_active, max_queued, AdmissionMetrics(
            active=metrics.LM_ACTIVE_WORK, queued=metrics.LM_QUEUE_DEPTH, rejected=metrics.LM_REJECTED))
        self.test_fault = faults.configured_fault()  # "" outside the reliability tests

    async def Plan(self, request: lm_pb2.PlanRequest, context) -> AsyncIterator[lm_pb2.PlanEvent]:
        plan = lm_convert.plan_input(request)
        spans = StageSpans(__name__, "lm")
        self.admission.check_capacity(len(plan.seeds))
        async with self.admission.slot(len(plan.seeds)):
            try:
                events = faults.inject(self.planner.plan(plan), (PlanMetadata, PlanCodes), self.test_fault)
                async for event in events:
                    if isinstance(event, PlanProgress):
                        spans.enter("phase1_metadata" if event.stage == "lm_metadata" else "phase2_codes")
                    yield lm_convert.plan_event(event)
            finally:
                spans.close()

    async def Understand(self, request: lm_pb2.UnderstandRequest, context) -> lm_pb2.UnderstandResponse:
        params = convert.simple_from_pb(request.params, UnderstandParams)
        validate_understand(params)
        async with self.admission.slot():
            result = await self.tasks.understand(request.request_id, params)
        return lm_pb2.UnderstandResponse(result=convert.simple_to_pb(result, common_pb2.UnderstandResult))

    async def CreateSample(self, request: lm_pb2.CreateSampleRequest, context) -> lm_pb2.CreateSampleResponse:
        params = convert.simple_from_pb(request.params, CreateSampleParams)
        validate_create_sample(params)
        async with self.admission.slot():
            result = await self.tasks.create_sample(request.request_id, params)
        return lm_pb2.CreateSampleResponse(result=convert.simple_to_pb(result, common_pb2.CreateSampleResult))

    async def FormatSample(self, request: lm_pb2.FormatSampleRequest, context) -> lm_pb2.FormatSampleResponse:
        params = convert.simple_from_pb(request.params, FormatSampleParams)
        validate_format_sample(params)
        async with self.admission.slot():
            result = await self.tasks.format_sample(request.request_id, params)
        return lm_pb2.FormatSampleResponse(result=convert.simple_to_pb(result, common_pb2.FormatSampleResult))
