"""Upstream status codes → typed errors that carry the pipeline stage."""

from __future__ import annotations

import grpc

from shared.errors import (
    AceStepError,
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotReady,
    ResourceExhausted,
)

RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
})
_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: NotReady,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_upstream(error: grpc.aio.AioRpcError, stage: str) -> AceStepError:
    """An upstream failure as our own error, naming the stage it happened in."""
    code = error.code()
    cls = _BY_CODE.get(code, Internal)
    if cls is InvalidArgument:
        typed = cls(error.details() or "invalid argument")
    else:
        typed = cls(f"{stage} failed: {code.name}: {error.details() or 'no details'}")
    typed.stage = stage
    return typed


def with_stage(error: AceStepError, stage: str) -> AceStepError:
    if not getattr(error, "stage", ""):
        error.stage = stage
    return error
