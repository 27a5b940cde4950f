"""The native HTTP API, version 1: generations as jobs, followed as server-sent events."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter


def router(settings: Any) -> APIRouter:
    return APIRouter(prefix="/v1", tags=["native"])
