"""Optional API-key authentication from request metadata (``x-api-key`` or ``authorization: Bearer``)."""

from __future__ import annotations

import hmac
from typing import Any, Callable, Iterable

import grpc

from shared.grpc_server import refusing_handler

PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def _presented_key(metadata: Iterable[tuple[str, Any]]) -> str:
    for key, value in metadata or ():
        if key == "x-api-key":
            return str(value)
        if key == "authorization" and str(value).lower().startswith("bearer "):
            return str(value)[7:].strip()
    return ""


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid key with UNAUTHENTICATED (health and reflection stay open)."""

    def __init__(self, api_keys: Iterable[str]) -> None:
        self.api_keys = [k for k in api_keys if k]

    def _valid(self, presented: str) -> bool:
        return any(hmac.compare_digest(presented.encode(), key.encode()) for key in self.api_keys)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(PUBLIC_PREFIXES) or self._valid(_presented_key(details.invocation_metadata)):
            return await continuation(details)
        handler = await continuation(details)
        message = "missing or invalid API key (send metadata 'x-api-key' or 'authorization: Bearer <key>')"
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)
