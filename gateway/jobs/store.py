"""The job store: every generation is a job with an event log and files, kept for a retention period.

``JobStore`` is the interface; ``SqliteJobStore`` (``sqlite_store.py``) is the embedded backend
(one gateway, survives restarts) and ``RedisJobStore`` (``redis_store.py``) the one several gateway
replicas share. A job's events are numbered 1, 2, 3... in the order they were
appended; ``events(request_id, after)`` returns every event with a larger number, in order, so a
client that resumes after N receives N+1... exactly once. ``wait`` lets a follower sleep until the
log grows or the job ends. Events are stored as the serialized ``GenerateEvent`` bytes; the store
does not look inside them. A final state is final: ``append`` and ``set_state`` leave a final job
as it is.

Next to the jobs, a store keeps small per-caller values (``get_preference`` / ``set_preference``:
opaque bytes under a name, last write wins), so that every gateway replica sees them.

Ownership: a job is run by the store instance (gateway process) that created it. The runner renews
the leases of the jobs it runs (``renew_leases``); ``recover`` ends the unfinished jobs whose owner
is gone, appending the failure event and setting the state in one step so a follower that sees the
final state has the whole log. ``request_cancel`` asks the owner, wherever it runs, to stop a job.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

FailedEvent = Callable[[str, str], bytes]
"""``(request_id, reason) -> serialized event``: the log's last event for a job whose owner is gone."""


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
        """Add an event to the log; returns its sequence number (0: the job is final, nothing added)."""

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

    async def recover(self, now_s: float, failed_event: Optional[FailedEvent] = None) -> list[str]:
        """Unfinished jobs whose owner is gone (a process before a restart; a replica whose lease
        expired) are marked failed with the reason, after ``failed_event`` (when given) is appended
        to their log; returns their ids. Safe to call periodically: live owners' jobs are kept."""

    async def renew_leases(self, request_ids: list[str]) -> list[str]:
        """Called periodically with the jobs this instance runs: keeps them owned. Returns those to
        stop: a cancellation was requested, or the job was ended elsewhere."""

    async def request_cancel(self, request_id: str) -> bool:
        """Ask the job's owner to stop it (it sees the request at its next ``renew_leases``); True
        when a live owner holds the job, False when none does (``recover`` ends it)."""

    async def get_preference(self, caller: str, name: str) -> Optional[bytes]:
        """The caller's stored value named ``name`` (e.g. its LoRA default), or None."""

    async def set_preference(self, caller: str, name: str, value: Optional[bytes]) -> None:
        """Store (``None``: delete) one of the caller's values; every store instance sharing the
        backend sees it at once. Preferences are not jobs: ``sweep`` leaves them."""

    async def close(self) -> None:
        ...


def file_name(request_id: str, item_index: int, audio_format: str) -> str:
    """The audio file's name in the store's folder, derived (never taken from a client) from a hash
    of the request id, the item index and the format."""
    if not audio_format.isalnum():
        raise ValueError(f"audio format must be alphanumeric, got {audio_format!r}")
    digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:32]
    return f"{digest}-{int(item_index)}.{audio_format}"
