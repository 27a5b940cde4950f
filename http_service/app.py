"""The ASGI app: the native API (``/v1/...``, see ``native.py``) and the ACE-Step REST compatibility
routes (``compat.py``) on one server, both clients of the gateway through one :class:`GatewayLink`.

The edge holds no job state: every answer comes from the gateway (its job store), so any number of
edge replicas can sit behind a load balancer, and a client may re-attach through any of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from http_service.gateway_link import GatewayLink


@dataclass(frozen=True)
class HttpSettings:
    gateway: str = "127.0.0.1:50050"
    cors_origins: tuple[str, ...] = ()          # empty: no CORS headers (browsers on other origins refused)
    max_body_bytes: int = 64 * 1024 * 1024      # whole request body, uploads included
    heartbeat_s: float = 15.0                   # SSE comment while a job is silent
    public_url: str = ""                        # base of absolute file URLs; empty: relative URLs
    gateway_ca: Optional[bytes] = None          # PEM root certificates: TLS to the gateway; None: plaintext
    extra: dict = field(default_factory=dict)


class BodyLimit:
    """Refuses request bodies above ``limit`` bytes with 413, by ``Content-Length`` or while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge(self.limit)
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await _too_large(self.limit)(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """Raised while a route reads the body; an HTTP error, so that the app's handlers answer it
    (FastAPI re-raises HTTP errors met while parsing a body, where other errors become a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail={"code": "PAYLOAD_TOO_LARGE", "field": "body",
                                      "message": f"request body larger than the limit of {limit} bytes"})


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(status_code=413, content=error_body(
        413, "PAYLOAD_TOO_LARGE", f"request body larger than the limit of {limit} bytes", "body"))


# Code names of the HTTP errors Starlette raises itself (unknown route, wrong method, bad multipart).
_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE",
          415: "UNSUPPORTED_MEDIA_TYPE"}


def error_body(status: int, code: str, message: str, field: str = "") -> dict:
    """The native API's error shape."""
    return {"error": {"status": status, "code": code, "message": message, "field": field}}


def _describe_validation(error: RequestValidationError) -> tuple[str, str]:
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "form")]
    name = ".".join(location)
    return name, f"{name or 'request'}: {first.get('msg', 'invalid value')}"


def create_app(settings: HttpSettings) -> FastAPI:
    link = GatewayLink(settings.gateway, root_certificates=settings.gateway_ca)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await link.close()

    app = FastAPI(title="ACE-Step serving: HTTP API", version="1", lifespan=lifespan, docs_url="/docs",
                  openapi_url="/openapi.json")
    app.state.link = link
    app.state.settings = settings

    from http_service import compat, native  # noqa: E402 (routers use the app's state)

    app.include_router(native.router(settings))
    app.include_router(compat.router(settings))
    _document_schemas(app, native.schemas())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if compat.is_compat_path(request.url.path):
            return compat.error_response(error.status_code, _detail_message(error.detail))
        detail = error.detail if isinstance(error.detail, dict) else {"message": str(error.detail)}
        default_code = _CODES.get(error.status_code, "HTTP_ERROR")
        return JSONResponse(status_code=error.status_code, headers=getattr(error, "headers", None),
                            content=error_body(error.status_code, detail.get("code", default_code),
                                               detail.get("message", ""), detail.get("field", "")))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        field_name, message = _describe_validation(error)
        if compat.is_compat_path(request.url.path):
            return compat.error_response(400, message)
        return JSONResponse(status_code=400, content=error_body(400, "INVALID_ARGUMENT", message, field_name))

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Content-Length", "Content-Range", "Accept-Ranges"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def _detail_message(detail: object) -> str:
    if isinstance(detail, dict):
        field_name = detail.get("field")
        message = str(detail.get("message", ""))
        return f"{message} (field: {field_name})" if field_name and field_name not in message else message
    return str(detail)


def _document_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add request body models that routes reference by ``$ref`` (routes that read their body
    themselves, to take JSON or multipart) to the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            _, definitions = models_json_schema([(m, "validation") for m in models],
                                                ref_template="#/components/schemas/{model}")
            known = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in definitions.get("$defs", {}).items():
                known.setdefault(name, definition)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
