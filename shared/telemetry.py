"""Logging with the request id, and OpenTelemetry tracing (W3C context through gRPC metadata)."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Optional

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "INFO", as_json: bool = False) -> None:
    """Configure the root logger once per process (called from each service's ``main``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def setup_tracing(service_name: str, otlp_endpoint: str = "",
                  exporter: Optional[SpanExporter] = None) -> TracerProvider:
    """Install a tracer provider; spans are exported by OTLP/gRPC when an endpoint is given."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is None and otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


class StageSpans:
    """One child span per pipeline stage under the span current at construction (the RPC's
    server span), opened and closed as a request's event stream moves from stage to stage."""

    def __init__(self, tracer_name: str, prefix: str) -> None:
        from opentelemetry import context

        self._tracer = trace.get_tracer(tracer_name)
        self._parent = context.get_current()
        self._prefix = prefix
        self._stage: Optional[str] = None
        self._span: Optional[trace.Span] = None

    def enter(self, stage: str) -> None:
        """Start ``stage`` (ending the previous one); repeated calls for the same stage are free."""
        if stage == self._stage:
            return
        self.close()
        self._stage = stage
        self._span = self._tracer.start_span(f"{self._prefix}.{stage}", context=self._parent)

    def close(self) -> None:
        if self._span is not None:
            self._span.end()
        self._span = None
        self._stage = None
