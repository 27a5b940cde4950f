"""Jobs: the SQLite store (log order, wake-ups, files, retention, restart) and the runner (what is
logged, failures and cancellation as the log's last event, resuming a watch exactly once).

The runner is driven by a scripted event source standing in for the orchestrator's stream; the
real stream is covered by the end-to-end job tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.jobs.runner import END_OF_STREAM, JobRunner
from gateway.jobs.sqlite_store import SqliteJobStore
from gateway.jobs.store import JobState
from shared.errors import InvalidArgument, ResourceExhausted
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw


@pytest.fixture
def store(tmp_path: Path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "jobs", retention_s=100.0)


async def test_log_order_wakeups_and_states(store: SqliteJobStore) -> None:
    await store.create("a", "anonymous", 1.0)
    with pytest.raises(InvalidArgument, match="already a job"):
        await store.create("a", "anonymous", 1.0)
    assert [await store.append("a", bytes([i])) for i in range(3)] == [1, 2, 3]
    assert await store.events("a", 1) == [(2, b"\x01"), (3, b"\x02")]
    waiter = asyncio.ensure_future(store.wait("a", 3, timeout_s=30.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await store.append("a", b"x")
    await asyncio.wait_for(waiter, 5.0)
    await store.set_state("a", JobState.SUCCEEDED, 2.0)
    record = await store.get("a")
    assert (record.state, record.last_sequence, record.updated_s) == (JobState.SUCCEEDED, 4, 2.0)
    await asyncio.wait_for(store.wait("a", 4, timeout_s=30.0), 5.0)  # final: returns at once
    assert await store.get("missing") is None


async def test_files_retention_and_restart(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    store = SqliteJobStore(folder, retention_s=100.0)
    for name, created in (("old", 0.0), ("new", 50.0), ("running", 0.0)):
        await store.create(name, "key:1", created)
    await store.save_file("old", 0, "flac", b"old-bytes")
    await store.save_file("new", 1, "wav", b"new-bytes")
    await store.set_state("old", JobState.SUCCEEDED, 10.0)
    await store.set_state("new", JobState.SUCCEEDED, 60.0)
    await store.set_state("running", JobState.RUNNING, 10.0)
    assert [r.request_id for r in await store.list("key:1", 10)][0] == "new"  # newest first
    assert len(await store.list("key:1", 2)) == 2
    assert await store.list("someone else", 10) == []
    await store.close()

    reopened = SqliteJobStore(folder, retention_s=100.0)  # a gateway restart
    assert await reopened.recover(200.0) == ["running"]
    running = await reopened.get("running")
    assert running.state is JobState.FAILED and "restarted" in running.error
    stored, data = await reopened.read_file("new", 1)
    assert (stored.audio_format, stored.size_bytes, data) == ("wav", 9, b"new-bytes")
    assert await reopened.read_file("new", 0) is None
    assert await reopened.sweep(140.0) == 1  # only "old" finished more than 100 s ago
    assert await reopened.get("old") is None and await reopened.get("new") is not None
    assert not any(p.name.endswith(".flac") for p in (folder / "files").iterdir())
    await reopened.close()


def _progress(stage: int, fraction: float) -> gw.GenerateEvent:
    return gw.GenerateEvent(progress=common_pb2.Progress(stage=stage, fraction=fraction))


def _file(item: int, data: bytes, last: bool) -> gw.GenerateEvent:
    return gw.GenerateEvent(file=common_pb2.FileChunk(item_index=item, data=data, is_last=last,
                                                      format=common_pb2.AUDIO_FORMAT_WAV))


class Script:
    """An orchestrator stream: accepted, then the given events; optionally fails or waits at the end."""

    def __init__(self, events, fail=None, hold: asyncio.Event | None = None, refuse=None) -> None:
        self.events, self.fail, self.hold, self.refuse = events, fail, hold, refuse
        self.closed = asyncio.Event()

    def __call__(self, request: gw.GenerateRequest):
        return self._stream(request)

    async def _stream(self, request):
        if self.refuse is not None:
            raise self.refuse
        try:
            yield gw.GenerateEvent(accepted=gw.Accepted(request_id=request.request_id, queue_position=0))
            for event in self.events:
                await asyncio.sleep(0)
                yield event
            if self.hold is not None:
                await self.hold.wait()
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed.set()


EVENTS = [_progress(5, 0.001), _progress(5, 0.004), _progress(5, 0.5), gw.GenerateEvent(audio=common_pb2.PcmChunk()),
          _file(0, b"ab", False), _file(0, b"cd", True), gw.GenerateEvent(result=gw.GenerateResult(status_message="ok"))]


async def _drain(queue: asyncio.Queue) -> list:
    events = []
    while (event := await queue.get()) is not END_OF_STREAM:
        events.append(event)
    return events


async def test_a_job_logs_thinned_events_and_stores_files(store: SqliteJobStore) -> None:
    runner = JobRunner(Script(EVENTS), store)
    accepted, queue = await runner.start_job(gw.GenerateRequest(request_id="j1"), "anonymous", subscribe=True)
    live = await _drain(queue)
    assert accepted.sequence == 1
    assert [e.WhichOneof("event") for e in live] == ["accepted"] + ["progress"] * 3 + ["audio", "file", "file", "result"]
    logged = [gw.GenerateEvent.FromString(body) for _, body in await store.events("j1", 0)]
    kinds = [e.WhichOneof("event") for e in logged]
    assert kinds == ["accepted", "progress", "progress", "result"]  # 0.1% and 0.4% are one whole percent
    assert [e.sequence for e in live if e.sequence] == [1, 2, 3, 4]
    record = await store.get("j1")
    assert record.state is JobState.SUCCEEDED and [f.item_index for f in record.files] == [0]
    assert (await store.read_file("j1", 0))[1] == b"abcd"


async def test_watch_resumes_after_any_sequence_exactly_once(store: SqliteJobStore) -> None:
    hold = asyncio.Event()
    runner = JobRunner(Script(EVENTS, hold=hold), store)
    await runner.start_job(gw.GenerateRequest(request_id="w"), "anonymous")
    first: list[int] = []
    async for event in runner.watch("w", 0):
        first.append(event.sequence)
        if len(first) == 2:
            break  # the client drops the stream halfway
    resumed = asyncio.ensure_future(_collect(runner.watch("w", first[-1])))
    await asyncio.sleep(0.1)
    hold.set()
    rest = await asyncio.wait_for(resumed, 10.0)
    assert first + [e.sequence for e in rest] == [1, 2, 3, 4]
    assert rest[-1].WhichOneof("event") == "result"


async def _collect(stream) -> list:
    return [event async for event in stream]


async def test_failure_and_cancellation_end_the_log(store: SqliteJobStore) -> None:
    failing = JobRunner(Script(EVENTS[:1], fail=ResourceExhausted("DiT service is at capacity")), store)
    await failing.start_job(gw.GenerateRequest(request_id="f"), "anonymous")
    events = await asyncio.wait_for(_collect(failing.watch("f", 0)), 10.0)
    assert events[-1].failed.error.code == "RESOURCE_EXHAUSTED"
    assert (await store.get("f")).state is JobState.FAILED

    hold = asyncio.Event()
    script = Script(EVENTS[:1], hold=hold)
    runner = JobRunner(script, store)
    await runner.start_job(gw.GenerateRequest(request_id="c"), "anonymous")
    await runner.cancel("c")
    assert script.closed.is_set()  # the orchestrator stream (and its backend calls) was closed
    events = await asyncio.wait_for(_collect(runner.watch("c", 0)), 10.0)
    assert events[-1].failed.error.code == "CANCELLED"
    assert (await store.get("c")).state is JobState.CANCELLED


async def test_a_leaving_subscriber_cancels_unless_detached(store: SqliteJobStore) -> None:
    hold = asyncio.Event()
    attached = Script([], hold=hold)
    runner = JobRunner(attached, store)
    _, queue = await runner.start_job(gw.GenerateRequest(request_id="att"), "anonymous", subscribe=True)
    runner.leave("att", queue)
    await asyncio.wait_for(attached.closed.wait(), 5.0)
    assert (await _wait_final(store, "att")) is JobState.CANCELLED

    detached = Script([], hold=hold)
    runner = JobRunner(detached, store)
    _, queue = await runner.start_job(gw.GenerateRequest(request_id="det", detach_on_disconnect=True),
                                      "anonymous", subscribe=True)
    runner.leave("det", queue)
    await asyncio.sleep(0.05)
    assert not detached.closed.is_set()
    hold.set()
    assert (await _wait_final(store, "det")) is JobState.SUCCEEDED


async def _wait_final(store: SqliteJobStore, request_id: str) -> JobState:
    for _ in range(200):
        record = await store.get(request_id)
        if record.state.is_final:
            return record.state
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {request_id} did not finish")


async def test_a_refused_request_creates_no_job(store: SqliteJobStore) -> None:
    runner = JobRunner(Script([], refuse=InvalidArgument("caption must be at most 512 characters", field="caption")),
                       store)
    with pytest.raises(InvalidArgument):
        await runner.start_job(gw.GenerateRequest(request_id="bad"), "anonymous")
    assert await store.get("bad") is None


@pytest.mark.parametrize("code", ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND"])
def test_a_failed_job_ends_a_generate_stream_with_its_own_status(code: str) -> None:
    from gateway.servicer import _raise_failure

    failed = gw.JobFailed(error=common_pb2.ErrorDetail(code=code, message="dit failed: boom", stage="dit",
                                                       field="x"))
    with pytest.raises(Exception) as info:
        _raise_failure(failed)
    assert info.value.grpc_code_name == code
    assert (info.value.message, info.value.stage, info.value.field) == ("dit failed: boom", "dit", "x")
