"""The job store: every generation is a job with an event log and files, kept for a retention period.

``JobStore`` is the interface; ``SqliteJobStore`` (``sqlite_store.py``) is the embedded backend
(one gateway, survives restarts). A job's events are numbered 1, 2, 3... in the order they were
appended; ``events(request_id, after)`` returns every event with a larger number, in order, so a
client that resumes after N receives N+1... exactly once. ``wait`` lets a follower sleep until the
log grows or the job ends. Events are stored as the serialized ``GenerateEvent`` bytes; the store
does not look inside them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Protocol


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class StoredFile:
    """One finished item's audio file."""

    item_index: int
    audio_format: str
    size_bytes: int


@dataclass(frozen=True)
class JobRecord:
    request_id: str
    caller: str
    state: JobState
    created_s: float
    updated_s: float
    last_sequence: int = 0
    error: str = ""
    files: tuple[StoredFile, ...] = field(default_factory=tuple)


class JobStore(Protocol):
    async def create(self, request_id: str, caller: str, now_s: float) -> None:
        """A new QUEUED job; raises ``InvalidArgument`` when ``request_id`` exists."""

    async def append(self, request_id: str, event: bytes) -> int:
        """Add an event to the log; returns its sequence number."""

    async def events(self, request_id: str, after: int) -> list[tuple[int, bytes]]:
        """Every event numbered above ``after``, in order."""

    async def wait(self, request_id: str, after: int, timeout_s: float) -> None:
        """Return once the log holds an event above ``after``, the job is final, or the timeout passed."""

    async def set_state(self, request_id: str, state: JobState, now_s: float, error: str = "") -> None:
        ...

    async def get(self, request_id: str) -> Optional[JobRecord]:
        ...

    async def list(self, caller: str, limit: int) -> list[JobRecord]:
        """The caller's jobs, newest first."""

    async def save_file(self, request_id: str, item_index: int, audio_format: str, data: bytes) -> None:
        ...

    async def read_file(self, request_id: str, item_index: int) -> Optional[tuple[StoredFile, bytes]]:
        """The file a finished item produced (only files this store wrote), or None."""

    async def sweep(self, now_s: float) -> int:
        """Delete jobs (and files) finished longer than the retention ago; returns how many."""

    async def recover(self, now_s: float) -> list[str]:
        """After a restart: jobs that were queued or running are marked failed; returns their ids."""

    async def close(self) -> None:
        ...
