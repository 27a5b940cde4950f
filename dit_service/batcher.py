"""Cross-request batching of DiT items. Pure Python: never imports torch or touches CUDA.

A request asks for ``num_items`` outputs and carries a hashable compatibility ``key`` (the
engine builds it from the model variant, the step schedule, the sampler and guidance settings).
Items of concurrent requests that share a key are coalesced, in arrival order, into one batch of
at most ``max_batch_items`` rows; a request may be split over consecutive batches when it does
not fit. Each batch runs ``work(batch)`` on one worker thread (the GPU owner), so the event loop
stays responsive and GPU work is serialized.

Events reach each request through its own ``asyncio.Queue``: the batcher emits ``Admitted`` at
submit time and ``BatchFormed`` when rows of the request join a batch; the work function emits
anything else through :meth:`Batch.emit` and ends a request with :meth:`Batch.finish` or
:meth:`Batch.fail` (both thread-safe).

Cancellation: :meth:`Batcher.abort` (or a passed deadline) drops a request's waiting items at
once and marks its running rows dead. The work function asks :meth:`Batch.live_rows` between
steps and stops computing dead rows; the other rows of the batch are untouched.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Optional

from shared import metrics
from shared.admission import refuse_when_full
from shared.errors import (
    AceStepError,
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotReady,
)

log = logging.getLogger(__name__)

WorkFn = Callable[["Batch"], None]


@dataclass(frozen=True)
class Admitted:
    """The request is queued; ``queue_position`` requests were waiting ahead of it."""

    queue_position: int


@dataclass(frozen=True)
class BatchFormed:
    """Some of the request's items joined a batch of ``batch_size`` rows from ``num_requests`` requests."""

    batch_size: int
    num_requests: int
    item_indices: tuple[int, ...]


@dataclass(frozen=True)
class _End:
    error: Optional[AceStepError] = None


class _Request:
    """Book-keeping of one submitted request (touched on the event loop only, read by the worker)."""

    def __init__(self, request_id: str, key: Hashable, num_items: int, payload: Any, deadline: Optional[float]) -> None:
        self.request_id = request_id
        self.key = key
        self.num_items = num_items
        self.payload = payload
        self.deadline = deadline          # time.monotonic() value, or None
        self.arrived = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.next_item = 0                # first item not yet placed in a batch
        self.running_rows = 0             # rows of this request in the running batch
        self.closed = False               # finished, failed, cancelled or expired

    @property
    def waiting_items(self) -> int:
        return self.num_items - self.next_item

    def is_expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(frozen=True)
class Row:
    """One item of a batch: ``item_index`` of request ``request_id`` with that request's payload."""

    request_id: str
    item_index: int
    payload: Any


class Batch:
    """The rows the worker runs together, plus thread-safe hooks back to their requests."""

    def __init__(self, batcher: Batcher, rows: list[Row], requests: dict[str, _Request]) -> None:
        self.rows = rows
        self._batcher = batcher
        self._requests = requests

    @property
    def request_ids(self) -> list[str]:
        """Distinct request ids, in row order."""
        return list(self._requests)

    def is_live(self, request_id: str) -> bool:
        """False once the request is finished, failed, cancelled or past its deadline.

        A request found past its deadline is closed with ``DeadlineExceeded``.
        """
        request = self._requests[request_id]
        if request.closed:
            return False
        if request.is_expired(time.monotonic()):
            error = DeadlineExceeded(f"request {request_id} passed its deadline during synthesis")
            self._batcher._threadsafe(self._batcher._close, request_id, error)
            return False
        return True

    def live_rows(self) -> list[int]:
        """Indices into ``rows`` whose request is still live (thread-safe, cheap)."""
        live = {rid for rid in self._requests if self.is_live(rid)}
        return [i for i, row in enumerate(self.rows) if row.request_id in live]

    def emit(self, request_id: str, event: Any) -> None:
        """Deliver ``event`` to the request's stream (dropped if the request is closed)."""
        self._batcher._threadsafe(self._batcher._deliver, request_id, event)

    def finish(self, request_id: str) -> None:
        """End the request's stream normally."""
        self._batcher._threadsafe(self._batcher._close, request_id, None)

    def fail(self, request_id: str, error: AceStepError) -> None:
        """End the request's stream with ``error``."""
        self._batcher._threadsafe(self._batcher._close, request_id, error)


class Batcher:
    """Admission, coalescing, one worker thread, per-request event queues."""

    def __init__(
        self,
        work: WorkFn,
        *,
        max_batch_items: int = 8,
        max_queue: int = 64,
        batch_window_s: float = 0.02,
    ) -> None:
        if max_batch_items < 1:
            raise InvalidArgument(f"max_batch_items must be >= 1, got {max_batch_items}", field="max_batch_items")
        if max_queue < 1:
            raise InvalidArgument(f"max_queue must be >= 1, got {max_queue}", field="max_queue")
        if batch_window_s < 0:
            raise InvalidArgument(f"batch_window_s must be >= 0, got {batch_window_s}", field="batch_window_s")
        self.max_batch_items = max_batch_items
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self._work = work
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit-worker")
        self._requests: dict[str, _Request] = {}
        self._waiting: collections.deque[_Request] = collections.deque()
        self._wakeup = asyncio.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._task: Optional[asyncio.Task] = None
        self._accepting = False
        self._running: Optional[asyncio.Future] = None

    async def start(self) -> None:
        """Start the scheduling task on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._task = asyncio.create_task(self._schedule(), name="dit-batcher")

    async def stop(self) -> None:
        """Refuse new work, fail what is still waiting, let the running batch finish, stop the worker."""
        self._accepting = False
        for request in list(self._waiting):
            self._close(request.request_id, NotReady("the DiT service is shutting down"))
        if self._running is not None:
            await asyncio.wait([self._running])
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    @property
    def waiting_items(self) -> int:
        """Items admitted and not yet placed in a batch."""
        return sum(r.waiting_items for r in self._waiting)

    @property
    def idle(self) -> bool:
        return not self._waiting and self._running is None

    def submit(
        self, request_id: str, key: Hashable, num_items: int, payload: Any, deadline: Optional[float] = None
    ) -> AsyncIterator[Any]:
        """Admit a request and return its event stream.

        Raises ``ResourceExhausted`` when the waiting items would exceed ``max_queue``,
        ``InvalidArgument`` for a duplicate ``request_id`` or no items, ``NotReady`` when stopped.
        ``deadline`` is a ``time.monotonic()`` value. The stream yields ``Admitted``, then
        ``BatchFormed`` and the work function's events; it ends normally after ``finish`` or
        raises the error given to ``fail`` (``Cancelled`` after an abort).
        """
        if not self._accepting or self._loop is None:
            raise NotReady("the DiT service is not accepting requests")
        if num_items < 1:
            raise InvalidArgument(f"a request needs at least 1 item, got {num_items}", field="items")
        if request_id in self._requests:
            raise InvalidArgument(f"request_id {request_id!r} is already in progress", field="request_id")
        refuse_when_full("DiT service", self.waiting_items, num_items, self.max_queue, "items: ",
                         metrics.DIT_REJECTED)
        request = _Request(request_id, key, num_items, payload, deadline)
        request.queue.put_nowait(Admitted(queue_position=len(self._waiting)))
        self._requests[request_id] = request
        self._waiting.append(request)
        self._update_queue_metric()
        self._wakeup.set()
        return self._stream(request)

    def abort(self, request_id: str) -> None:
        """Cancel a request: waiting items leave the queue, running rows stop at the next step."""
        if request_id in self._requests:
            self._close(request_id, Cancelled(f"request {request_id} was cancelled"))

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread, between batches (for GPU work outside batching)."""
        if self._loop is None:
            raise NotReady("the DiT service is not started")
        return await self._loop.run_in_executor(self._executor, fn)

    async def _stream(self, request: _Request) -> AsyncIterator[Any]:
        try:
            while True:
                event = await request.queue.get()
                if isinstance(event, _End):
                    if event.error is not None:
                        raise event.error
                    return
                yield event
        finally:
            if not request.closed:  # the consumer went away: treat as cancellation
                self.abort(request.request_id)

    def _threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, request_id: str, event: Any) -> None:
        request = self._requests.get(request_id)
        if request is not None and not request.closed:
            request.queue.put_nowait(event)

    def _close(self, request_id: str, error: Optional[AceStepError]) -> None:
        request = self._requests.pop(request_id, None)
        if request is None or request.closed:
            return
        request.closed = True
        if request in self._waiting:
            self._waiting.remove(request)
            self._update_queue_metric()
        if request.running_rows:
            metrics.DIT_ACTIVE_ITEMS.dec(request.running_rows)
            request.running_rows = 0
        request.queue.put_nowait(_End(error))

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for request in [r for r in self._waiting if r.is_expired(now)]:
            error = DeadlineExceeded(f"request {request.request_id} passed its deadline while queued")
            self._close(request.request_id, error)

    def _update_queue_metric(self) -> None:
        metrics.DIT_QUEUE_DEPTH.set(self.waiting_items)

    async def _schedule(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._expire_waiting()
            if not self._waiting:
                continue
            window_left = self._waiting[0].arrived + self.batch_window_s - time.monotonic()
            if window_left > 0 and self._compatible_waiting() < self.max_batch_items:
                await asyncio.sleep(window_left)  # let concurrent requests meet
                self._expire_waiting()
            batch = self._form_batch()
            if batch is not None:
                await self._run(batch)
            if self._waiting:
                self._wakeup.set()

    def _compatible_waiting(self) -> int:
        key = self._waiting[0].key
        return sum(r.waiting_items for r in self._waiting if r.key == key)

    def _form_batch(self) -> Optional[Batch]:
        """Oldest waiting request's key; its items, then later requests' with the same key, FIFO."""
        if not self._waiting:
            return None
        key = self._waiting[0].key
        rows: list[Row] = []
        members: dict[str, _Request] = {}
        for request in list(self._waiting):
            if request.key != key:
                continue
            take = min(request.waiting_items, self.max_batch_items - len(rows))
            rows.extend(Row(request.request_id, request.next_item + i, request.payload) for i in range(take))
            request.next_item += take
            request.running_rows += take
            members[request.request_id] = request
            if request.waiting_items == 0:
                self._waiting.remove(request)
            if len(rows) == self.max_batch_items:
                break
        self._update_queue_metric()
        metrics.DIT_ACTIVE_ITEMS.inc(len(rows))
        metrics.DIT_BATCH_SIZE.observe(len(rows))
        metrics.DIT_BATCH_REQUESTS.observe(len(members))
        for request in members.values():
            indices = tuple(row.item_index for row in rows if row.request_id == request.request_id)
            request.queue.put_nowait(BatchFormed(len(rows), len(members), indices))
        return Batch(self, rows, members)

    async def _run(self, batch: Batch) -> None:
        assert self._loop is not None
        self._running = self._loop.run_in_executor(self._executor, self._work_guarded, batch)
        try:
            await asyncio.shield(self._running)
        finally:
            self._running = None
            for request in batch._requests.values():
                if request.running_rows and not request.closed:
                    metrics.DIT_ACTIVE_ITEMS.dec(request.running_rows)
                request.running_rows = 0

    def _work_guarded(self, batch: Batch) -> None:
        """Run the work function; an escaped error fails every request of the batch still open."""
        try:
            self._work(batch)
        except AceStepError as error:
            for request_id in batch.request_ids:
                batch.fail(request_id, error)
        except Exception as exc:  # noqa: BLE001 - logged here, clients get a generic INTERNAL
            log.error("DiT batch failed", exc_info=exc)
            for request_id in batch.request_ids:
                batch.fail(request_id, Internal("DiT batch failed with an internal error"))
