"""Runs generations as jobs: each request's orchestrator stream is consumed by a task that logs its
events and files in the job store, whoever is listening.

* ``start_job`` runs the request's prologue (validation, capacity) in the caller's context, so a bad
  or refused request fails the call that made it and creates no job; then the job exists, its
  ``accepted`` event is logged, and a task carries it to the end.
* The log holds every event but raw PCM and file bytes (files are stored whole); progress is
  thinned to stage changes and whole percents. Logged events carry their sequence number.
* A job that fails or is cancelled ends its log with a ``failed`` event; the state is set after the
  last event, so a follower that sees a final state has every event.
* Live subscribers (the ``Generate`` stream that started the job) get every event, PCM and file
  chunks included, from a queue attached before the task starts; a job whose subscriber leaves is
  cancelled unless the request asked to stay detached.
* Ownership: the runner renews the store's leases on the jobs it runs every ``lease_renew_s`` and
  stops those whose cancellation another gateway replica requested; every ``orphan_check_s`` it
  ends the jobs whose owner is gone (``JobStore.recover``), at start-up too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Optional

from gateway.jobs.store import JobRecord, JobState, JobStore
from shared import convert
from shared.errors import AceStepError, Cancelled, Internal
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw

log = logging.getLogger(__name__)
_END = object()
STATE_TO_PB = {JobState.QUEUED: gw.JOB_STATE_QUEUED, JobState.RUNNING: gw.JOB_STATE_RUNNING,
               JobState.SUCCEEDED: gw.JOB_STATE_SUCCEEDED, JobState.FAILED: gw.JOB_STATE_FAILED,
               JobState.CANCELLED: gw.JOB_STATE_CANCELLED}
WATCH_POLL_S = 15.0
SWEEP_INTERVAL_S = 60.0
LEASE_RENEW_S = 2.0  # well inside the store's lease (10 s by default)
ORPHAN_CHECK_S = 5.0
CANCEL_WAIT_S = 10.0  # CancelJob of a job another replica runs waits this long for it to end
AUDIO_CHUNK_BYTES = 256 * 1024


def caller_of(metadata: Any) -> str:
    """Whose job this is: a digest of the API key the call presented, else ``anonymous``."""
    for key, value in metadata or ():
        if key == "x-api-key" or (key == "authorization" and str(value).lower().startswith("bearer ")):
            secret = str(value)[7:].strip() if key == "authorization" else str(value)
            return "key:" + hashlib.sha256(secret.encode()).hexdigest()[:16]
    return "anonymous"


class _Job:
    def __init__(self, request_id: str, detach: bool) -> None:
        self.request_id = request_id
        self.detach = detach
        self.task: Optional[asyncio.Task] = None
        self.subscribers: list[asyncio.Queue] = []
        self.last_progress: tuple[int, int] = (-1, -1)
        self.started = asyncio.Event()  # its task runs (a task cancelled before it runs would skip its cleanup)


class JobRunner:
    """See the module docstring. ``clock`` gives Unix seconds (a test hook)."""

    def __init__(self, generate: Callable[[gw.GenerateRequest], AsyncIterator[gw.GenerateEvent]],
                 store: JobStore, clock: Callable[[], float] = time.time, lease_renew_s: float = LEASE_RENEW_S,
                 orphan_check_s: float = ORPHAN_CHECK_S) -> None:
        self._generate = generate
        self.store = store
        self._clock = clock
        self._lease_renew_s = lease_renew_s
        self._orphan_check_s = orphan_check_s
        self._jobs: dict[str, _Job] = {}
        self._loops: list[asyncio.Task] = []

    async def start(self) -> None:
        """Fail the jobs whose owner is gone; then keep leases, check for orphans and sweep periodically."""
        await self._recover()
        self._loops = [asyncio.ensure_future(self._sweep_forever()), asyncio.ensure_future(self._keep_leases())]

    async def stop(self) -> None:
        for loop in self._loops:
            loop.cancel()
        for job in list(self._jobs.values()):
            if job.task is not None:
                job.task.cancel()
        await asyncio.gather(*self._loops, *(j.task for j in self._jobs.values() if j.task), return_exceptions=True)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                removed = await self.store.sweep(self._clock())
                if removed:
                    log.info("job store: %d expired job(s) deleted", removed)
            except Exception:  # a failed sweep is retried next time
                log.exception("job store sweep failed")
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def _recover(self) -> None:
        for request_id in await self.store.recover(self._clock(), _orphan_failed):
            log.warning("job %s failed: its gateway is gone", request_id)

    async def _keep_leases(self) -> None:
        next_check_s = time.monotonic() + self._orphan_check_s
        while True:
            try:
                for request_id in await self.store.renew_leases(list(self._jobs)):
                    job = self._jobs.get(request_id)
                    if job is not None and job.task is not None:
                        log.info("job %s: stopping, cancelled through another gateway or ended elsewhere",
                                 request_id)
                        job.task.cancel()
                if time.monotonic() >= next_check_s:
                    next_check_s = time.monotonic() + self._orphan_check_s
                    await self._recover()
            except Exception:  # retried next time; a lease outlives a few missed renewals
                log.exception("job store lease renewal failed")
            await asyncio.sleep(self._lease_renew_s)

    async def start_job(self, request: gw.GenerateRequest, caller: str,
                        subscribe: bool = False) -> tuple[gw.GenerateEvent, Optional[asyncio.Queue]]:
        """Run the prologue, create the job, start its task; returns the ``accepted`` event (logged)
        and, with ``subscribe``, the queue of its live events (``_END`` closes it)."""
        stream = self._generate(request)
        accepted = await stream.__anext__()  # validation and capacity errors propagate from here
        request_id = accepted.accepted.request_id
        try:
            await self.store.create(request_id, caller, self._clock())
        except BaseException:
            await stream.aclose()
            raise
        job = self._jobs[request_id] = _Job(request_id, detach=request.detach_on_disconnect or not subscribe)
        queue = None
        if subscribe:
            queue = asyncio.Queue()
            job.subscribers.append(queue)
        await self._record(job, accepted)
        job.task = asyncio.ensure_future(self._run(job, stream))
        await job.started.wait()
        return accepted, queue

    def leave(self, request_id: str, queue: asyncio.Queue) -> None:
        """A live subscriber went away: the job is cancelled unless it runs detached."""
        job = self._jobs.get(request_id)
        if job is None:
            return
        if queue in job.subscribers:
            job.subscribers.remove(queue)
        if not job.detach and not job.subscribers and job.task is not None:
            job.task.cancel()

    async def _run(self, job: _Job, stream: AsyncIterator[gw.GenerateEvent]) -> None:
        files: dict[int, bytearray] = {}
        job.started.set()
        state, error = JobState.SUCCEEDED, ""
        try:
            await self.store.set_state(job.request_id, JobState.RUNNING, self._clock())
            async for event in stream:
                if event.WhichOneof("event") == "file":
                    await self._collect_file(job, event.file, files)
                await self._record(job, event)
        except asyncio.CancelledError:
            state, error = JobState.CANCELLED, "the job was cancelled"
            await self._record(job, _failed(job.request_id, Cancelled(error)))
        except AceStepError as failure:
            state, error = JobState.FAILED, failure.message
            await self._record(job, _failed(job.request_id, failure))
        except Exception as failure:  # the job fails; the gateway goes on
            log.exception("job %s failed", job.request_id)
            state, error = JobState.FAILED, f"internal error: {type(failure).__name__}"
            await self._record(job, _failed(job.request_id, Internal(error)))
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
            await self.store.set_state(job.request_id, state, self._clock(), error)
            for queue in job.subscribers:
                queue.put_nowait(_END)
            self._jobs.pop(job.request_id, None)

    async def _collect_file(self, job: _Job, chunk: common_pb2.FileChunk, files: dict[int, bytearray]) -> None:
        data = files.setdefault(chunk.item_index, bytearray())
        data.extend(chunk.data)
        if chunk.is_last:
            audio_format = convert.AUDIO_FORMAT_FROM_PB.get(chunk.format, "flac")
            await self.store.save_file(job.request_id, chunk.item_index, audio_format, bytes(files.pop(chunk.item_index)))

    async def _record(self, job: _Job, event: gw.GenerateEvent) -> None:
        if self._is_logged(job, event):
            event.sequence = await self._log(job.request_id, event)
        for queue in job.subscribers:
            queue.put_nowait(event)

    async def _log(self, request_id: str, event: gw.GenerateEvent) -> int:
        return await self.store.append(request_id, event.SerializeToString())

    @staticmethod
    def _is_logged(job: _Job, event: gw.GenerateEvent) -> bool:
        kind = event.WhichOneof("event")
        if kind in ("audio", "file"):
            return False
        if kind == "progress":
            mark = (event.progress.stage, int(event.progress.fraction * 100))
            if mark == job.last_progress:
                return False
            job.last_progress = mark
        return True

    async def cancel(self, request_id: str) -> None:
        """Stop the job: here if this runner runs it, else through its owner (waiting up to
        ``CANCEL_WAIT_S`` for it to end); a job without a live owner is ended by ``recover``."""
        job = self._jobs.get(request_id)
        if job is not None and job.task is not None:
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)
            return
        record = await self.store.get(request_id)
        if record is None or record.state.is_final:
            return
        if not await self.store.request_cancel(request_id):
            await self._recover()
            return
        deadline_s = time.monotonic() + CANCEL_WAIT_S
        while (remaining_s := deadline_s - time.monotonic()) > 0:
            record = await self.store.get(request_id)
            if record is None or record.state.is_final:
                return
            await self.store.wait(request_id, record.last_sequence, remaining_s)

    async def watch(self, request_id: str, after: int) -> AsyncIterator[gw.GenerateEvent]:
        """The job's logged events numbered above ``after``, then live ones, until it ends."""
        last = after
        while True:
            for sequence, body in await self.store.events(request_id, last):
                event = gw.GenerateEvent.FromString(body)
                event.sequence = sequence
                last = sequence
                yield event
            record = await self.store.get(request_id)
            if record is None or (record.state.is_final and record.last_sequence <= last):
                return
            await self.store.wait(request_id, last, WATCH_POLL_S)

    async def audio(self, request_id: str, item_index: int) -> AsyncIterator[gw.AudioChunk]:
        found = await self.store.read_file(request_id, item_index)
        if found is None:
            return
        stored, data = found
        audio_format = convert.AUDIO_FORMAT_TO_PB.get(stored.audio_format, common_pb2.AUDIO_FORMAT_UNSPECIFIED)
        for offset in range(0, len(data), AUDIO_CHUNK_BYTES) or [0]:
            yield gw.AudioChunk(data=data[offset:offset + AUDIO_CHUNK_BYTES], offset=offset, total_bytes=len(data),
                                format=audio_format)


def _orphan_failed(request_id: str, reason: str) -> bytes:
    """The last event of a job whose gateway is gone (``JobStore.recover``)."""
    detail = common_pb2.ErrorDetail(code="UNAVAILABLE", message=reason, request_id=request_id)
    return gw.GenerateEvent(failed=gw.JobFailed(error=detail)).SerializeToString()


def _failed(request_id: str, error: AceStepError) -> gw.GenerateEvent:
    detail = common_pb2.ErrorDetail(code=error.grpc_code_name, field=error.field or "", message=error.message,
                                    stage=getattr(error, "stage", "") or "", request_id=request_id)
    return gw.GenerateEvent(failed=gw.JobFailed(error=detail))


def job_to_pb(record: JobRecord) -> gw.Job:
    files = [gw.JobFile(item_index=f.item_index, size_bytes=f.size_bytes,
                        format=convert.AUDIO_FORMAT_TO_PB.get(f.audio_format, common_pb2.AUDIO_FORMAT_UNSPECIFIED))
             for f in record.files]
    return gw.Job(request_id=record.request_id, state=STATE_TO_PB[record.state], created_unix_s=record.created_s,
                  updated_unix_s=record.updated_s, last_sequence=record.last_sequence, error=record.error,
                  files=files)


END_OF_STREAM = _END
