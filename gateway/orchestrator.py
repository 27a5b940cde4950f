"""One generate request: LM plan (when needed) → DiT synthesis, streamed as GenerateEvents.

Backend calls go to the least-loaded healthy replica; a call that fails before it streamed any
output to the client is retried on another replica, a later failure is reported with its stage.
The client's deadline is passed on to every backend call and a cancelled client stream cancels
the backend streams (their work stops).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

import grpc

from gateway import planning, studio_ops
from gateway.lora_relay import LoraRelay
from gateway.upstream_errors import RETRYABLE, from_upstream
from gateway.upstream import ReplicaPool
from shared import convert, metrics
from shared.admission import Admission, AdmissionMetrics
from shared.errors import AceStepError, InvalidArgument, NotReady
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.dit.v1 import dit_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.lm.v1 import lm_pb2
from shared.telemetry import StageSpans
from shared.types import GenerationParams
from shared.validation import STUDIO_TASK_TYPES, lora_blend, validate_generation

log = logging.getLogger(__name__)
Deadline = Callable[[], Optional[float]]
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class GatewayLimits:
    max_active: int = 16
    max_queued: int = 64
    max_audio_bytes: int = 256 * 1024 * 1024
    max_attempts: int = 3
    max_lora_bytes: int = 1024 * 1024 * 1024  # an uploaded adapter_model.safetensors


def check_uploads(params: common_pb2.GenerationParams, limit: int) -> None:
    for name in ("src_audio", "reference_audio"):
        size = len(getattr(params, name).data)
        if size > limit:
            raise InvalidArgument(f"{name} is {size} bytes, the limit is {limit} bytes", field=name)


class BackendCaller:
    """Calls one backend's replicas with balancing, retries and deadline propagation."""

    def __init__(self, pool: ReplicaPool, stage: str, max_attempts: int) -> None:
        self.pool = pool
        self.stage = stage
        self.max_attempts = max_attempts

    def _check_retry(self, replica, error: grpc.aio.AioRpcError, attempt: int, emitted: bool) -> AceStepError:
        """The error to report; raises it now unless another replica may be tried."""
        typed = from_upstream(error, self.stage)
        if emitted or error.code() not in RETRYABLE or attempt + 1 >= self.max_attempts:
            raise typed from None
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.pool.mark_failed(replica)
        metrics.GATEWAY_RETRIES.labels(self.pool.backend).inc()
        log.warning("%s call on %s failed (%s); retrying on another replica", self.stage, replica.target,
                    error.code().name)
        return typed

    def _pick(self, tried: set[str], last_error: Optional[AceStepError]):
        try:
            return self.pool.lease(frozenset(tried)), self.pool.pick(frozenset(tried))
        except NotReady as error:
            if last_error is not None:
                raise last_error from None
            error.stage = self.stage
            raise

    async def stream(self, method: str, request: Any, deadline: Deadline,
                     is_output: Callable[[Any], bool]) -> AsyncIterator[Any]:
        tried: set[str] = set()
        last_error: Optional[AceStepError] = None
        for attempt in range(self.max_attempts):
            lease, _ = self._pick(tried, last_error)
            async with lease as replica:
                call = getattr(replica.stub, method)(request, timeout=deadline())
                emitted = False
                try:
                    async for event in call:
                        emitted = emitted or is_output(event)
                        yield event
                    return
                except grpc.aio.AioRpcError as error:
                    last_error = self._check_retry(replica, error, attempt, emitted)
                    tried.add(replica.target)
                finally:
                    call.cancel()

    async def unary(self, method: str, request: Any, deadline: Deadline) -> Any:
        tried: set[str] = set()
        last_error: Optional[AceStepError] = None
        for attempt in range(self.max_attempts):
            lease, _ = self._pick(tried, last_error)
            async with lease as replica:
                try:
                    return await getattr(replica.stub, method)(request, timeout=deadline())
                except grpc.aio.AioRpcError as error:
                    last_error = self._check_retry(replica, error, attempt, emitted=False)
                    tried.add(replica.target)
        raise last_error or NotReady(f"{self.stage}: no attempt was made")


class Orchestrator:
    def __init__(self, lm: Optional[ReplicaPool], dit: ReplicaPool, limits: GatewayLimits) -> None:
        self.lm = BackendCaller(lm, "lm", limits.max_attempts) if lm is not None else None
        self.dit = BackendCaller(dit, "dit", limits.max_attempts)
        self.loras = LoraRelay(self.dit, limits.max_lora_bytes)
        self.sources: Optional[studio_ops.JobSources] = None  # finished items for retake/extend/edit (servicer)
        self.limits = limits
        self.admission = Admission("gateway", limits.max_active, limits.max_queued, AdmissionMetrics(
            active=metrics.GATEWAY_ACTIVE_REQUESTS, queued=metrics.GATEWAY_QUEUED_REQUESTS,
            rejected=metrics.GATEWAY_REJECTED))

    async def generate(self, request: gw.GenerateRequest, deadline: Deadline) -> AsyncIterator[gw.GenerateEvent]:
        check_uploads(request.params, self.limits.max_audio_bytes)
        params = convert.params_from_pb(request.params)
        config = convert.config_from_pb(request.config)
        validate_generation(params, config)
        blend = lora_blend(params)
        if blend:  # an unknown adapter is refused here, before the LM runs for the request
            await self.loras.check_known([lora_id for lora_id, _ in blend], deadline)
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters, "
                                  f"got {len(request.request_id)}", field="request_id")
        studio = None
        if params.task_type in STUDIO_TASK_TYPES:  # resolved against its source item before the job exists
            studio = await studio_ops.resolve(params, config, self.sources, request.params.HasField("src_audio"))
        self.admission.check_capacity()
        request_id = request.request_id or uuid.uuid4().hex
        yield gw.GenerateEvent(accepted=gw.Accepted(request_id=request_id,
                                                    queue_position=self.admission.queue_position()))
        spans = StageSpans(__name__, "gateway")
        spans.enter("admission")
        try:
            async with self.admission.slot():
                run = _GenerateRun(self, request_id, params, config, request, deadline, studio)
                async for event in run.events():
                    spans.enter(_span_stage(event))
                    yield event
        finally:
            spans.close()


class _GenerateRun:
    """State of one generate request while it flows through the stages."""

    def __init__(self, owner: Orchestrator, request_id: str, params: GenerationParams, config, request, deadline,
                 studio: Optional[studio_ops.StudioPlan] = None):
        self.owner = owner
        self.studio = studio
        self.request_id = request_id
        self.params = params
        self.config = config
        self.request = request
        self.deadline = deadline
        self.seeds = planning.resolve_seeds(params, config)
        self.codes: dict[int, list[int]] = {}
        self.time_costs: dict[str, float] = {}
        self.lm_metadata = common_pb2.MusicMetadata()
        self.items: list[gw.AudioItem] = []

    async def events(self) -> AsyncIterator[gw.GenerateEvent]:
        start = time.perf_counter()
        decision = planning.decide_lm(self.params, self.owner.lm is not None)
        if self.studio is not None:
            self.params = self.studio.params
        if decision.use_lm:
            async for event in self._plan(decision):
                yield event
        else:
            yield gw.GenerateEvent(lm_result=gw.LmResult(skipped=True))
        self.params = planning.fill_duration(self.params)
        async for event in self._synthesize():
            yield event
        self.time_costs["pipeline_total_time"] = time.perf_counter() - start
        result = gw.GenerateResult(
            audios=self.items, lm_metadata=self.lm_metadata,
            time_costs=common_pb2.TimeCosts(seconds=self.time_costs),
            params=convert.params_to_pb(_without_uploads(self.params)),
            status_message=f"generated {len(self.items)} item(s)")
        yield gw.GenerateEvent(result=result)

    async def _plan(self, decision: planning.LmDecision) -> AsyncIterator[gw.GenerateEvent]:
        started = time.perf_counter()
        request = lm_pb2.PlanRequest(
            request_id=self.request_id, params=convert.params_to_pb(_without_uploads(self.params)),
            num_items=len(self.seeds), seeds=self.seeds, need_codes=decision.need_codes,
            constrained_decoding_debug=self.config.constrained_decoding_debug)
        metadata = common_pb2.MusicMetadata()
        cot_text = ""
        async for event in self.owner.lm.stream("Plan", request, self.deadline, is_output=lambda e: False):
            kind = event.WhichOneof("event")
            if kind == "progress":
                yield gw.GenerateEvent(progress=event.progress)
            elif kind == "metadata":
                metadata, cot_text = event.metadata.metadata, event.metadata.cot_text
            elif kind == "codes":
                self.codes[event.codes.item_index] = list(event.codes.codes)
            elif kind == "done":
                for key, value in event.done.time_costs.seconds.items():
                    self.time_costs[key if key.startswith("lm_") else f"lm_{key}"] = value
        metrics.GATEWAY_STAGE_SECONDS.labels("lm").observe(time.perf_counter() - started)
        self.lm_metadata = metadata
        self.params = planning.merge_lm_metadata(self.params, convert.metadata_from_pb(metadata))
        codes = [gw.ItemCodes(item_index=i, codes=c) for i, c in sorted(self.codes.items())]
        yield gw.GenerateEvent(lm_result=gw.LmResult(metadata=metadata, codes=codes, cot_text=cot_text))

    def _synthesize_request(self) -> dit_pb2.SynthesizeRequest:
        if self.studio is not None:
            return self.studio.synthesize_request(self.request_id, self.request)
        items = []
        for index, seed in enumerate(self.seeds):
            items.append(dit_pb2.SynthesisItem(seed=seed, audio_codes=self.codes.get(index, [])))
        params = convert.params_to_pb(self.params)
        params.src_audio.CopyFrom(self.request.params.src_audio)
        params.reference_audio.CopyFrom(self.request.params.reference_audio)
        if not self.request.params.HasField("src_audio"):
            params.ClearField("src_audio")
        if not self.request.params.HasField("reference_audio"):
            params.ClearField("reference_audio")
        return dit_pb2.SynthesizeRequest(
            request_id=self.request_id, params=params, items=items,
            audio_format=self.request.config.audio_format or common_pb2.AUDIO_FORMAT_FLAC,
            stream_pcm=self.request.stream_pcm)

    async def _synthesize(self) -> AsyncIterator[gw.GenerateEvent]:
        started = time.perf_counter()
        request = self._synthesize_request()
        is_output = lambda e: e.WhichOneof("event") in ("audio", "file", "item_done")  # noqa: E731
        async for event in self.owner.dit.stream("Synthesize", request, self.deadline, is_output):
            translated = self._translate(event)
            if translated is not None:
                yield translated
        metrics.GATEWAY_STAGE_SECONDS.labels("dit").observe(time.perf_counter() - started)

    def _translate(self, event: dit_pb2.SynthesizeEvent) -> Optional[gw.GenerateEvent]:
        kind = event.WhichOneof("event")
        if kind == "progress":
            return gw.GenerateEvent(progress=event.progress)
        if kind == "audio":
            return gw.GenerateEvent(audio=event.audio)
        if kind == "file":
            return gw.GenerateEvent(file=event.file)
        if kind == "item_done":
            item = self._audio_item(event.item_done)
            self.items.append(item)
            metrics.GATEWAY_SONGS.labels("ok").inc()
            return gw.GenerateEvent(item_finished=item)
        if kind == "done":
            for key, value in event.done.time_costs.seconds.items():
                self.time_costs[key if key.startswith("dit_") else f"dit_{key}"] = value
        return None

    def _audio_item(self, done: dit_pb2.ItemDone) -> gw.AudioItem:
        if self.studio is not None:
            params = self.studio.item_params[done.item_index]
        else:
            params = planning.item_params(self.params, done.seed, self.codes.get(done.item_index))
        return gw.AudioItem(
            item_index=done.item_index, key=planning.item_key(params), seed=done.seed,
            sample_rate_hz=done.sample_rate_hz, num_samples=done.num_samples, duration_s=done.duration_s,
            format=self.request.config.audio_format or common_pb2.AUDIO_FORMAT_FLAC,
            params=convert.params_to_pb(_without_uploads(params)))


def _without_uploads(params: GenerationParams) -> GenerationParams:
    """The parameters without the uploaded audio bytes (not echoed back to clients or the LM)."""
    import dataclasses

    return dataclasses.replace(params, src_audio=None, reference_audio=None)


def _span_stage(event: gw.GenerateEvent) -> str:
    """The gateway's own stage spans: admission, then the LM plan, then the DiT synthesis."""
    kind = event.WhichOneof("event")
    if kind == "progress" and event.progress.stage in (common_pb2.STAGE_LM_METADATA, common_pb2.STAGE_LM_CODES):
        return "lm_plan"
    if kind == "lm_result":
        return "lm_plan"
    return "dit_synthesis"


def stage_of(error: AceStepError) -> str:
    return getattr(error, "stage", "") or "gateway"
