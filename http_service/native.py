"""The native HTTP API, version 1: generations as jobs, followed as server-sent events.

Every route is a translation onto the gateway's gRPC API with the caller's credentials
(``Authorization: Bearer``, ``X-API-Key`` or ``?ai_token=``): read and check the body
(:mod:`http_service.forms`), one gateway call, shape the answer (:mod:`http_service.jobs_view`).
Jobs are private to the key that created them: another caller's job is "not found".

SSE (``GET /v1/jobs/{id}/events``): one event per logged gateway event, ``event:`` its kind
(accepted, progress, lm_result, item_finished, result, failed), ``id:`` its sequence, ``data:``
its protobuf JSON; a comment line every ``heartbeat_s`` while the job is silent; the stream ends
after ``result`` or ``failed``. ``Last-Event-ID`` (or ``?after=N``) resumes after that sequence.
Closing the stream leaves the job running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, AsyncIterator, Optional

import grpc
from fastapi import APIRouter, Header, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from http_service import forms, jobs_view
from http_service.app import error_body
from http_service.forms import FormError
from http_service.gateway_link import GatewayLink, credentials, edge_error
from http_service.native_models import (CreateSampleReply, ErrorBody, FormatSampleReply, Health, JobList, JobView,
                                        SubmitReply, UnderstandReply)
from shared import convert
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.types import CreateSampleParams, CreateSampleResult, FormatSampleResult, UnderstandResult

UNARY_TIMEOUT_S = 30.0
LM_TIMEOUT_S = 600.0     # understand / create-sample / format-sample: an LM run
MAX_ITEM_INDEX = 63
MAX_LISTED_JOBS = 200
MAX_SEQUENCE = 2**63 - 1
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "invalid request (the message names the field)"), (401, "missing or invalid API key"),
        (404, "no such job (or another caller's)"), (413, "request body too large"), (415, "unsupported Content-Type"),
        (429, "the gateway's queue is full"), (503, "the gateway is not reachable"))}


def _body_doc(schema: str, files: tuple[str, ...] = ()) -> dict[str, Any]:
    """OpenAPI request body of a route that reads its body itself: JSON, or multipart with files."""
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    if files:
        properties = {"request": {"type": "string", "description": f"{schema} as JSON text"},
                      **{name: {"type": "string", "format": "binary"} for name in files}}
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": properties}}
    return {"requestBody": {"required": False, "content": content}}


def schemas() -> list[type]:
    """Request body models the routes reference by name (added to the OpenAPI components)."""
    return [forms.GenerationBody, forms.UnderstandModel, forms.CreateSampleModel, forms.FormatSampleModel]


def _link(request: Request) -> GatewayLink:
    return request.app.state.link


def _bad_request(error: FormError) -> HTTPException:
    code = "INVALID_ARGUMENT" if error.status == 400 else "UNSUPPORTED_MEDIA_TYPE"
    return HTTPException(error.status, detail={"code": code, "message": error.message, "field": error.field})


def _resume_point(last_event_id: Optional[str], after: Optional[int]) -> int:
    """``Last-Event-ID`` (what a reconnecting EventSource sends) wins over ``?after=``."""
    if last_event_id is None or not last_event_id.strip():
        return after or 0
    text = last_event_id.strip()
    if not text.isdigit() or not text.isascii() or int(text) > MAX_SEQUENCE:
        raise HTTPException(400, detail={"code": "INVALID_ARGUMENT", "field": "Last-Event-ID",
                                         "message": f"Last-Event-ID must be an event id (a sequence number "
                                                    f"0..{MAX_SEQUENCE}), got {forms.show(text)}"})
    return int(text)


async def _events(link: GatewayLink, request: Request, request_id: str, after: int,
                  heartbeat_s: float) -> AsyncIterator[ServerSentEvent]:
    """The job's events as SSE, heartbeats while it is silent; cancels only the Watch call."""
    queue: asyncio.Queue = asyncio.Queue()
    call = link.stream("Watch", gw.WatchRequest(request_id=request_id, after_sequence=after), request)

    async def pump() -> None:
        try:
            async for event in call:
                queue.put_nowait(event)
            queue.put_nowait(None)
        except grpc.aio.AioRpcError as error:
            queue.put_nowait(edge_error(error))

    task = asyncio.ensure_future(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), heartbeat_s)
            except asyncio.TimeoutError:
                yield ServerSentEvent(comment="heartbeat")
                continue
            if item is None:
                return
            if not isinstance(item, gw.GenerateEvent):  # the gateway failed mid-stream
                yield ServerSentEvent(event="error", data=json.dumps(error_body(item.status, item.code, item.message,
                                                                                item.field)))
                return
            kind = jobs_view.event_kind(item)
            yield ServerSentEvent(id=str(item.sequence), event=kind, data=json.dumps(jobs_view.event_json(item)))
            if kind in jobs_view.FINAL_KINDS:
                return
    finally:
        task.cancel()
        call.cancel()


def router(settings: Any) -> APIRouter:
    routes = APIRouter(tags=["native"], responses=ERRORS)
    base_url = settings.public_url

    @routes.post("/v1/generations", status_code=202, response_model=SubmitReply,
                 openapi_extra=_body_doc("GenerationBody", forms.UPLOAD_FIELDS),
                 summary="Start a generation job (JSON, or multipart with src_audio / reference_audio files)")
    async def create_generation(request: Request) -> dict[str, Any]:
        try:
            params, config = await forms.read_generation(request)
            message = forms.generate_request(params, config)
        except FormError as error:
            raise _bad_request(error) from None
        reply = await _link(request).unary("Submit", message, request, UNARY_TIMEOUT_S)
        items = list(range(forms.items_expected(params, config)))
        return {"request_id": reply.request_id, "queue_position": reply.queue_position,
                "links": jobs_view.job_links(reply.request_id, items, base_url)}

    @routes.get("/v1/jobs", response_model=JobList, summary="The caller's jobs, newest first")
    async def list_jobs(request: Request, limit: int = Query(50, ge=1, le=MAX_LISTED_JOBS)) -> dict[str, Any]:
        reply = await _link(request).unary("ListJobs", gw.ListJobsRequest(limit=limit), request, UNARY_TIMEOUT_S)
        return {"jobs": [jobs_view.job_summary(job, base_url) for job in reply.jobs]}

    @routes.get("/v1/jobs/{request_id}", response_model=JobView,
                summary="A job: state, files, progress, failure and (once finished) the result")
    async def get_job(request: Request, request_id: str) -> dict[str, Any]:
        return await _job(request, request_id)

    async def _job(request: Request, request_id: str, method: str = "GetJob") -> dict[str, Any]:
        link = _link(request)
        job = await link.unary(method, gw.JobRequest(request_id=jobs_view.check_request_id(request_id)), request,
                               UNARY_TIMEOUT_S)
        events = await jobs_view.read_log(link.stub, request_id, credentials(request), job.last_sequence)
        return jobs_view.job_view(job, events, base_url)

    @routes.post("/v1/jobs/{request_id}/cancel", response_model=JobView, summary="Cancel a job")
    async def cancel_job(request: Request, request_id: str) -> dict[str, Any]:
        return await _job(request, request_id, "CancelJob")

    @routes.delete("/v1/jobs/{request_id}", response_model=JobView, summary="Cancel a job (same as POST .../cancel)")
    async def delete_job(request: Request, request_id: str) -> dict[str, Any]:
        return await _job(request, request_id, "CancelJob")

    @routes.get("/v1/jobs/{request_id}/events", response_class=EventSourceResponse,
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "one SSE event per job event; ends after result or failed"}},
                summary="Follow a job as server-sent events (resume with Last-Event-ID or ?after=)")
    async def follow_job(request: Request, request_id: str,
                         after: Optional[int] = Query(None, ge=0, le=MAX_SEQUENCE,
                                                      description="replay the events after this sequence"),
                         last_event_id: Optional[str] = Header(None)) -> EventSourceResponse:
        after_sequence = _resume_point(last_event_id, after)
        link = _link(request)
        await link.unary("GetJob", gw.JobRequest(request_id=jobs_view.check_request_id(request_id)), request,
                         UNARY_TIMEOUT_S)  # a missing job is a 404, not an empty stream
        return EventSourceResponse(_events(link, request, request_id, after_sequence, settings.heartbeat_s), ping=0)

    @routes.head("/v1/jobs/{request_id}/items/{item_index}/audio", include_in_schema=False)
    @routes.get("/v1/jobs/{request_id}/items/{item_index}/audio", response_class=Response,
                responses={200: {"content": {t: {} for t in ("audio/flac", "audio/wav", "audio/mpeg", "audio/ogg")}},
                           206: {"description": "the requested byte range"},
                           416: {"description": "the range lies outside the file"}},
                summary="A finished item's file; HTTP Range requests for seeking")
    async def item_audio(request: Request, request_id: str,
                         item_index: int = Path(ge=0, le=MAX_ITEM_INDEX),
                         download: bool = Query(False, description="Content-Disposition: attachment")) -> Response:
        message = gw.GetAudioRequest(request_id=jobs_view.check_request_id(request_id), item_index=item_index)
        call = _link(request).stream("GetAudio", message, request)
        return await jobs_view.audio_response(call, request.headers.get("range"), request_id, item_index,
                                              download=download, head=request.method == "HEAD")

    @routes.post("/v1/understand", response_model=UnderstandReply, openapi_extra=_body_doc("UnderstandParams",
                                                                                           ("audio",)),
                 summary="Audio codes (or an uploaded audio file) → caption, lyrics and metadata")
    async def understand(request: Request) -> dict[str, Any]:
        try:
            params, audio = await forms.read_understand(request)
            message = gw.UnderstandRequest(params=convert.simple_to_pb(params, common_pb2.UnderstandParams))
        except FormError as error:
            raise _bad_request(error) from None
        if audio is not None:
            message.audio.data = audio
        reply = await _link(request).unary("Understand", message, request, LM_TIMEOUT_S)
        return _lm_result(reply.result, UnderstandResult)

    @routes.post("/v1/create-sample", response_model=CreateSampleReply,
                 openapi_extra=_body_doc("CreateSampleParams"),
                 summary="A description of a song → caption, lyrics and metadata")
    async def create_sample(request: Request) -> dict[str, Any]:
        try:
            values = await forms.read_json(request, forms.CreateSampleModel, "CreateSampleParams")
        except FormError as error:
            raise _bad_request(error) from None
        message = gw.CreateSampleRequest(params=convert.simple_to_pb(CreateSampleParams(**values),
                                                                     common_pb2.CreateSampleParams))
        reply = await _link(request).unary("CreateSample", message, request, LM_TIMEOUT_S)
        return _lm_result(reply.result, CreateSampleResult)

    @routes.post("/v1/format-sample", response_model=FormatSampleReply,
                 openapi_extra=_body_doc("FormatSampleParams"),
                 summary="Caption + lyrics (+ metadata to keep) → enhanced caption, lyrics and metadata")
    async def format_sample(request: Request) -> dict[str, Any]:
        try:
            values = await forms.read_json(request, forms.FormatSampleModel, "FormatSampleParams")
        except FormError as error:
            raise _bad_request(error) from None
        message = gw.FormatSampleRequest(params=convert.simple_to_pb(forms.format_sample_params(values),
                                                                     common_pb2.FormatSampleParams))
        reply = await _link(request).unary("FormatSample", message, request, LM_TIMEOUT_S)
        return _lm_result(reply.result, FormatSampleResult)

    @routes.get("/healthz", response_model=Health, tags=["probes"], summary="Liveness: the edge answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @routes.get("/readyz", response_model=Health, tags=["probes"],
                summary="Readiness: the gateway's health service says SERVING")
    async def readyz(request: Request) -> Any:
        if await _link(request).ready():
            return {"status": "ready"}
        return JSONResponse(status_code=503, content=error_body(503, "UNAVAILABLE", "the gateway is not serving"))

    return routes


def _lm_result(message: Any, cls: type) -> dict[str, Any]:
    values = dataclasses.asdict(convert.simple_from_pb(message, cls))
    values.pop("success", None)
    values.pop("error", None)
    return values
