"""Typed errors shared by every service.

Engines raise these; one interceptor (``shared.grpc_server``) maps them to gRPC status codes so a
client sees a clear message and never a traceback.
"""

from __future__ import annotations


class AceStepError(Exception):
    """Base class of every error a client may see."""

    grpc_code_name = "UNKNOWN"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(AceStepError):
    """The request is malformed or a value is out of range."""

    grpc_code_name = "INVALID_ARGUMENT"


class NotReady(AceStepError):
    """The service is loading or draining."""

    grpc_code_name = "UNAVAILABLE"


class ResourceExhausted(AceStepError):
    """Admission refused: queue or capacity is full."""

    grpc_code_name = "RESOURCE_EXHAUSTED"


class Cancelled(AceStepError):
    """The caller cancelled the request or its deadline expired."""

    grpc_code_name = "CANCELLED"


class DeadlineExceeded(AceStepError):
    """The request's deadline passed before it finished."""

    grpc_code_name = "DEADLINE_EXCEEDED"


class NotFound(AceStepError):
    """The named job, file or adapter does not exist (or is not the caller's)."""

    grpc_code_name = "NOT_FOUND"


class Unauthenticated(AceStepError):
    """Missing or wrong credentials."""

    grpc_code_name = "UNAUTHENTICATED"


class Internal(AceStepError):
    """A bug or a numerical failure on the server side (e.g. NaN latents)."""

    grpc_code_name = "INTERNAL"


def out_of_range(field: str, value: object, low: object, high: object, unit: str = "") -> InvalidArgument:
    """``duration must be in [10, 600] seconds, got 700``."""
    suffix = f" {unit}" if unit else ""
    return InvalidArgument(f"{field} must be in [{low}, {high}]{suffix}, got {value!r}", field=field)
