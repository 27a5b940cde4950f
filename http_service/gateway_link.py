"""The HTTP edge's one connection to the gateway: gRPC stubs, the caller's credentials forwarded on
every call, and gRPC failures turned into HTTP errors with the gateway's own message and field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import grpc
from fastapi import HTTPException, Request

from shared.grpc_server import ERROR_DETAIL_KEY
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc

# gRPC status -> HTTP status of the error a client of the edge sees.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass(frozen=True)
class EdgeError:
    """A failure as the edge reports it: HTTP status, gRPC code name, message, offending field."""

    status: int
    code: str
    message: str
    field: str = ""

    def exception(self) -> HTTPException:
        return HTTPException(self.status, detail={"code": self.code, "message": self.message, "field": self.field})


def edge_error(error: grpc.aio.AioRpcError) -> EdgeError:
    """The gateway's status, message and ``ErrorDetail.field`` as an :class:`EdgeError`."""
    field = ""
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_DETAIL_KEY:
            field = common_pb2.ErrorDetail.FromString(value).field
    code = error.code()
    return EdgeError(HTTP_STATUS.get(code, 502), code.name, error.details() or code.name, field)


def credentials(request: Request) -> tuple[tuple[str, str], ...]:
    """The caller's API key as gateway metadata: ``Authorization: Bearer``, ``X-API-Key`` or the
    ``ai_token`` query/form value (ACE-Step's REST clients) — the gateway checks it."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer ") and header[7:].strip():
        return (("authorization", "Bearer " + header[7:].strip()),)
    key = request.headers.get("x-api-key") or request.query_params.get("ai_token") or ""
    return (("x-api-key", key),) if key else ()


class GatewayLink:
    """A channel to the gateway (``host:port``), opened on the server's event loop."""

    def __init__(self, target: str, root_certificates: Optional[bytes] = None,
                 max_message_bytes: int = 320 * 1024 * 1024) -> None:
        self.target = target
        self._root_certificates = root_certificates
        self._options = [("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel: Optional[grpc.aio.Channel] = None
        self._stub: Optional[gateway_pb2_grpc.GatewayServiceStub] = None

    @property
    def stub(self) -> gateway_pb2_grpc.GatewayServiceStub:
        if self._stub is None:
            if self._root_certificates is not None:
                creds = grpc.ssl_channel_credentials(self._root_certificates)
                self._channel = grpc.aio.secure_channel(self.target, creds, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        return self._stub

    async def unary(self, method: str, message: Any, request: Request, timeout_s: Optional[float] = None) -> Any:
        """One unary gateway call with the caller's credentials; failures raise ``HTTPException``."""
        try:
            return await getattr(self.stub, method)(message, metadata=credentials(request), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise edge_error(error).exception() from None

    def stream(self, method: str, message: Any, request: Request) -> Any:
        """A server-streaming call (the caller iterates it and handles ``AioRpcError`` itself)."""
        return getattr(self.stub, method)(message, metadata=credentials(request))

    async def ready(self, timeout_s: float = 2.0) -> bool:
        """Whether the gateway's health service answers SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.stub  # opens the channel
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(health_pb2.HealthCheckRequest(),
                                                                          timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
