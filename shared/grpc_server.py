"""Async gRPC server plumbing shared by the three services.

``GrpcServer`` wires: the standard health service (NOT_SERVING until :meth:`mark_serving`),
reflection, one interceptor that maps typed errors to status codes (never a traceback to a
client) and records Prometheus metrics, OpenTelemetry server spans with W3C context from the
metadata, and a graceful drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from shared import metrics
from shared.config import ServerConfig
from shared.errors import AceStepError, InvalidArgument
from shared.pb.acestep.common.v1 import common_pb2
from shared.telemetry import request_id_var

log = logging.getLogger(__name__)
ERROR_DETAIL_KEY = "acestep-error-bin"
MAX_STATUS_MESSAGE_BYTES = 1000  # trailers above ~8 KiB are refused by gRPC clients
MAX_REQUEST_ID_BYTES = 128       # as logged and echoed in error trailers


@dataclass(frozen=True)
class ServiceBinding:
    """One servicer: its generated ``add_XServicer_to_server`` function and full service name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str  # e.g. "acestep.dit.v1.DitService"


def bounded(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8 (marked with "..." when cut)."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode(errors="ignore") + "..."


def _status_code(error: AceStepError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.grpc_code_name, grpc.StatusCode.UNKNOWN)


def error_metadata(code: grpc.StatusCode, message: str, field: str = "", stage: str = "") -> tuple:
    detail = common_pb2.ErrorDetail(code=code.name, field=field or "", message=message, stage=stage,
                                    request_id=request_id_var.get())
    return ((ERROR_DETAIL_KEY, detail.SerializeToString()),)


async def abort_with(context: grpc.aio.ServicerContext, error: AceStepError) -> None:
    """Abort the RPC with the error's status code, message and an ErrorDetail trailer. The message
    is bounded: it travels in trailers, and a client drops a call whose trailers are too large
    (RESOURCE_EXHAUSTED) when a message quotes a huge bad value."""
    code = _status_code(error)
    stage = getattr(error, "stage", "") or ""
    message = bounded(error.message, MAX_STATUS_MESSAGE_BYTES)
    await context.abort(code, message, error_metadata(code, message, bounded(error.field or "", 256), stage))


class _InFlight:
    """How many application RPCs are running; a drain waits until none is."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no RPC runs, False if some still do after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True


class _Call:
    """Bookkeeping of one RPC: request id, in-flight count and gauge, latency and outcome metrics."""

    def __init__(self, service: str, method: str, request: Any, in_flight: _InFlight) -> None:
        self.labels = (service, method)
        self.in_flight = in_flight
        in_flight.enter()
        self.code = "OK"
        self.start = time.perf_counter()
        self.token = request_id_var.set(bounded(getattr(request, "request_id", "") or "-", MAX_REQUEST_ID_BYTES))
        metrics.RPC_IN_FLIGHT.labels(*self.labels).inc()

    def close(self) -> None:
        self.in_flight.leave()
        metrics.RPC_IN_FLIGHT.labels(*self.labels).dec()
        metrics.RPC_LATENCY.labels(*self.labels).observe(time.perf_counter() - self.start)
        metrics.RPC_REQUESTS.labels(*self.labels, self.code).inc()
        try:
            request_id_var.reset(self.token)
        except ValueError:  # closed from another context: an abandoned stream finalized by the event loop
            request_id_var.set("-")

    async def fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        """Map an exception to a status; re-raise what gRPC or asyncio must see."""
        if isinstance(exc, AceStepError):
            self.code = exc.grpc_code_name
            await abort_with(context, exc)
        if isinstance(exc, asyncio.CancelledError):
            self.code = "CANCELLED"
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            code = context.code() if hasattr(context, "code") else None
            self.code = code.name if isinstance(code, grpc.StatusCode) else "ABORTED"
            raise exc
        self.code = "INTERNAL"
        log.error("unhandled error in %s/%s", *self.labels, exc_info=exc)
        message = f"internal error (request_id {request_id_var.get()})"
        await context.abort(grpc.StatusCode.INTERNAL, message, error_metadata(grpc.StatusCode.INTERNAL, message))


def _wrap_unary(behavior: Callable, service: str, method: str, in_flight: _InFlight) -> Callable:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(service, method, request, in_flight)
        try:
            _check_parsed(request)
            return await behavior(request, context)
        except BaseException as exc:  # mapped, logged or re-raised by fail()
            await call.fail(context, exc)
        finally:
            call.close()

    return handler


def _wrap_stream(behavior: Callable, service: str, method: str, in_flight: _InFlight) -> Callable:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(service, method, request, in_flight)
        result = None
        try:
            _check_parsed(request)
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result
        except GeneratorExit:  # the stream was abandoned (the client cancelled or went away): no status to send
            call.code = "CANCELLED"
            if inspect.isasyncgen(result):
                await result.aclose()  # the servicer's cleanup runs now, not whenever the loop finalizes it
            raise
        except BaseException as exc:  # mapped, logged or re-raised by fail()
            await call.fail(context, exc)
        finally:
            call.close()

    return handler


class _Unparsed:
    """Stands in for a request whose bytes are not a valid message (bad wire format, bad UTF-8)."""

    request_id = ""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(deserializer: Optional[Callable[[bytes], Any]]) -> Optional[Callable[[bytes], Any]]:
    """A deserializer that hands undecodable bytes to the handler (INVALID_ARGUMENT there) instead of
    failing inside gRPC, which would answer UNKNOWN with the exception's class name."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return _Unparsed(str(error))

    return deserialize


def _check_parsed(request: Any) -> None:
    if isinstance(request, _Unparsed):
        raise InvalidArgument(f"the request is not a valid message: {request.reason}")


def refusing_handler(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same shape as ``handler`` that answers every call with ``code``."""

    async def refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message, error_metadata(code, message))

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message, error_metadata(code, message))
        yield  # pragma: no cover - makes this an async generator

    deserializer = handler.request_deserializer if handler is not None else None
    serializer = handler.response_serializer if handler is not None else None
    if handler is not None and handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(refuse_unary, deserializer, serializer)


class ErrorMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Typed errors → status codes, unexpected errors → INTERNAL (logged, no traceback sent).
    While draining, new calls are refused with UNAVAILABLE (clients retry another replica)."""

    def __init__(self, service_name: str = "server") -> None:
        self.service_name = service_name
        self.draining = False
        self.in_flight = _InFlight()

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc."):
            return handler
        if self.draining:
            return refusing_handler(handler, grpc.StatusCode.UNAVAILABLE,
                                    f"{self.service_name} is draining; retry on another replica")
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, service, method, self.in_flight),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, service, method, self.in_flight),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


def _tracing_interceptors() -> list[grpc.aio.ServerInterceptor]:
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


class GrpcServer:
    """Build, start, mark serving, drain. One per service process (tests may run several)."""

    def __init__(self, config: ServerConfig, bindings: Iterable[ServiceBinding],
                 extra_interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
                 credentials: Optional[grpc.ServerCredentials] = None) -> None:
        self.config = config
        self.credentials = credentials
        self.bindings = list(bindings)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.errors = ErrorMetricsInterceptor(config.service_name)
        interceptors = [*_tracing_interceptors(), *extra_interceptors, self.errors]
        self.server = grpc.aio.server(interceptors=interceptors,
                                      options=options)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for binding in self.bindings:
            binding.add_to_server(binding.servicer, self.server)
        names = [b.full_name for b in self.bindings]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = 0
        self.metrics_port: Optional[int] = None
        self._stopped = asyncio.Event()

    async def _set_status(self, status: int) -> None:
        for name in ["", *(b.full_name for b in self.bindings)]:
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind and start; health is NOT_SERVING until :meth:`mark_serving`. Returns the port."""
        address = f"{self.config.host}:{self.config.port}"
        if self.credentials is not None:
            self.port = self.server.add_secure_port(address, self.credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.host}:{self.config.port}")
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.config.metrics_port >= 0:
            http_server, _ = start_http_server(self.config.metrics_port, addr=self.config.host)
            self.metrics_port = http_server.server_port
        log.info("%s listening on %s:%d (metrics port %s)", self.config.service_name, self.config.host,
                 self.port, self.metrics_port)
        return self.port

    async def mark_serving(self) -> None:
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace_s: Optional[float] = None) -> None:
        """Report NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace period.

        The transport stays up until the in-flight RPCs are done (or the grace period is over),
        so every call that arrives meanwhile is refused with UNAVAILABLE by the interceptor, never
        cut off by a closing transport (which clients may see as CANCELLED)."""
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        log.info("draining %s (grace %.1f s, %d RPCs in flight)", self.config.service_name, grace,
                 self.errors.in_flight.count)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.errors.draining = True
        await self.health.enter_graceful_shutdown()
        if not await self.errors.in_flight.wait_idle(max(0.0, deadline - loop.time())):
            log.warning("%s: drain grace period over with %d RPCs in flight; cancelling them",
                        self.config.service_name, self.errors.in_flight.count)
        await self.server.stop(max(0.0, deadline - loop.time()))
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain()))

    async def wait(self) -> None:
        await self._stopped.wait()
        await self.server.wait_for_termination()


def write_port_file(path: str, port: int, metrics_port: Optional[int] = None) -> None:
    """Atomically publish the bound ports: line 1 the gRPC port, line 2 the metrics port (if any).
    Readers poll for the file."""
    if not path:
        return
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(f"{port}\n{metrics_port if metrics_port is not None else ''}\n")
    tmp.replace(target)


def read_port_file(path: Path) -> tuple[int, Optional[int]]:
    lines = path.read_text().splitlines()
    metrics_port = int(lines[1]) if len(lines) > 1 and lines[1].strip() else None
    return int(lines[0]), metrics_port


def run_service(parse_args: Callable[[Optional[list[str]]], Any], serve: Callable[[Any], Any],
                argv: Optional[list[str]] = None) -> int:
    """The ``main`` of every service: flags → logging → serve until drained."""
    from shared.telemetry import setup_logging

    args = parse_args(argv)
    setup_logging(args.log_level, args.log_json)
    asyncio.run(serve(args))
    return 0
