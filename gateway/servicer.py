"""GatewayService: thin translations onto the orchestrator and the LM pass-through."""

from __future__ import annotations

from typing import AsyncIterator, Optional

import grpc

from gateway.jobs.runner import END_OF_STREAM, JobRunner, caller_of, job_to_pb
from gateway.orchestrator import Orchestrator
from gateway.passthrough import LmPassthrough
from gateway.studio_ops import JobSources
from shared import errors
from shared.errors import AceStepError, Internal, InvalidArgument, NotFound
from shared.grpc_server import abort_with
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc
from shared.types import GenerationParams
from shared.validation import lora_blend

_ERRORS_BY_CODE = {cls.grpc_code_name: cls for cls in errors.AceStepError.__subclasses__()}
MAX_LISTED_JOBS = 200
LORA_DEFAULT = "lora_default"  # the job store preference holding a caller's serialized LoraDefault
MAX_LORA_NAME_CHARS = 128


def _deadline(context: grpc.aio.ServicerContext):
    """The client's remaining time, re-read at each backend call (None: no deadline)."""

    def remaining() -> Optional[float]:
        value = context.time_remaining()
        return None if value is None or value > 10**8 else max(value, 0.001)

    return remaining


def _raise_failure(failed: gw.JobFailed) -> None:
    """A job's ``failed`` event as the error a Generate stream ends with."""
    detail = failed.error
    error = _ERRORS_BY_CODE.get(detail.code, Internal)(detail.message, field=detail.field or None)
    if detail.stage:
        error.stage = detail.stage
    raise error


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Every generation runs as a job (``gateway.jobs``): Generate starts one and streams it live,
    Submit starts one and returns, Watch follows one from any point of its log."""

    def __init__(self, orchestrator: Orchestrator, passthrough: LmPassthrough, jobs: JobRunner) -> None:
        self.orchestrator = orchestrator
        self.passthrough = passthrough
        self.jobs = jobs
        self.sources = orchestrator.sources = JobSources(jobs.store)  # retake/extend/edit read finished items

    async def _start(self, request: gw.GenerateRequest, context, subscribe: bool = False):
        """Start the caller's job, with its LoRA default when the request names no adapter."""
        caller = caller_of(context.invocation_metadata())
        await self.sources.check_owner(request.params, caller)
        from_default = await self._apply_lora_default(request.params, caller)
        try:
            return await self.jobs.start_job(request, caller, subscribe=subscribe)
        except InvalidArgument as error:
            if from_default and error.field in ("lora_id", "loras"):
                raise InvalidArgument(f"{error.message} (from this API key's LoRA default: change it with "
                                      "SetLoraDefault or POST /v1/lora/unload)", field=error.field) from None
            raise

    async def _apply_lora_default(self, params: common_pb2.GenerationParams, caller: str) -> bool:
        """Blend the caller's enabled default into params that name no adapter; True when it did."""
        if params.lora_id or params.loras or params.task_type == "retake":  # a retake replays its source
            return False
        stored = await self.jobs.store.get_preference(caller, LORA_DEFAULT)
        default = gw.LoraDefault.FromString(stored) if stored else gw.LoraDefault()
        if not default.enabled or not default.loras:
            return False
        params.loras.extend(common_pb2.LoraWeight(lora_id=e.lora_id, scale=e.scale) for e in default.loras)
        return True

    async def Generate(self, request: gw.GenerateRequest, context) -> AsyncIterator[gw.GenerateEvent]:
        accepted, queue = await self._start(request, context, subscribe=True)
        request_id = accepted.accepted.request_id
        try:
            while True:
                event = await queue.get()
                if event is END_OF_STREAM:
                    return
                if event.WhichOneof("event") == "failed":
                    _raise_failure(event.failed)
                yield event
        finally:
            self.jobs.leave(request_id, queue)

    async def Submit(self, request: gw.GenerateRequest, context) -> gw.SubmitResponse:
        accepted, _ = await self._start(request, context)
        return gw.SubmitResponse(request_id=accepted.accepted.request_id,
                                 queue_position=accepted.accepted.queue_position)

    async def _own_job(self, request_id: str, context):
        record = await self.jobs.store.get(request_id) if request_id else None
        if record is None or record.caller != caller_of(context.invocation_metadata()):
            raise NotFound(f"no job {request_id!r}", field="request_id")
        return record

    async def Watch(self, request: gw.WatchRequest, context) -> AsyncIterator[gw.GenerateEvent]:
        await self._own_job(request.request_id, context)
        if request.after_sequence < 0:
            raise InvalidArgument(f"after_sequence must be >= 0, got {request.after_sequence}",
                                  field="after_sequence")
        async for event in self.jobs.watch(request.request_id, request.after_sequence):
            yield event

    async def GetJob(self, request: gw.JobRequest, context) -> gw.Job:
        return job_to_pb(await self._own_job(request.request_id, context))

    async def CancelJob(self, request: gw.JobRequest, context) -> gw.Job:
        await self._own_job(request.request_id, context)
        await self.jobs.cancel(request.request_id)
        return job_to_pb(await self._own_job(request.request_id, context))

    async def ListJobs(self, request: gw.ListJobsRequest, context) -> gw.ListJobsResponse:
        if not 0 <= request.limit <= MAX_LISTED_JOBS:
            raise InvalidArgument(f"limit must be in [0, {MAX_LISTED_JOBS}], got {request.limit}", field="limit")
        records = await self.jobs.store.list(caller_of(context.invocation_metadata()), request.limit or 50)
        return gw.ListJobsResponse(jobs=[job_to_pb(record) for record in records])

    async def GetAudio(self, request: gw.GetAudioRequest, context) -> AsyncIterator[gw.AudioChunk]:
        record = await self._own_job(request.request_id, context)
        if not any(f.item_index == request.item_index for f in record.files):
            raise NotFound(f"job {request.request_id!r} has no finished item {request.item_index}",
                           field="item_index")
        async for chunk in self.jobs.audio(request.request_id, request.item_index):
            yield chunk

    async def Understand(self, request: gw.UnderstandRequest, context) -> gw.UnderstandResponse:
        return await self.passthrough.understand(request, _deadline(context))

    async def CreateSample(self, request: gw.CreateSampleRequest, context) -> gw.CreateSampleResponse:
        return await self.passthrough.create_sample(request, _deadline(context))

    async def FormatSample(self, request: gw.FormatSampleRequest, context) -> gw.FormatSampleResponse:
        return await self.passthrough.format_sample(request, _deadline(context))

    async def UploadLora(self, request_iterator, context) -> common_pb2.UploadLoraResponse:
        try:  # client-streaming calls are not wrapped by the error interceptor: map typed errors here
            return await self.orchestrator.loras.upload(aiter(request_iterator), _deadline(context))
        except AceStepError as error:
            await abort_with(context, error)

    async def ListLoras(self, request: common_pb2.ListLorasRequest, context) -> common_pb2.ListLorasResponse:
        return await self.orchestrator.loras.list(request, _deadline(context))

    async def DeleteLora(self, request: common_pb2.DeleteLoraRequest, context) -> common_pb2.DeleteLoraResponse:
        return await self.orchestrator.loras.delete(request, _deadline(context))

    async def GetLoraDefault(self, request: gw.GetLoraDefaultRequest, context) -> gw.GetLoraDefaultResponse:
        stored = await self.jobs.store.get_preference(caller_of(context.invocation_metadata()), LORA_DEFAULT)
        return gw.GetLoraDefaultResponse(lora_default=gw.LoraDefault.FromString(stored) if stored else None)

    async def SetLoraDefault(self, request: gw.SetLoraDefaultRequest, context) -> gw.SetLoraDefaultResponse:
        default = request.lora_default
        _check_lora_default(default)
        if default.loras:  # unknown adapters are refused now rather than at the next generation
            await self.orchestrator.loras.check_known([e.lora_id for e in default.loras], _deadline(context))
        value = default.SerializeToString() if default.loras else None
        await self.jobs.store.set_preference(caller_of(context.invocation_metadata()), LORA_DEFAULT, value)
        return gw.SetLoraDefaultResponse(lora_default=default if default.loras else None)


def _check_lora_default(default: gw.LoraDefault) -> None:
    """Ids, scales, count and uniqueness as a request's ``loras``; names unique printable text."""
    lora_blend(GenerationParams(loras=[(e.lora_id, e.scale) for e in default.loras]))
    names: set[str] = set()
    for index, entry in enumerate(default.loras):
        name = entry.name or entry.lora_id
        if len(name) > MAX_LORA_NAME_CHARS or not name.isprintable():
            raise InvalidArgument(f"loras[{index}].name must be printable text of at most {MAX_LORA_NAME_CHARS} "
                                  f"characters, got {name[:40]!r}", field="loras")
        if name in names:
            raise InvalidArgument(f"loras[{index}].name {name!r} is used twice", field="loras")
        names.add(name)
