"""ACE-Step REST compatibility: the routes of ACE-Step 1.5's own API server (``/release_task``,
``/query_result``, ``/v1/audio``, ...) with its envelope ``{data, code, error, timestamp, extra}``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

COMPAT_PREFIXES = ("/release_task", "/query_result", "/format_input", "/create_random_sample", "/v1/models",
                   "/v1/stats", "/v1/audio", "/health", "/v1/lora")


def is_compat_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in COMPAT_PREFIXES)


def envelope(data: Any, code: int = 200, error: Any = None, extra: Any = None) -> dict:
    return {"data": data, "code": code, "error": error, "timestamp": int(time.time() * 1000), "extra": extra}


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content=envelope(None, status, message))


def router(settings: Any) -> APIRouter:
    return APIRouter(tags=["ACE-Step REST compatibility"])
