"""Plumbing of the ACE-Step REST compatibility routes: request bodies as upstream accepts them, the
caller's key, gateway calls with their errors in upstream's terms, and file streaming with ranges."""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator
from urllib.parse import parse_qsl

import grpc
from fastapi import HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import UploadFile

from http_service.compat_audio import MEDIA_TYPES, RangeNotSatisfiable, parse_file_id, parse_range
from http_service.compat_audio import ref_from_reference
from http_service.compat_fields import BY_NAME, UPSTREAM_NAME, FieldError, api_token, show
from http_service.gateway_link import EdgeError, edge_error
from http_service.jobs_view import byte_window
from shared import convert
from shared.errors import InvalidArgument
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw

UNARY_TIMEOUT_S = 30.0
LM_TIMEOUT_S = 600.0         # CreateSample / FormatSample: an LM run
LOG_READ_TIMEOUT_S = 10.0    # query_result's replay of one job's event log
MAX_KEY_CHARS = 4096
MAX_FORM_FIELDS = 200
FILE_FIELDS = {spelling: spec.target.split(".", 1)[1] for spec in (BY_NAME["src_audio"], BY_NAME["reference_audio"])
               for spelling in spec.spellings}


def printable(text: str, limit: int = 2000) -> str:
    """Text that encodes as UTF-8 whatever a client sent (lone surrogates are escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def gateway_error(error: EdgeError) -> HTTPException:
    """The gateway's message, naming the upstream field when ours is spelt differently."""
    upstream = UPSTREAM_NAME.get(error.field, "")
    message = error.message
    if upstream and upstream != error.field:
        message = f"{message} (request field {upstream!r})"
    elif error.field and error.field not in message:
        message = f"{message} (field {error.field!r})"
    return HTTPException(error.status, detail=message)


@contextlib.contextmanager
def bad_request() -> Iterator[None]:
    try:
        yield
    except FieldError as error:
        raise HTTPException(400, detail=error.message) from None
    except InvalidArgument as error:
        raise HTTPException(400, detail=error.message) from None
    except (ValueError, TypeError) as error:  # a value the protobuf cannot hold
        raise HTTPException(400, detail=f"invalid value: {error}") from None


# ---- request reading ---------------------------------------------------------------------------------


async def read_body(request: Request, with_files: bool = False) -> tuple[dict[str, Any], dict[str, UploadFile]]:
    """The body as upstream accepts it: JSON (``*json``), multipart or url-encoded form, or, without
    a usable Content-Type, JSON-looking or ``key=value`` text; anything else is 415."""
    content_type = request.headers.get("content-type", "").lower()
    if "json" in content_type:
        return _json_object(await request.body()), {}
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=len(FILE_FIELDS) if with_files else 0, max_fields=MAX_FORM_FIELDS)
        values, files = {}, {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in FILE_FIELDS or not with_files:
                    raise HTTPException(400, detail=f"{show(key)}: unexpected file upload")
                files[key] = value
            else:
                values[key] = value
        return values, files
    raw = await request.body()
    text = raw.lstrip()
    if not text:
        return {}, {}
    if text[:1] in (b"{", b"["):
        return _json_object(raw), {}
    if b"=" in raw:
        return _url_encoded(raw), {}
    raise HTTPException(415, detail=f"unsupported Content-Type {show(content_type or '(missing)')}; use "
                                    "application/json, application/x-www-form-urlencoded or multipart/form-data")


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_no_constant) if raw.strip() else {}
    except (ValueError, RecursionError) as error:
        raise HTTPException(400, detail=f"invalid JSON body: {printable(str(error), 200)}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, detail="JSON payload must be an object")
    return body


def _url_encoded(raw: bytes) -> dict[str, Any]:
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError) as error:
        raise HTTPException(400, detail=f"invalid form body: {printable(str(error), 200)}") from None
    return dict(pairs)


def caller_metadata(request: Request, body: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The caller's key as gateway metadata, in upstream's order: body ``ai_token``, then the
    ``Authorization`` header (``Bearer <key>`` or the bare key); ours: ``X-API-Key``, ``?ai_token=``."""
    with bad_request():
        key = api_token(body)
    header = request.headers.get("authorization", "").strip()
    if not key and header:
        key = header[7:].strip() if header.lower().startswith("bearer ") else header
    key = key or request.headers.get("x-api-key", "") or request.query_params.get("ai_token", "")
    if len(key) > MAX_KEY_CHARS or not all(" " <= ch <= "~" for ch in key):
        raise HTTPException(401, detail=f"the API key must be printable ASCII of at most {MAX_KEY_CHARS} characters")
    return (("x-api-key", key),) if key else ()


# ---- gateway calls ------------------------------------------------------------------------------------


async def unary(request: Request, method: str, message: Any, metadata: tuple, timeout_s: float = UNARY_TIMEOUT_S):
    try:
        return await getattr(request.app.state.link.stub, method)(message, metadata=metadata, timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        raise gateway_error(edge_error(error)) from None


async def file_bytes(request: Request, reference: str, metadata: tuple, field_name: str) -> bytes:
    """The bytes of a file this server issued (``*_audio_path`` given as its ``/v1/audio`` URL)."""
    ref = ref_from_reference(reference)
    if ref is None:
        raise HTTPException(400, detail=f"{field_name}: server-side paths are not opened by this server; upload "
                                        "the file (multipart field src_audio / reference_audio) or pass a "
                                        f"/v1/audio URL from an earlier result; got {show(reference)}")
    call = request.app.state.link.stub.GetAudio(gw.GetAudioRequest(request_id=ref.request_id,
                                                                   item_index=ref.item_index), metadata=metadata)
    try:
        return b"".join([chunk.data async for chunk in call])
    except grpc.aio.AioRpcError as error:
        failure = edge_error(error)
        raise HTTPException(400 if failure.status == 404 else failure.status,
                            detail=f"{field_name}: {failure.message}") from None


async def job_log(request: Request, request_id: str, metadata: tuple, last_sequence: int) -> list[gw.GenerateEvent]:
    """The job's logged events up to ``last_sequence`` (what GetJob saw), read within a bounded time."""
    events: list[gw.GenerateEvent] = []
    if last_sequence <= 0:
        return events
    call = request.app.state.link.stub.Watch(gw.WatchRequest(request_id=request_id, after_sequence=0),
                                             metadata=metadata, timeout=LOG_READ_TIMEOUT_S)
    try:
        async for event in call:
            events.append(event)
            if event.sequence >= last_sequence:
                break
    except grpc.aio.AioRpcError as error:
        if error.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND):
            raise gateway_error(edge_error(error)) from None
    finally:
        call.cancel()
    return events


_LM_MESSAGES = {"CreateSample": (gw.CreateSampleRequest, common_pb2.CreateSampleParams),
                "FormatSample": (gw.FormatSampleRequest, common_pb2.FormatSampleParams)}


async def lm_call(request: Request, method: str, params: Any, metadata: tuple) -> Any:
    request_cls, params_cls = _LM_MESSAGES[method]
    with bad_request():
        message = request_cls(params=convert.simple_to_pb(params, params_cls))
    return await unary(request, method, message, metadata, LM_TIMEOUT_S)


async def audio_response(request: Request, path: str) -> Response:
    """The file a ``/v1/audio`` id names, streamed from the gateway; single byte ranges honoured."""
    ref = parse_file_id(path)
    if ref is None:
        raise HTTPException(404, detail="audio file not found")
    call = request.app.state.link.stub.GetAudio(gw.GetAudioRequest(request_id=ref.request_id,
                                                                   item_index=ref.item_index),
                                                metadata=caller_metadata(request, {}))
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        call.cancel()
        failure = edge_error(error)
        raise HTTPException(404, detail="audio file not found") if failure.status == 404 else gateway_error(failure)
    if first is grpc.aio.EOF or convert.AUDIO_FORMAT_FROM_PB.get(first.format) != ref.audio_format:
        call.cancel()
        raise HTTPException(404, detail="audio file not found")
    total = first.total_bytes
    try:
        window = parse_range(request.headers.get("range"), total)
    except RangeNotSatisfiable:
        call.cancel()
        return Response(status_code=416, headers={"Content-Range": f"bytes */{total}"})
    first_byte, last_byte = window if window is not None else (0, total - 1)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(max(last_byte - first_byte + 1, 0)),
               "Content-Disposition": f'inline; filename="{path}"'}
    if window is not None:
        headers["Content-Range"] = f"bytes {first_byte}-{last_byte}/{total}"
    return StreamingResponse(byte_window(call, first, first_byte, last_byte), status_code=206 if window else 200,
                             media_type=MEDIA_TYPES[ref.audio_format], headers=headers)


