"""The DiT Batcher with a fake work function: admission, coalescing, cancellation, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import pytest

from dit_service.batcher import Admitted, Batch, BatchFormed, Batcher
from shared.errors import Cancelled, DeadlineExceeded, Internal, InvalidArgument, NotReady, ResourceExhausted


class FakeWork:
    """Runs ``num_steps`` steps per batch; each step emits ``("step", i, rows)`` to live requests.

    A request is finished once all of its items went through a batch. ``gate`` (when set) blocks
    the worker before the first step so tests can line up requests behind a running batch.
    """

    def __init__(self, num_steps: int = 3, step_s: float = 0.01) -> None:
        self.num_steps = num_steps
        self.step_s = step_s
        self.batches: list[list[tuple[str, int]]] = []
        self.computed_rows: list[list[int]] = []
        self.done_items: dict[str, int] = defaultdict(int)
        self.gate: threading.Event | None = None
        self.fail_with: Exception | None = None
        self.thread_names: set[str] = set()

    def __call__(self, batch: Batch) -> None:
        self.thread_names.add(threading.current_thread().name)
        self.batches.append([(row.request_id, row.item_index) for row in batch.rows])
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail_with is not None:
            raise self.fail_with
        for step in range(self.num_steps):
            live = batch.live_rows()
            if not live:
                return
            self.computed_rows.append(live)
            time.sleep(self.step_s)
            for request_id in {batch.rows[i].request_id for i in live}:
                batch.emit(request_id, ("step", step, sum(batch.rows[i].request_id == request_id for i in live)))
        for i in batch.live_rows():
            row = batch.rows[i]
            self.done_items[row.request_id] += 1
            if self.done_items[row.request_id] == row.payload:
                batch.finish(row.request_id)


async def collect(stream) -> list:
    return [event async for event in stream]


@pytest.fixture
async def make_batcher():
    started: list[Batcher] = []

    async def factory(work: FakeWork, **kwargs) -> Batcher:
        batcher = Batcher(work, **kwargs)
        await batcher.start()
        started.append(batcher)
        return batcher

    yield factory
    for batcher in started:
        await batcher.stop()


async def test_concurrent_compatible_requests_share_one_batch(make_batcher):
    work = FakeWork()
    batcher = await make_batcher(work, max_batch_items=8, batch_window_s=0.05)
    first = batcher.submit("a", key="turbo", num_items=2, payload=2)
    second = batcher.submit("b", key="turbo", num_items=3, payload=3)
    events_a, events_b = await asyncio.gather(collect(first), collect(second))
    assert work.batches == [[("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]]
    assert events_a[0] == Admitted(queue_position=0)
    assert events_b[0] == Admitted(queue_position=1)
    assert events_a[1] == BatchFormed(batch_size=5, num_requests=2, item_indices=(0, 1))
    assert events_b[1] == BatchFormed(batch_size=5, num_requests=2, item_indices=(0, 1, 2))
    assert [e for e in events_a if isinstance(e, tuple)] == [("step", s, 2) for s in range(3)]
    assert [e for e in events_b if isinstance(e, tuple)] == [("step", s, 3) for s in range(3)]


async def test_incompatible_keys_run_in_separate_batches_in_arrival_order(make_batcher):
    work = FakeWork()
    batcher = await make_batcher(work, batch_window_s=0.05)
    streams = [
        batcher.submit("t1", key="turbo", num_items=1, payload=1),
        batcher.submit("b1", key="base-32", num_items=1, payload=1),
        batcher.submit("t2", key="turbo", num_items=1, payload=1),
    ]
    await asyncio.gather(*(collect(s) for s in streams))
    assert work.batches == [[("t1", 0), ("t2", 0)], [("b1", 0)]]


async def test_request_larger_than_capacity_is_split_over_batches(make_batcher):
    work = FakeWork(num_steps=1)
    batcher = await make_batcher(work, max_batch_items=2, batch_window_s=0.0)
    events = await collect(batcher.submit("big", key="k", num_items=5, payload=5))
    assert work.batches == [[("big", 0), ("big", 1)], [("big", 2), ("big", 3)], [("big", 4)]]
    formed = [e for e in events if isinstance(e, BatchFormed)]
    assert [e.item_indices for e in formed] == [(0, 1), (2, 3), (4,)]


async def test_full_queue_is_refused_with_resource_exhausted(make_batcher):
    work = FakeWork()
    work.gate = threading.Event()
    batcher = await make_batcher(work, max_batch_items=1, max_queue=3, batch_window_s=0.0)
    running = batcher.submit("running", key="k", num_items=1, payload=1)
    await asyncio.sleep(0.05)  # the first request is now in the (blocked) worker
    queued = batcher.submit("queued", key="k", num_items=3, payload=3)
    assert batcher.waiting_items == 3
    with pytest.raises(ResourceExhausted) as info:
        batcher.submit("refused", key="k", num_items=1, payload=1)
    assert info.value.message == "DiT service is at capacity (items: 3 queued, limit 3); retry later"
    batcher.abort("queued")  # frees the slots at once
    admitted = batcher.submit("admitted", key="k", num_items=1, payload=1)
    work.gate.set()
    with pytest.raises(Cancelled):
        await collect(queued)
    await asyncio.gather(collect(running), collect(admitted))
    assert [rid for batch in work.batches for rid, _ in batch] == ["running", "admitted"]


async def test_cancelled_request_stops_at_next_step_and_the_other_finishes(make_batcher):
    work = FakeWork(num_steps=6, step_s=0.03)
    batcher = await make_batcher(work, batch_window_s=0.05)
    keep = batcher.submit("keep", key="k", num_items=1, payload=1)
    drop = batcher.submit("drop", key="k", num_items=2, payload=2)
    drop_events = []

    async def consume_then_cancel():
        async for event in drop:
            drop_events.append(event)
            if event == ("step", 1, 2):
                batcher.abort("drop")

    keep_events, _ = await asyncio.gather(collect(keep), asyncio.gather(consume_then_cancel(), return_exceptions=True))
    assert [e for e in keep_events if isinstance(e, tuple)] == [("step", s, 1) for s in range(6)]
    steps_seen_by_drop = [e[1] for e in drop_events if isinstance(e, tuple)]
    assert steps_seen_by_drop[:2] == [0, 1] and max(steps_seen_by_drop) <= 2
    assert work.computed_rows[0] == [0, 1, 2]
    assert work.computed_rows[-1] == [0]  # only the surviving row is computed after the cancel
    assert work.done_items == {"keep": 1}


async def test_aborted_stream_raises_cancelled(make_batcher):
    work = FakeWork(num_steps=20, step_s=0.02)
    batcher = await make_batcher(work, batch_window_s=0.0)
    stream = batcher.submit("x", key="k", num_items=1, payload=1)
    asyncio.get_running_loop().call_later(0.1, batcher.abort, "x")
    with pytest.raises(Cancelled):
        await collect(stream)


async def test_consumer_going_away_aborts_the_request(make_batcher):
    work = FakeWork(num_steps=50, step_s=0.01)
    batcher = await make_batcher(work, batch_window_s=0.0)
    stream = batcher.submit("gone", key="k", num_items=1, payload=1)
    async for event in stream:
        if isinstance(event, tuple):
            break
    await stream.aclose()
    await asyncio.sleep(0.1)
    assert len(work.computed_rows) < 20  # the worker stopped computing the abandoned row
    assert batcher.idle


async def test_deadline_expires_while_queued(make_batcher):
    work = FakeWork(num_steps=1)
    work.gate = threading.Event()
    batcher = await make_batcher(work, max_batch_items=1, batch_window_s=0.0)
    blocker = batcher.submit("blocker", key="k", num_items=1, payload=1)
    await asyncio.sleep(0.05)
    late = batcher.submit("late", key="k", num_items=1, payload=1, deadline=time.monotonic() + 0.05)
    await asyncio.sleep(0.1)
    work.gate.set()
    with pytest.raises(DeadlineExceeded):
        await collect(late)
    await collect(blocker)
    assert [rid for batch in work.batches for rid, _ in batch] == ["blocker"]


async def test_deadline_expires_while_running(make_batcher):
    work = FakeWork(num_steps=30, step_s=0.01)
    batcher = await make_batcher(work, batch_window_s=0.0)
    stream = batcher.submit("slow", key="k", num_items=1, payload=1, deadline=time.monotonic() + 0.08)
    with pytest.raises(DeadlineExceeded):
        await collect(stream)
    assert len(work.computed_rows) < 30


async def test_work_errors_fail_every_request_of_the_batch(make_batcher):
    work = FakeWork()
    work.fail_with = RuntimeError("boom")
    batcher = await make_batcher(work, batch_window_s=0.05)
    first = batcher.submit("a", key="k", num_items=1, payload=1)
    second = batcher.submit("b", key="k", num_items=1, payload=1)
    results = await asyncio.gather(collect(first), collect(second), return_exceptions=True)
    assert all(isinstance(r, Internal) for r in results)
    assert "boom" not in results[0].message
    work.fail_with = InvalidArgument("src_audio could not be decoded", field="src_audio")
    with pytest.raises(InvalidArgument, match="src_audio"):
        await collect(batcher.submit("c", key="k", num_items=1, payload=1))


async def test_work_runs_on_one_worker_thread_and_the_loop_stays_responsive(make_batcher):
    work = FakeWork(num_steps=5, step_s=0.04)
    batcher = await make_batcher(work, batch_window_s=0.0)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.gather(*(collect(batcher.submit(f"r{i}", key=i, num_items=1, payload=1)) for i in range(2)))
    task.cancel()
    assert ticks >= 10
    assert len(work.thread_names) == 1 and threading.current_thread().name not in work.thread_names


async def test_duplicate_request_id_and_empty_request_are_invalid(make_batcher):
    work = FakeWork()
    work.gate = threading.Event()
    batcher = await make_batcher(work, batch_window_s=0.0)
    stream = batcher.submit("same", key="k", num_items=1, payload=1)
    with pytest.raises(InvalidArgument, match="already in progress"):
        batcher.submit("same", key="k", num_items=1, payload=1)
    with pytest.raises(InvalidArgument, match="at least 1 item"):
        batcher.submit("empty", key="k", num_items=0, payload=0)
    work.gate.set()
    await collect(stream)


async def test_stop_refuses_waiting_work_and_lets_the_running_batch_finish():
    work = FakeWork(num_steps=1)
    work.gate = threading.Event()
    batcher = Batcher(work, max_batch_items=1, batch_window_s=0.0)
    await batcher.start()
    running = batcher.submit("running", key="k", num_items=1, payload=1)
    await asyncio.sleep(0.05)
    waiting = batcher.submit("waiting", key="k", num_items=1, payload=1)
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0.05)
    work.gate.set()
    await stopping
    with pytest.raises(NotReady):
        await collect(waiting)
    assert [e for e in await collect(running) if isinstance(e, tuple)] == [("step", 0, 1)]
    with pytest.raises(NotReady):
        batcher.submit("late", key="k", num_items=1, payload=1)
