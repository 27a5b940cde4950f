"""ACE-Step REST compatibility: the routes of ACE-Step 1.5's own API server (``/release_task``,
``/query_result``, ``/v1/audio``, ...) with its envelope ``{data, code, error, timestamp, extra}``.

Every route is a translation onto the gateway's gRPC API with the caller's key (``ai_token`` in
the body, ``Authorization`` (``Bearer`` or bare, as upstream), ``X-API-Key`` or ``?ai_token=``).
Which upstream fields map where is the table of :mod:`http_service.compat_fields`; the LM steps
around a generation are :mod:`http_service.compat_flow`; result shapes are
:mod:`http_service.compat_results`; file ids and ranges :mod:`http_service.compat_audio`; bodies,
keys and gateway calls :mod:`http_service.compat_io`. ``docs/http-compat.md`` is the user's view.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from http_service import compat_flow as flow
from http_service import compat_io as io
from http_service import compat_lora
from http_service.compat_audio import file_url
from http_service.compat_fields import is_instrumental, read_release_task, show
from http_service.compat_results import ModelNames, missing_task, task_entry
from http_service.gateway_link import edge_error
from shared import convert
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.types import CreateSampleResult, FormatSampleResult

COMPAT_PREFIXES = ("/release_task", "/query_result", "/format_input", "/create_random_sample", "/v1/models",
                   "/v1/stats", "/v1/audio", "/health", "/v1/lora")
MAX_TASK_IDS = 100
MAX_TASK_ID_CHARS = 128
LISTED_JOBS = 200            # /v1/stats counts the caller's newest jobs up to this many
QUERY_FIELDS = ("task_id_list", "taskIdList", "ai_token", "aiToken")
HEALTH = {"status": "ok", "service": "ACE-Step API", "version": "1.0"}
_STATE_NAMES = {gw.JOB_STATE_QUEUED: "queued", gw.JOB_STATE_RUNNING: "running", gw.JOB_STATE_SUCCEEDED: "succeeded",
                gw.JOB_STATE_FAILED: "failed", gw.JOB_STATE_CANCELLED: "failed"}


def is_compat_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in COMPAT_PREFIXES)


def envelope(data: Any, code: int = 200, error: Any = None, extra: Any = None) -> dict:
    return {"data": data, "code": code, "error": error, "timestamp": int(time.time() * 1000), "extra": extra}


def error_response(status: int, message: str) -> JSONResponse:
    """The envelope with ``error`` set; ``detail`` repeats it for clients that read FastAPI's shape
    (upstream's document gives both)."""
    text = io.printable(str(message))
    return JSONResponse(status_code=status, content={**envelope(None, status, text), "detail": text})


def _ok(data: Any) -> JSONResponse:
    return JSONResponse(envelope(data))


def _extra(request: Request) -> dict:
    return getattr(request.app.state.settings, "extra", None) or {}


def _models(request: Request) -> ModelNames:
    extra = _extra(request)
    return ModelNames(lm_model=str(extra.get("lm_model", "")), dit_model=str(extra.get("dit_model", "")))


async def release_task(request: Request) -> JSONResponse:
    body, files = await io.read_body(request, with_files=True)
    metadata = io.caller_metadata(request, body)
    with io.bad_request():
        task = read_release_task(body)
    for spelling, upload in files.items():
        setattr(task.params, io.FILE_FIELDS[spelling], await upload.read())
        task.audio_refs.pop(io.FILE_FIELDS[spelling], None)  # an upload wins over a *_path value
    for target, reference in task.audio_refs.items():
        setattr(task.params, target, await io.file_bytes(request, reference, metadata, f"{target}_path"))
    has_duration = False
    if task.sample_mode or task.sample_query:
        sample = await io.lm_call(request, "CreateSample", flow.sample_request(task), metadata)
        flow.apply_sample(task.params, convert.simple_from_pb(sample.result, CreateSampleResult))
    if task.use_format and (task.params.caption or task.params.lyrics):
        formatted = await io.lm_call(request, "FormatSample", flow.format_request(task.params), metadata)
        has_duration = flow.apply_format(task.params, convert.simple_from_pb(formatted.result, FormatSampleResult))
    task.params.instrumental = is_instrumental(task.params.lyrics)
    task.params.use_cot_metas = not task.sample_mode and not has_duration  # as upstream decides
    with io.bad_request():
        message = gw.GenerateRequest(params=convert.params_to_pb(task.params), config=convert.config_to_pb(task.config))
    reply = await io.unary(request, "Submit", message, metadata)
    return _ok({"task_id": reply.request_id, "status": "queued", "queue_position": reply.queue_position})


async def query_result(request: Request) -> JSONResponse:
    body, _ = await io.read_body(request)
    metadata = io.caller_metadata(request, body)
    models = _models(request)
    base_url = getattr(request.app.state.settings, "public_url", "") or ""

    async def one(task_id: str) -> dict[str, Any]:
        try:
            job = await request.app.state.link.stub.GetJob(gw.JobRequest(request_id=task_id), metadata=metadata,
                                                            timeout=io.UNARY_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return missing_task(task_id)
            raise io.gateway_error(edge_error(error)) from None
        events = await io.job_log(request, task_id, metadata, job.last_sequence)
        return task_entry(task_id, job, events, lambda index, fmt: file_url(task_id, index, fmt, base_url), models)

    return _ok(list(await asyncio.gather(*(one(task_id) for task_id in _task_ids(body)))))


async def format_input(request: Request) -> JSONResponse:
    body, _ = await io.read_body(request)
    metadata = io.caller_metadata(request, body)
    with io.bad_request():
        params = flow.read_format_input(body)
    reply = await io.lm_call(request, "FormatSample", params, metadata)
    return _ok(flow.format_input_data(params, convert.simple_from_pb(reply.result, FormatSampleResult)))


async def create_random_sample(request: Request) -> JSONResponse:
    body, _ = await io.read_body(request)
    metadata = io.caller_metadata(request, body)
    with io.bad_request():
        params = flow.read_random_sample(body)
    reply = await io.lm_call(request, "CreateSample", params, metadata)
    return _ok(flow.random_sample_data(convert.simple_from_pb(reply.result, CreateSampleResult)))


async def list_models(request: Request) -> JSONResponse:
    await io.unary(request, "ListJobs", gw.ListJobsRequest(limit=1), io.caller_metadata(request, {}))  # checks the key
    name = _models(request).dit_model
    return _ok({"models": [{"name": name, "is_default": True}] if name else [], "default_model": name or None})


async def stats(request: Request) -> JSONResponse:
    reply = await io.unary(request, "ListJobs", gw.ListJobsRequest(limit=LISTED_JOBS), io.caller_metadata(request, {}))
    return _ok(_stats(reply.jobs, _extra(request).get("queue_maxsize")))


async def audio(request: Request, path: str = "") -> Response:
    if not path:
        raise HTTPException(400, detail="path: required (the value of a result's file URL)")
    return await io.audio_response(request, path)


async def health(request: Request) -> JSONResponse:
    if await request.app.state.link.ready():
        return _ok(HEALTH)
    return error_response(503, "the gateway is not serving")


def router(settings: Any) -> APIRouter:
    """The routes (they read ``settings`` from the app's state: ``extra`` names the models)."""
    routes = APIRouter(tags=["ACE-Step REST compatibility"])
    for path, method, handler, summary in (
        ("/release_task", "POST", release_task, "Create a generation task"),
        ("/query_result", "POST", query_result, "Status and results of tasks"),
        ("/format_input", "POST", format_input, "LM-formatted caption, lyrics and metadata"),
        ("/create_random_sample", "POST", create_random_sample, "An LM-written song idea"),
        ("/v1/models", "GET", list_models, "The DiT model this deployment serves"),
        ("/v1/stats", "GET", stats, "Job counts of the caller"),
        ("/v1/audio", "GET", audio, "Download a generated file by the id a result gave"),
        ("/health", "GET", health, "Whether the gateway behind this server is serving"),
    ):
        routes.add_api_route(path, handler, methods=[method], summary=f"{summary} (ACE-Step REST API)")
    compat_lora.add_routes(routes, _ok)  # /v1/lora/*: the caller's LoRA default
    return routes


def _task_ids(body: dict[str, Any]) -> list[str]:
    """``task_id_list`` as a JSON list or as its JSON text (upstream accepts both)."""
    for key in body:
        if key not in QUERY_FIELDS:
            raise HTTPException(400, detail=f"{show(key)}: unknown field; expected task_id_list")
    value = body.get("task_id_list", body.get("taskIdList", "[]"))
    if isinstance(value, str):
        try:
            value = json.loads(value or "[]")
        except (ValueError, RecursionError):
            raise HTTPException(400, detail=f"task_id_list: expected a JSON list of task ids, got {show(value)}") from None
    if not isinstance(value, list) or len(value) > MAX_TASK_IDS:
        raise HTTPException(400, detail=f"task_id_list: expected a list of at most {MAX_TASK_IDS} task ids")
    for task_id in value:
        if not isinstance(task_id, str) or not 0 < len(task_id) <= MAX_TASK_ID_CHARS or not task_id.isprintable():
            raise HTTPException(400, detail=f"task_id_list: each id must be text of 1 to {MAX_TASK_ID_CHARS} "
                                            f"printable characters, got {show(task_id)}")
    return value


def _stats(jobs: Any, queue_maxsize: Any) -> dict[str, Any]:
    """Upstream's statistics over the caller's jobs (see docs/http-compat.md for what is approximated)."""
    counts = {"total": len(jobs), "queued": 0, "running": 0, "succeeded": 0, "failed": 0}
    for job in jobs:
        if job.state in _STATE_NAMES:
            counts[_STATE_NAMES[job.state]] += 1
    seconds = [job.updated_unix_s - job.created_unix_s for job in jobs if job.state == gw.JOB_STATE_SUCCEEDED]
    return {"jobs": counts, "queue_size": counts["queued"], "queue_maxsize": queue_maxsize,
            "avg_job_seconds": round(sum(seconds) / len(seconds), 3) if seconds else None}
