"""The shared job store: Redis for jobs and event logs, a folder every gateway replica mounts
(a ReadWriteMany volume) for audio files.

Keys, under a configurable prefix (one standalone Redis or a Sentinel-managed primary; the scripts
touch several keys, so Redis Cluster is not supported):

* ``job:<id>`` hash: caller, state, times, ``last_sequence``, error, and a state ``version``.
* ``events:<id>`` stream: the event log. Entry ids are ``<sequence>-0``, so ``events(after)`` is an
  exclusive range read and a follower blocks with ``XREAD`` from ``<after>-0``.
* ``changes:<id>`` stream: one entry ``<version>-0`` per state change, so ``wait`` also wakes when a
  job ends without a new event.
* ``files:<id>`` hash: item index -> format and size. File names are derived from the request id
  (``store.file_name``); nothing read from Redis becomes a path.
* ``lease:<id>`` (owner replica, with a TTL) and ``cancel:<id>`` (a cancellation request).
* ``caller:<caller>`` sorted set by creation time (``list``), ``unfinished`` set (``recover``),
  ``finished`` sorted set by end time (``sweep``).
* ``prefs:<caller>`` hash: the caller's preferences (name -> value), never swept.

Every change that must be atomic (create, append, set a state, fail an orphan, renew leases, sweep)
is one Lua script.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Optional

import redis.asyncio as aioredis

from gateway.jobs.store import FailedEvent, JobRecord, JobState, StoredFile, file_name
from shared.errors import InvalidArgument

DEFAULT_PREFIX = "acestep:jobs:"
DEFAULT_LEASE_S = 10.0
ORPHAN_REASON = "the gateway replica running the job stopped"

_FINAL_TABLE = "local FINAL = {" + ", ".join(f"{s.value} = true" for s in JobState if s.is_final) + "}\n"

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'caller', ARGV[2], 'state', ARGV[6], 'created_s', ARGV[3], 'updated_s', ARGV[3],
           'last_sequence', 0, 'error', '', 'version', 0)
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return 1
"""

# KEYS: job, events. ARGV: body. Returns the sequence, 0 for a final job, -1 for a missing one.
_APPEND_BODY = """
local function append(job, events, body)
  local state = redis.call('HGET', job, 'state')
  if not state then return -1 end
  if FINAL[state] then return 0 end
  local sequence = redis.call('HINCRBY', job, 'last_sequence', 1)
  redis.call('XADD', events, sequence .. '-0', 'e', body)
  return sequence
end
"""

# KEYS: job, changes, unfinished, finished, lease, cancel. ARGV: id, state, now, error.
_SET_STATE_BODY = """
local function set_state(id, state, now, err)
  local current = redis.call('HGET', KEYS[1], 'state')
  if (not current) or FINAL[current] then return 0 end
  redis.call('HSET', KEYS[1], 'state', state, 'updated_s', now, 'error', err)
  local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('XADD', KEYS[2], 'MAXLEN', '1', version .. '-0', 's', state)
  if FINAL[state] then
    redis.call('SREM', KEYS[3], id)
    redis.call('ZADD', KEYS[4], now, id)
    redis.call('DEL', KEYS[5], KEYS[6])
  end
  return 1
end
"""

_SET_STATE = _FINAL_TABLE + _SET_STATE_BODY + "return set_state(ARGV[1], ARGV[2], ARGV[3], ARGV[4])"
_APPEND = _FINAL_TABLE + _APPEND_BODY + "return append(KEYS[1], KEYS[2], ARGV[1])"

# KEYS: job, changes, unfinished, finished, lease, cancel, events.
# ARGV: id, state (failed), now, reason, has_event, event.
_FAIL_ORPHAN = _FINAL_TABLE + _APPEND_BODY + _SET_STATE_BODY + """
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
local current = redis.call('HGET', KEYS[1], 'state')
if (not current) or FINAL[current] then
  redis.call('SREM', KEYS[3], ARGV[1])
  return 0
end
if ARGV[5] == '1' then append(KEYS[1], KEYS[7], ARGV[6]) end
return set_state(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
"""

# KEYS: job, lease, cancel per job. ARGV: replica, lease_ms. Returns the 0-based indexes to stop.
_RENEW = _FINAL_TABLE + """
local stop = {}
for i = 0, #KEYS / 3 - 1 do
  local job, lease, cancel = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local state = redis.call('HGET', job, 'state')
  local owner = redis.call('GET', lease)
  if (not state) or FINAL[state] or redis.call('EXISTS', cancel) == 1 or (owner and owner ~= ARGV[1]) then
    table.insert(stop, i)
  else
    redis.call('SET', lease, ARGV[1], 'PX', ARGV[2])
  end
end
return stop
"""

# KEYS: job, lease, cancel. Returns -1 (no such job or final), else whether a live owner holds it.
_REQUEST_CANCEL = _FINAL_TABLE + """
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or FINAL[state] then return -1 end
redis.call('SET', KEYS[3], '1')
return redis.call('EXISTS', KEYS[2])
"""

# KEYS: finished, caller, then every key of the job. ARGV: id. Returns 1 for the one sweeper that wins.
_SWEEP = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisJobStore:
    """``JobStore`` on Redis + a shared folder (see the module docstring). ``replica_id`` names this
    gateway process as the owner of the jobs it creates; its leases last ``lease_s``."""

    def __init__(self, url: str, files_dir: Path | str, retention_s: float = 24 * 3600.0,
                 replica_id: str = "", lease_s: float = DEFAULT_LEASE_S, prefix: str = DEFAULT_PREFIX) -> None:
        self.files_dir = Path(files_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.retention_s = retention_s
        self.replica_id = replica_id or default_replica_id()
        self.lease_ms = max(1, int(lease_s * 1000))
        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(url)
        self._scripts = {name: self._redis.register_script(text) for name, text in (
            ("create", _CREATE), ("append", _APPEND), ("set_state", _SET_STATE), ("fail_orphan", _FAIL_ORPHAN),
            ("renew", _RENEW), ("request_cancel", _REQUEST_CANCEL), ("sweep", _SWEEP))}

    async def check(self) -> None:
        """Raise ``ConnectionError`` (or redis' own error) when Redis does not answer."""
        await self._redis.ping()

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}{kind}:{name}" if name else f"{self.prefix}{kind}"

    def _state_keys(self, request_id: str) -> list[str]:
        """The keys ``set_state`` takes, in its order."""
        return [self._key("job", request_id), self._key("changes", request_id), self._key("unfinished"),
                self._key("finished"), self._key("lease", request_id), self._key("cancel", request_id)]

    async def create(self, request_id: str, caller: str, now_s: float) -> None:
        keys = [self._key("job", request_id), self._key("lease", request_id), self._key("caller", caller),
                self._key("unfinished")]
        args = [request_id, caller, repr(float(now_s)), self.replica_id, self.lease_ms, JobState.QUEUED.value]
        if not await self._scripts["create"](keys, args):
            raise InvalidArgument(f"request_id {request_id!r} is already a job", field="request_id")

    async def append(self, request_id: str, event: bytes) -> int:
        sequence = int(await self._scripts["append"]([self._key("job", request_id), self._key("events", request_id)],
                                                     [event]))
        if sequence < 0:
            raise LookupError(f"no job {request_id!r} to append to")
        return sequence

    async def events(self, request_id: str, after: int) -> list[tuple[int, bytes]]:
        entries = await self._redis.xrange(self._key("events", request_id), f"{int(after) + 1}-0", "+")
        return [(int(entry_id.split(b"-")[0]), fields[b"e"]) for entry_id, fields in entries]

    async def wait(self, request_id: str, after: int, timeout_s: float) -> None:
        state, last_sequence, version = await self._redis.hmget(
            self._key("job", request_id), ["state", "last_sequence", "version"])
        if state is None or int(last_sequence) > after or JobState(state.decode()).is_final:
            return
        # Blocks until the log grows past ``after`` or the state changes after ``version``, on any replica.
        streams = {self._key("events", request_id): f"{int(after)}-0",
                   self._key("changes", request_id): f"{int(version)}-0"}
        await self._redis.xread(streams, count=1, block=max(1, int(timeout_s * 1000)))

    async def set_state(self, request_id: str, state: JobState, now_s: float, error: str = "") -> None:
        await self._scripts["set_state"](self._state_keys(request_id),
                                         [request_id, state.value, repr(float(now_s)), error])

    async def _records(self, request_ids: list[str]) -> list[Optional[JobRecord]]:
        async with self._redis.pipeline(transaction=True) as pipe:
            for request_id in request_ids:
                pipe.hgetall(self._key("job", request_id))
                pipe.hgetall(self._key("files", request_id))
            replies = await pipe.execute()
        return [_record(request_id, replies[2 * i], replies[2 * i + 1]) for i, request_id in enumerate(request_ids)]

    async def get(self, request_id: str) -> Optional[JobRecord]:
        return (await self._records([request_id]))[0]

    async def list(self, caller: str, limit: int) -> list[JobRecord]:
        ids = [raw.decode() for raw in await self._redis.zrevrange(self._key("caller", caller), 0, limit - 1)]
        return [record for record in await self._records(ids) if record is not None]

    async def save_file(self, request_id: str, item_index: int, audio_format: str, data: bytes) -> None:
        path = self.files_dir / file_name(request_id, item_index, audio_format)

        def write() -> None:
            partial = path.with_name(f"{path.name}.{self.replica_id}.part".replace("/", "_"))
            partial.write_bytes(data)
            partial.replace(path)

        await asyncio.to_thread(write)
        entry = json.dumps({"format": audio_format, "size": len(data)})
        await self._redis.hset(self._key("files", request_id), str(int(item_index)), entry)

    async def read_file(self, request_id: str, item_index: int) -> Optional[tuple[StoredFile, bytes]]:
        raw = await self._redis.hget(self._key("files", request_id), str(int(item_index)))
        if raw is None:
            return None
        stored = _stored_file(str(item_index), raw)
        path = self.files_dir / file_name(request_id, stored.item_index, stored.audio_format)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError:
            return None
        return stored, data

    async def sweep(self, now_s: float) -> int:
        cutoff = f"({float(now_s) - self.retention_s!r}"
        removed = 0
        for raw in await self._redis.zrangebyscore(self._key("finished"), "-inf", cutoff):
            request_id = raw.decode()
            caller, files = await self._job_caller_and_files(request_id)
            for stored in files:  # first the files: a sweep that dies half-way leaves no orphan file
                path = self.files_dir / file_name(request_id, stored.item_index, stored.audio_format)
                await asyncio.to_thread(path.unlink, True)
            keys = [self._key("finished"), self._key("caller", caller),
                    *(self._key(kind, request_id) for kind in ("job", "events", "changes", "files", "lease", "cancel"))]
            removed += int(await self._scripts["sweep"](keys, [request_id]))
        return removed

    async def _job_caller_and_files(self, request_id: str) -> tuple[str, list[StoredFile]]:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(self._key("job", request_id), "caller")
            pipe.hgetall(self._key("files", request_id))
            caller, files = await pipe.execute()
        return (caller or b"").decode(), [_stored_file(k.decode(), v) for k, v in files.items()]

    async def recover(self, now_s: float, failed_event: Optional[FailedEvent] = None) -> list[str]:
        candidates = sorted(raw.decode() for raw in await self._redis.smembers(self._key("unfinished")))
        if not candidates:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id in candidates:
                pipe.exists(self._key("lease", request_id))
            leased = await pipe.execute()
        failed = []
        for request_id, has_lease in zip(candidates, leased):
            if has_lease:
                continue
            event = failed_event(request_id, ORPHAN_REASON) if failed_event is not None else b""
            keys = [*self._state_keys(request_id), self._key("events", request_id)]
            args = [request_id, JobState.FAILED.value, repr(float(now_s)), ORPHAN_REASON,
                    "1" if failed_event is not None else "0", event]
            if await self._scripts["fail_orphan"](keys, args):
                failed.append(request_id)
        return failed

    async def renew_leases(self, request_ids: list[str]) -> list[str]:
        if not request_ids:
            return []
        keys = [self._key(kind, request_id) for request_id in request_ids for kind in ("job", "lease", "cancel")]
        stop = await self._scripts["renew"](keys, [self.replica_id, self.lease_ms])
        return [request_ids[int(index)] for index in stop]

    async def request_cancel(self, request_id: str) -> bool:
        keys = [self._key("job", request_id), self._key("lease", request_id), self._key("cancel", request_id)]
        return int(await self._scripts["request_cancel"](keys)) == 1

    async def get_preference(self, caller: str, name: str) -> Optional[bytes]:
        return await self._redis.hget(self._key("prefs", caller), name)

    async def set_preference(self, caller: str, name: str, value: Optional[bytes]) -> None:
        if value is None:
            await self._redis.hdel(self._key("prefs", caller), name)
        else:
            await self._redis.hset(self._key("prefs", caller), name, bytes(value))

    async def close(self) -> None:
        await self._redis.aclose()


def _stored_file(item_index: str, raw: bytes) -> StoredFile:
    entry = json.loads(raw)
    return StoredFile(int(item_index), str(entry["format"]), int(entry["size"]))


def _record(request_id: str, job: dict[bytes, bytes], files: dict[bytes, bytes]) -> Optional[JobRecord]:
    if not job:
        return None
    stored = sorted((_stored_file(k.decode(), v) for k, v in files.items()), key=lambda f: f.item_index)
    return JobRecord(request_id, job[b"caller"].decode(), JobState(job[b"state"].decode()),
                     float(job[b"created_s"]), float(job[b"updated_s"]), int(job[b"last_sequence"]),
                     job[b"error"].decode(), tuple(stored))
