"""One behavioural suite for both job stores: SQLite (embedded) and Redis (shared by replicas, on a
real redis-server).

``Backend.peer`` is another gateway process serving the same jobs at the same time: for SQLite
that is the one process itself (a folder has one owner), for Redis a second replica.
``Backend.restarted`` is a gateway process that comes after the first one is gone. The last tests
are about several live replicas, which only the Redis store has: a Watch on one replica following
a job another runs, a cancel crossing replicas, and a replica that dies mid-job.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import pytest

from gateway.jobs.redis_store import RedisJobStore
from gateway.jobs.runner import JobRunner
from gateway.jobs.sqlite_store import SqliteJobStore
from gateway.jobs.store import JobState, JobStore, file_name
from shared.errors import InvalidArgument
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from tests.redis_server import unique_prefix
from tests.unit.gateway.test_jobs import EVENTS, Script

RETENTION_S = 100.0
LEASE_S = 0.5  # Redis leases in these tests: short, so that a stopped owner is noticed soon
FAST = dict(lease_renew_s=0.05, orphan_check_s=0.05)  # runner loops in these tests


class Backend:
    def __init__(self, kind: str, folder: Path, redis_url: Optional[str]) -> None:
        self.kind, self.folder, self.redis_url = kind, folder, redis_url
        self.files_dir = folder / "files"  # the SQLite store's own layout; the Redis store is told
        self.prefix = unique_prefix()
        self._opened: list[JobStore] = []

    def open(self, replica: str = "a") -> JobStore:
        if self.kind == "sqlite":
            store = SqliteJobStore(self.folder, retention_s=RETENTION_S)
        else:
            store = RedisJobStore(self.redis_url, self.files_dir, RETENTION_S, replica_id=replica, lease_s=LEASE_S,
                                  prefix=self.prefix)
        self._opened.append(store)
        return store

    def peer(self, store: JobStore) -> JobStore:
        return store if self.kind == "sqlite" else self.open("b")

    async def restarted(self, store: JobStore) -> JobStore:
        await self.close(store)
        return self.open("c")

    async def close(self, store: JobStore) -> None:
        if store in self._opened:
            self._opened.remove(store)
            await store.close()

    async def close_all(self) -> None:
        for store in list(self._opened):
            await self.close(store)


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path):
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    chosen = Backend(request.param, tmp_path / "jobs", url)
    yield chosen
    await chosen.close_all()


@pytest.fixture
async def redis_backend(redis_server, tmp_path: Path):
    chosen = Backend("redis", tmp_path / "jobs", redis_server.url)
    yield chosen
    await chosen.close_all()


def _failed_event(request_id: str, reason: str) -> bytes:
    return f"failed {request_id}: {reason}".encode()


async def _recover_until_found(store: JobStore, now_s: float) -> list[str]:
    """``recover`` until it ends something (at once for SQLite; once the lease ran out for Redis)."""
    for _ in range(400):
        found = await store.recover(now_s, _failed_event)
        if found:
            return found
        await asyncio.sleep(0.025)
    raise AssertionError("recover never found the orphaned job")


async def test_the_log_numbers_events_and_replays_after_any_point(backend: Backend) -> None:
    store = backend.open()
    await store.create("a", "key:1", 5.0)
    with pytest.raises(InvalidArgument, match="already a job"):
        await backend.peer(store).create("a", "key:2", 6.0)
    bodies = [bytes([i]) * (i + 1) for i in range(5)]
    assert [await store.append("a", body) for body in bodies] == [1, 2, 3, 4, 5]
    reader = backend.peer(store)
    for after in range(6):
        assert await reader.events("a", after) == list(zip(range(after + 1, 6), bodies[after:]))
    assert await reader.events("unknown", 0) == []
    record = await reader.get("a")
    assert (record.request_id, record.caller, record.state, record.created_s, record.updated_s,
            record.last_sequence, record.error, record.files) == ("a", "key:1", JobState.QUEUED, 5.0, 5.0, 5, "", ())
    assert await reader.get("unknown") is None


async def test_a_final_job_is_closed(backend: Backend) -> None:
    store = backend.open()
    await store.create("done", "anonymous", 1.0)
    await store.append("done", b"accepted")
    await store.set_state("done", JobState.RUNNING, 2.0)
    await store.set_state("done", JobState.SUCCEEDED, 3.0, "")
    assert await store.append("done", b"late") == 0
    await store.set_state("done", JobState.FAILED, 4.0, "too late")
    record = await backend.peer(store).get("done")
    assert (record.state, record.updated_s, record.error, record.last_sequence) == (JobState.SUCCEEDED, 3.0, "", 1)
    assert await store.events("done", 0) == [(1, b"accepted")]


async def test_wait_wakes_on_an_append_or_a_state_change_elsewhere(backend: Backend) -> None:
    store = backend.open()
    follower = backend.peer(store)
    await store.create("w", "anonymous", 1.0)
    await store.append("w", b"one")
    await asyncio.wait_for(follower.wait("w", 0, timeout_s=30.0), 10.0)  # already past 0: at once
    waiter = asyncio.ensure_future(follower.wait("w", 1, timeout_s=30.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert await store.append("w", b"two") == 2
    await asyncio.wait_for(waiter, 10.0)
    assert await follower.events("w", 1) == [(2, b"two")]

    waiter = asyncio.ensure_future(follower.wait("w", 2, timeout_s=30.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await store.set_state("w", JobState.CANCELLED, 2.0, "the job was cancelled")  # no event: the state wakes it
    await asyncio.wait_for(waiter, 10.0)
    await asyncio.wait_for(follower.wait("w", 2, timeout_s=30.0), 10.0)  # final: at once
    await asyncio.wait_for(follower.wait("unknown", 0, timeout_s=30.0), 10.0)


async def test_list_gives_a_callers_jobs_newest_first(backend: Backend) -> None:
    store = backend.open()
    for request_id, caller, created_s in (("x1", "key:x", 1.0), ("y1", "key:y", 2.0), ("x3", "key:x", 3.0),
                                          ("x2", "key:x", 2.5)):
        await store.create(request_id, caller, created_s)
    reader = backend.peer(store)
    assert [r.request_id for r in await reader.list("key:x", 10)] == ["x3", "x2", "x1"]
    assert [r.request_id for r in await reader.list("key:x", 2)] == ["x3", "x2"]
    assert [r.request_id for r in await reader.list("key:y", 10)] == ["y1"]
    assert await reader.list("key:z", 10) == []


async def test_preferences_are_per_caller_shared_and_outlive_a_restart(backend: Backend) -> None:
    store = backend.open()
    assert await store.get_preference("key:a", "lora_default") is None
    await store.set_preference("key:a", "lora_default", b"\x00first")
    await store.set_preference("key:a", "other", b"kept")
    await store.set_preference("key:b", "lora_default", b"b's own")
    peer = backend.peer(store)
    assert await peer.get_preference("key:a", "lora_default") == b"\x00first"
    await peer.set_preference("key:a", "lora_default", b"second")  # last write wins
    assert await store.get_preference("key:a", "lora_default") == b"second"
    await store.create("j", "key:a", 0.0)
    await store.set_state("j", JobState.SUCCEEDED, 1.0)
    assert await store.sweep(1000.0) == 1  # jobs go; preferences stay
    successor = await backend.restarted(store)
    assert [await successor.get_preference(caller, name) for caller, name in (
        ("key:a", "lora_default"), ("key:a", "other"), ("key:b", "lora_default"), ("anonymous", "lora_default"))] == [
        b"second", b"kept", b"b's own", None]
    await successor.set_preference("key:a", "lora_default", None)
    await successor.set_preference("key:c", "lora_default", None)  # deleting nothing is fine
    assert await successor.get_preference("key:a", "lora_default") is None
    assert await successor.get_preference("key:a", "other") == b"kept"
    assert await successor.get_preference("key:b", "lora_default") == b"b's own"


async def test_files_round_trip_and_only_issued_files_are_read(backend: Backend) -> None:
    store = backend.open()
    await store.create("f", "anonymous", 1.0)
    await store.save_file("f", 1, "wav", b"second item")
    await store.save_file("f", 0, "flac", b"first")
    reader = backend.peer(store)
    stored, data = await reader.read_file("f", 1)
    assert (stored.item_index, stored.audio_format, stored.size_bytes, data) == (1, "wav", 11, b"second item")
    assert (await reader.read_file("f", 0))[1] == b"first"
    assert [(f.item_index, f.audio_format, f.size_bytes) for f in (await reader.get("f")).files] == [
        (0, "flac", 5), (1, "wav", 11)]
    assert await reader.read_file("f", 2) is None
    assert await reader.read_file("unknown", 0) is None
    (backend.files_dir / file_name("ghost", 0, "wav")).write_bytes(b"planted")  # no record issued it
    assert await reader.read_file("ghost", 0) is None
    with pytest.raises(ValueError, match="alphanumeric"):
        await store.save_file("f", 3, "../wav", b"x")
    assert sorted(p.name for p in backend.files_dir.iterdir()) == sorted(
        [file_name("f", 0, "flac"), file_name("f", 1, "wav"), file_name("ghost", 0, "wav")])


async def test_sweep_deletes_expired_jobs_with_their_files(backend: Backend) -> None:
    store = backend.open()
    for request_id, created_s in (("old", 0.0), ("new", 50.0), ("running", 0.0)):
        await store.create(request_id, "key:1", created_s)
        await store.append(request_id, b"accepted")
    await store.save_file("old", 0, "flac", b"old-bytes")
    await store.save_file("new", 1, "wav", b"new-bytes")
    await store.set_state("old", JobState.SUCCEEDED, 10.0)
    await store.set_state("new", JobState.FAILED, 60.0, "boom")
    await store.set_state("running", JobState.RUNNING, 10.0)
    assert await store.sweep(140.0) == 1  # only "old" ended more than RETENTION_S ago
    assert await backend.peer(store).sweep(140.0) == 0
    assert await store.get("old") is None and await store.events("old", 0) == []
    assert await store.read_file("old", 0) is None
    assert [p.name for p in backend.files_dir.iterdir()] == [file_name("new", 1, "wav")]
    assert [r.request_id for r in await store.list("key:1", 10)] == ["new", "running"]
    assert (await store.read_file("new", 1))[1] == b"new-bytes"
    assert await store.sweep(1000.0) == 1  # a running job is never swept
    assert [r.request_id for r in await store.list("key:1", 10)] == ["running"]


async def test_recover_ends_the_jobs_of_a_gateway_that_is_gone(backend: Backend) -> None:
    store = backend.open()
    for request_id in ("queued", "running", "done"):
        await store.create(request_id, "anonymous", 1.0)
        await store.append(request_id, b"accepted")
    await store.set_state("running", JobState.RUNNING, 2.0)
    await store.set_state("done", JobState.SUCCEEDED, 3.0)
    successor = await backend.restarted(store)
    found = await _recover_until_found(successor, 50.0)
    found += await successor.recover(50.0, _failed_event)  # both went in one check, or the second follows
    assert sorted(found) == ["queued", "running"]
    assert await successor.recover(60.0, _failed_event) == []
    for request_id in ("queued", "running"):
        record = await successor.get(request_id)
        assert record.state is JobState.FAILED and record.updated_s == 50.0
        assert "restarted" in record.error or "stopped" in record.error
        assert await successor.events(request_id, 1) == [(2, _failed_event(request_id, record.error))]
    assert (await successor.get("done")).state is JobState.SUCCEEDED


async def test_recover_keeps_the_jobs_a_live_owner_runs(backend: Backend) -> None:
    store = backend.open()
    await store.create("live", "anonymous", 1.0)
    await store.set_state("live", JobState.RUNNING, 2.0)
    other = backend.peer(store)
    for _ in range(int(3 * LEASE_S / 0.05)):  # several lease lengths, renewed as a runner does
        assert await store.renew_leases(["live"]) == []
        assert await other.recover(10.0, _failed_event) == []
        await asyncio.sleep(0.05)
    record = await other.get("live")
    assert (record.state, record.last_sequence) == (JobState.RUNNING, 0)


async def test_a_started_runner_keeps_its_jobs_through_orphan_checks(backend: Backend) -> None:
    hold = asyncio.Event()
    runner = JobRunner(Script(EVENTS, hold=hold), backend.open(), **FAST)
    await runner.start()
    try:
        await runner.start_job(gw.GenerateRequest(request_id="kept"), "anonymous")
        await asyncio.sleep(3 * LEASE_S)  # many orphan checks; the lease would have run out unrenewed
        assert (await runner.store.get("kept")).state is JobState.RUNNING
        hold.set()
        events = await asyncio.wait_for(_collect(runner.watch("kept", 0)), 10.0)
        assert events[-1].WhichOneof("event") == "result"
        assert (await runner.store.get("kept")).state is JobState.SUCCEEDED
    finally:
        await runner.stop()


async def _collect(stream) -> list:
    return [event async for event in stream]


async def test_a_watch_on_one_replica_follows_a_job_another_runs(redis_backend: Backend) -> None:
    hold = asyncio.Event()
    owner = JobRunner(Script(EVENTS, hold=hold), redis_backend.open("a"), **FAST)
    follower = JobRunner(Script([]), redis_backend.open("b"), **FAST)
    await owner.start()
    try:
        await owner.start_job(gw.GenerateRequest(request_id="x"), "anonymous")
        first: list[gw.GenerateEvent] = []
        async for event in follower.watch("x", 0):
            first.append(event)
            if len(first) == 2:
                break  # dropped halfway
        resumed = asyncio.ensure_future(_collect(follower.watch("x", first[-1].sequence)))
        await asyncio.sleep(0.05)
        hold.set()
        rest = await asyncio.wait_for(resumed, 10.0)
        assert [e.sequence for e in first + rest] == [1, 2, 3, 4]
        assert rest[-1].WhichOneof("event") == "result"
        audio = [chunk async for chunk in follower.audio("x", 0)]
        assert b"".join(chunk.data for chunk in audio) == b"abcd"
    finally:
        await owner.stop()


async def test_a_cancel_through_another_replica_stops_the_job_on_its_owner(redis_backend: Backend) -> None:
    script = Script(EVENTS[:1], hold=asyncio.Event())
    owner = JobRunner(script, redis_backend.open("a"), **FAST)
    other = JobRunner(Script([]), redis_backend.open("b"), **FAST)
    await owner.start()
    try:
        await owner.start_job(gw.GenerateRequest(request_id="c"), "anonymous")
        await other.cancel("c")  # returns once the owner has ended the job
        assert script.closed.is_set()  # the owner's orchestrator stream was closed
        record = await other.store.get("c")
        assert (record.state, record.error) == (JobState.CANCELLED, "the job was cancelled")
        events = await asyncio.wait_for(_collect(other.watch("c", 0)), 10.0)
        assert events[-1].failed.error.code == "CANCELLED"
        assert await other.store.request_cancel("c") is False  # final: nothing to ask
    finally:
        await owner.stop()


async def test_a_replica_that_stops_renewing_loses_its_jobs(redis_backend: Backend) -> None:
    """The owner hangs (no lease renewal): another replica ends its job with the reason, the
    follower's Watch ends with that failure, and the owner, back again, stops and writes nothing."""
    script = Script(EVENTS[:2], hold=asyncio.Event())
    owner = JobRunner(script, redis_backend.open("a"))  # never started: its leases are not renewed
    survivor = JobRunner(Script([]), redis_backend.open("b"), **FAST)
    await owner.start_job(gw.GenerateRequest(request_id="lost"), "anonymous")
    await survivor.start()
    try:
        events = await asyncio.wait_for(_collect(survivor.watch("lost", 0)), 30.0)
        assert [e.WhichOneof("event") for e in events] == ["accepted", "progress", "failed"]
        assert events[-1].failed.error.code == "UNAVAILABLE"
        assert "replica running the job stopped" in events[-1].failed.error.message
        assert await owner.store.renew_leases(["lost"]) == ["lost"]  # ended elsewhere: stop it
        script.hold.set()
        await asyncio.wait_for(script.closed.wait(), 10.0)
        record = await survivor.store.get("lost")
        assert (record.state, record.last_sequence) == (JobState.FAILED, 3)
    finally:
        await survivor.stop()
        await owner.stop()


async def test_the_gateway_flags_choose_the_store_and_refuse_bad_ones(tmp_path: Path, redis_server, capsys) -> None:
    from gateway.__main__ import _job_store, parse_args

    base = ["--dit", "127.0.0.1:1", "--job-dir", str(tmp_path / "jobs")]
    with pytest.raises(SystemExit):
        parse_args([*base, "--job-store", "postgres://user:secret@db/jobs"])
    message = capsys.readouterr().err
    assert "--job-store must be sqlite or a redis:// or rediss:// URL" in message and "secret" not in message
    with pytest.raises(SystemExit, match="does not answer") as refused:
        await _job_store(parse_args([*base, "--job-store", "redis://:secret@127.0.0.1:1/0"]))
    assert "secret" not in str(refused.value)

    store = await _job_store(parse_args([*base, "--job-store", redis_server.url, "--replica-id", "r1"]))
    try:
        assert isinstance(store, RedisJobStore) and store.replica_id == "r1"
        assert store.files_dir == tmp_path / "jobs" / "files"  # the default beside --job-dir
    finally:
        await store.close()
    store = await _job_store(parse_args(base))
    assert isinstance(store, SqliteJobStore)
    await store.close()
