"""Optional API-key authentication from request metadata (``x-api-key`` or ``authorization: Bearer``)."""

from __future__ import annotations

import hmac
from typing import Any, Callable, Iterable

import grpc

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

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        if handler is not None and handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        deserializer = handler.request_deserializer if handler is not None else None
        serializer = handler.response_serializer if handler is not None else None
        return grpc.unary_unary_rpc_method_handler(deny_unary, deserializer, serializer)
