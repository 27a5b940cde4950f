"""Jobs as the HTTP edge shows them: a job's event log read back from the gateway, its state,
progress, failure and result as plain JSON, gateway events as JSON, and a finished item's file
streamed with HTTP byte ranges.

Shared by the routes that read jobs: :func:`read_log` (a job's logged events up to a sequence),
:func:`job_view` (GetJob + log → the native API's job object), :func:`event_json` (one event,
protobuf JSON without upload bytes) and :func:`audio_response` (a ``GetAudio`` call → a 200/206/416
response with ``Content-Type``, ``Content-Length``, ``Accept-Ranges`` and ``Content-Range``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import urllib.parse
from typing import Any, AsyncIterator, Optional

import grpc
from fastapi import HTTPException
from fastapi.responses import Response, StreamingResponse
from google.protobuf import json_format

from http_service.compat_audio import MEDIA_TYPES, RangeNotSatisfiable, parse_range
from gateway.sdk import overall_fraction
from http_service.gateway_link import edge_error
from shared import convert
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw

log = logging.getLogger("http")
MAX_REQUEST_ID_CHARS = 128
LOG_READ_TIMEOUT_S = 10.0
FINAL_KINDS = ("result", "failed")
STATE_NAMES = {gw.JOB_STATE_QUEUED: "queued", gw.JOB_STATE_RUNNING: "running", gw.JOB_STATE_SUCCEEDED: "succeeded",
               gw.JOB_STATE_FAILED: "failed", gw.JOB_STATE_CANCELLED: "cancelled"}
_UPLOADS = ("src_audio", "reference_audio")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def check_request_id(request_id: str) -> str:
    """A job id worth asking the gateway about (1 to 128 printable characters); anything else is a
    404 here, as an unknown id is there."""
    if not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise HTTPException(404, detail={"code": "NOT_FOUND", "message": "no such job", "field": "request_id"})
    return request_id


def stage_name(stage: int) -> str:
    return common_pb2.Stage.Name(stage).removeprefix("STAGE_").lower() if stage in common_pb2.Stage.values() else ""


def event_kind(event: gw.GenerateEvent) -> str:
    return event.WhichOneof("event") or ""


def _without_uploads(event: gw.GenerateEvent) -> gw.GenerateEvent:
    """The event less any uploaded audio bytes echoed in its parameters."""
    kind = event_kind(event)
    holders = {"item_finished": lambda e: e.item_finished.params, "result": lambda e: e.result.params}
    if kind not in holders or not any(holders[kind](event).HasField(name) for name in _UPLOADS):
        return event
    copy = gw.GenerateEvent()
    copy.CopyFrom(event)
    for name in _UPLOADS:
        holders[kind](copy).ClearField(name)
    return copy


def event_json(event: gw.GenerateEvent) -> dict[str, Any]:
    """One gateway event as protobuf JSON (field names as in the proto, defaults included, int64 as
    strings), without upload bytes."""
    return json_format.MessageToDict(_without_uploads(event), preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


async def read_log(stub: Any, request_id: str, metadata: tuple, up_to: int,
                   timeout_s: float = LOG_READ_TIMEOUT_S) -> list[gw.GenerateEvent]:
    """The job's logged events numbered 1..``up_to`` (what a GetJob reported), read from the start
    within ``timeout_s``; a log cut short by the deadline gives the events read so far."""
    events: list[gw.GenerateEvent] = []
    if up_to <= 0:
        return events
    call = stub.Watch(gw.WatchRequest(request_id=request_id, after_sequence=0), metadata=metadata, timeout=timeout_s)
    try:
        async for event in call:
            events.append(event)
            if event.sequence >= up_to:
                break
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise edge_error(error).exception() from None
    finally:
        call.cancel()
    return events


def audio_path(request_id: str, item_index: int, base_url: str = "") -> str:
    return f"{base_url}/v1/jobs/{urllib.parse.quote(request_id, safe='')}/items/{item_index}/audio"


def job_path(request_id: str, base_url: str = "") -> str:
    return f"{base_url}/v1/jobs/{urllib.parse.quote(request_id, safe='')}"


def job_summary(job: gw.Job, base_url: str = "") -> dict[str, Any]:
    """What ``GetJob``/``ListJobs`` say about a job, with a URL per finished file."""
    files = [{"item_index": f.item_index, "format": convert.AUDIO_FORMAT_FROM_PB.get(f.format, ""),
              "size_bytes": f.size_bytes, "url": audio_path(job.request_id, f.item_index, base_url)}
             for f in sorted(job.files, key=lambda f: f.item_index)]
    return {"request_id": job.request_id, "state": STATE_NAMES.get(job.state, "unknown"),
            "created_unix_s": job.created_unix_s, "updated_unix_s": job.updated_unix_s,
            "last_sequence": job.last_sequence, "error": job.error, "files": files,
            "links": job_links(job.request_id, [f["item_index"] for f in files], base_url)}


def job_links(request_id: str, item_indices: list[int], base_url: str = "") -> dict[str, Any]:
    path = job_path(request_id, base_url)
    return {"self": path, "events": path + "/events", "cancel": path + "/cancel",
            "audio": [audio_path(request_id, index, base_url) for index in item_indices]}


def job_view(job: gw.Job, events: list[gw.GenerateEvent], base_url: str = "") -> dict[str, Any]:
    """:func:`job_summary` plus what the log says: the last progress, the failure, the result."""
    view = job_summary(job, base_url)
    view["progress"] = view["failure"] = view["result"] = None
    for event in events:
        kind = event_kind(event)
        if kind == "progress":
            view["progress"] = _progress(event.progress)
        elif kind == "failed":
            detail = event.failed.error
            view["failure"] = {"code": detail.code, "message": detail.message, "stage": detail.stage,
                               "field": detail.field}
        elif kind == "result":
            view["result"] = _result(job.request_id, event.result, base_url)
    return view


def _progress(progress: common_pb2.Progress) -> dict[str, Any]:
    """The progress event; ``overall`` is the SDK's whole-pipeline fraction, so that clients agree."""
    return {"stage": stage_name(progress.stage), "fraction": progress.fraction, "current": progress.current,
            "total": progress.total, "message": progress.message, "overall": round(overall_fraction(progress), 4)}


def _result(request_id: str, result: gw.GenerateResult, base_url: str) -> dict[str, Any]:
    params = common_pb2.GenerationParams()
    params.CopyFrom(result.params)
    for name in _UPLOADS:
        params.ClearField(name)
    audios = [{"item_index": item.item_index, "key": item.key, "seed": item.seed,
               "sample_rate_hz": item.sample_rate_hz, "num_samples": item.num_samples, "duration_s": item.duration_s,
               "format": convert.AUDIO_FORMAT_FROM_PB.get(item.format, ""),
               "url": audio_path(request_id, item.item_index, base_url)}
              for item in sorted(result.audios, key=lambda item: item.item_index)]
    return {"audios": audios, "seeds": [audio["seed"] for audio in audios],
            "metadata": dataclasses.asdict(convert.metadata_from_pb(result.lm_metadata)),
            "time_costs": dict(result.time_costs.seconds), "status_message": result.status_message,
            "params": dataclasses.asdict(convert.params_from_pb(params))}


# ---- audio --------------------------------------------------------------------------------------------


def download_name(request_id: str, item_index: int, audio_format: str) -> str:
    return f"{_SAFE_NAME.sub('_', request_id)[:80] or 'audio'}-{item_index}.{audio_format}"


async def audio_response(call: Any, range_header: Optional[str], request_id: str, item_index: int,
                         download: bool = False, head: bool = False) -> Response:
    """A started ``GetAudio`` call as an HTTP response: the whole file (200) or one byte range
    (206 with ``Content-Range``; 416 with ``Content-Range: bytes */size`` outside the file).
    Gateway failures raise ``HTTPException`` (404 for a missing item or job)."""
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        call.cancel()
        raise edge_error(error).exception() from None
    audio_format = convert.AUDIO_FORMAT_FROM_PB.get(getattr(first, "format", 0), "")
    if first is grpc.aio.EOF or audio_format not in MEDIA_TYPES:
        call.cancel()
        raise HTTPException(404, detail={"code": "NOT_FOUND", "message": f"job has no file for item {item_index}",
                                         "field": "item_index"})
    total = first.total_bytes
    try:
        window = parse_range(range_header, total)
    except RangeNotSatisfiable:
        call.cancel()
        return Response(status_code=416, headers={"Content-Range": f"bytes */{total}", "Accept-Ranges": "bytes"})
    first_byte, last_byte = window if window is not None else (0, total - 1)
    name = download_name(request_id, item_index, audio_format)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(max(last_byte - first_byte + 1, 0)),
               "Content-Disposition": f'{"attachment" if download else "inline"}; filename="{name}"',
               "Cache-Control": "private, max-age=3600"}
    if window is not None:
        headers["Content-Range"] = f"bytes {first_byte}-{last_byte}/{total}"
    if head:
        call.cancel()
        body: Any = iter(())
    else:
        body = byte_window(call, first, first_byte, last_byte)
    return StreamingResponse(body, status_code=206 if window is not None else 200,
                             media_type=MEDIA_TYPES[audio_format], headers=headers)


async def byte_window(call: Any, first: gw.AudioChunk, first_byte: int, last_byte: int) -> AsyncIterator[bytes]:
    """Bytes ``first_byte..last_byte`` of the streamed file (each chunk carries its offset). A
    gateway failure after the headers went out ends the body early (the client sees fewer bytes
    than ``Content-Length``)."""
    try:
        chunk = first
        while chunk is not grpc.aio.EOF:
            start, end = chunk.offset, chunk.offset + len(chunk.data)
            if end > first_byte and start <= last_byte:
                yield chunk.data[max(first_byte - start, 0): last_byte - start + 1]
            if end > last_byte:
                break
            chunk = await call.read()
    except grpc.aio.AioRpcError as error:
        log.warning("audio stream ended early: %s", edge_error(error).message)
    finally:
        call.cancel()
