"""Response shapes of the native HTTP API (``/v1``), for the OpenAPI document at ``/docs``.

The routes build plain dicts (``http_service.jobs_view``); these models describe them and FastAPI
checks every answer against them.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

from http_service.forms import model_of
from shared.types import CreateSampleResult, FormatSampleResult, UnderstandResult


class ErrorDetail(BaseModel):
    status: int = Field(description="the HTTP status, repeated")
    code: str = Field(description="gRPC-style code name: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...")
    message: str = Field(description="what was wrong, naming the field and the limit")
    field: str = Field(description="the offending request field (dotted path), or empty")


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobLinks(BaseModel):
    self: str = Field(description="GET: the job")
    events: str = Field(description="GET: the job's events as server-sent events (resumable with Last-Event-ID)")
    cancel: str = Field(description="POST: cancel the job")
    audio: list[str] = Field(default_factory=list, description="GET: each item's file, once finished")


class SubmitReply(BaseModel):
    request_id: str
    queue_position: int = Field(description="jobs ahead of this one when it was accepted")
    links: JobLinks


class JobFile(BaseModel):
    item_index: int
    format: str = Field(description="flac, wav, mp3 or ogg")
    size_bytes: int
    url: str


class JobProgress(BaseModel):
    stage: str = Field(description="queued, lm_metadata, lm_codes, conditioning, diffusion, decode or encode")
    fraction: float = Field(description="0..1 within the stage")
    current: int
    total: int
    message: str
    overall: float = Field(description="0..1 over the whole pipeline")


class JobFailure(BaseModel):
    code: str
    message: str
    stage: str
    field: str


class ResultAudio(BaseModel):
    item_index: int
    key: str
    seed: int
    sample_rate_hz: int
    num_samples: int
    duration_s: float
    format: str
    url: str


class JobResult(BaseModel):
    audios: list[ResultAudio]
    seeds: list[int]
    metadata: dict[str, Any] = Field(description="song metadata the LM planned (MusicMetadata)")
    time_costs: dict[str, float] = Field(description="seconds per stage")
    status_message: str
    params: dict[str, Any] = Field(description="the resolved GenerationParams (LM-filled cot_* values included)")


class JobSummary(BaseModel):
    request_id: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled")
    created_unix_s: float
    updated_unix_s: float
    last_sequence: int = Field(description="sequence of the job's last logged event")
    error: str
    files: list[JobFile]
    links: JobLinks


class JobView(JobSummary):
    progress: Optional[JobProgress] = None
    failure: Optional[JobFailure] = None
    result: Optional[JobResult] = Field(default=None, description="set once the job succeeded")


class JobList(BaseModel):
    jobs: list[JobSummary]


class Health(BaseModel):
    status: str


UnderstandReply = model_of(UnderstandResult, exclude=("success", "error"), name="UnderstandReply", strict=False)
CreateSampleReply = model_of(CreateSampleResult, exclude=("success", "error"), name="CreateSampleReply", strict=False)
FormatSampleReply = model_of(FormatSampleResult, exclude=("success", "error"), name="FormatSampleReply", strict=False)
