"""The embedded job store: SQLite for jobs and event logs, a local folder for audio files.

Zero set-up (``acestep serve`` and ``make demo`` use it) and it survives a gateway restart: finished
jobs stay downloadable, and ``recover`` marks the jobs that were running when the gateway died as
failed. One gateway process owns the folder: the jobs this instance created are its own (live),
any other unfinished job was left by an earlier process. Database calls run on a worker thread, one
at a time; followers are woken in-process. File names are derived from a hash of the request id and the item
index, and files are only ever read back through the rows this store wrote.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any, Optional

from gateway.jobs.store import FailedEvent, JobRecord, JobState, StoredFile, file_name
from shared.errors import InvalidArgument

_FINALS = tuple(state.value for state in JobState if state.is_final)
_NOT_FINAL = f"state NOT IN ({','.join(repr(v) for v in _FINALS)})"
_ORPHAN_REASON = "the gateway restarted while the job was running"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    request_id TEXT PRIMARY KEY, caller TEXT NOT NULL, state TEXT NOT NULL,
    created_s REAL NOT NULL, updated_s REAL NOT NULL, last_sequence INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS jobs_by_caller ON jobs (caller, created_s);
CREATE TABLE IF NOT EXISTS events (
    request_id TEXT NOT NULL, sequence INTEGER NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (request_id, sequence));
CREATE TABLE IF NOT EXISTS files (
    request_id TEXT NOT NULL, item_index INTEGER NOT NULL, audio_format TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, name TEXT NOT NULL, PRIMARY KEY (request_id, item_index));
CREATE TABLE IF NOT EXISTS preferences (
    caller TEXT NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (caller, name));
"""


class SqliteJobStore:
    """``JobStore`` on SQLite + a folder (see the module docstring)."""

    def __init__(self, folder: Path | str, retention_s: float = 24 * 3600.0) -> None:
        self.folder = Path(folder)
        self.retention_s = retention_s
        (self.folder / "files").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.folder / "jobs.sqlite3"), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last commits
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._wakeups: dict[str, asyncio.Event] = {}
        self._own: set[str] = set()  # unfinished jobs this instance created

    def _run(self, sql: str, args: tuple = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    async def _call(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    def _wake(self, request_id: str) -> None:
        event = self._wakeups.pop(request_id, None)
        if event is not None:
            event.set()

    async def create(self, request_id: str, caller: str, now_s: float) -> None:
        is_new = request_id not in self._own
        self._own.add(request_id)  # before the row exists, so recover never takes it for an orphan

        def insert() -> None:
            with self._lock:
                try:
                    self._db.execute("INSERT INTO jobs (request_id, caller, state, created_s, updated_s) "
                                     "VALUES (?, ?, ?, ?, ?)", (request_id, caller, JobState.QUEUED.value, now_s, now_s))
                except sqlite3.IntegrityError:
                    if is_new:
                        self._own.discard(request_id)
                    raise InvalidArgument(f"request_id {request_id!r} is already a job", field="request_id") from None

        await self._call(insert)

    def _append_locked(self, request_id: str, event: bytes) -> int:
        """Inside a transaction, with the lock held: the event's sequence, 0 when the job is final."""
        (sequence, state) = self._db.execute("SELECT last_sequence + 1, state FROM jobs WHERE request_id = ?",
                                             (request_id,)).fetchone()
        if state in _FINALS:
            return 0
        self._db.execute("INSERT INTO events (request_id, sequence, body) VALUES (?, ?, ?)",
                         (request_id, sequence, event))
        self._db.execute("UPDATE jobs SET last_sequence = ? WHERE request_id = ?", (sequence, request_id))
        return int(sequence)

    def _transaction(self, work):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return result

    async def append(self, request_id: str, event: bytes) -> int:
        sequence = await self._call(self._transaction, lambda: self._append_locked(request_id, event))
        self._wake(request_id)
        return sequence

    async def events(self, request_id: str, after: int) -> list[tuple[int, bytes]]:
        rows = await self._call(self._run, "SELECT sequence, body FROM events WHERE request_id = ? AND sequence > ? "
                                "ORDER BY sequence", (request_id, after))
        return [(int(sequence), bytes(body)) for sequence, body in rows]

    async def wait(self, request_id: str, after: int, timeout_s: float) -> None:
        event = self._wakeups.setdefault(request_id, asyncio.Event())
        record = await self.get(request_id)
        if record is None or record.last_sequence > after or record.state.is_final:
            return
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    async def set_state(self, request_id: str, state: JobState, now_s: float, error: str = "") -> None:
        await self._call(self._run, f"UPDATE jobs SET state = ?, updated_s = ?, error = ? WHERE request_id = ? "
                         f"AND {_NOT_FINAL}", (state.value, now_s, error, request_id))
        if state.is_final:
            self._own.discard(request_id)
        self._wake(request_id)

    def _record(self, row: tuple[Any, ...], files: list[tuple[Any, ...]]) -> JobRecord:
        request_id, caller, state, created_s, updated_s, last_sequence, error = row
        return JobRecord(request_id, caller, JobState(state), created_s, updated_s, int(last_sequence), error,
                         tuple(StoredFile(int(i), fmt, int(size)) for i, fmt, size in files))

    def _get(self, request_id: str) -> Optional[JobRecord]:
        rows = self._run("SELECT request_id, caller, state, created_s, updated_s, last_sequence, error FROM jobs "
                         "WHERE request_id = ?", (request_id,))
        if not rows:
            return None
        files = self._run("SELECT item_index, audio_format, size_bytes FROM files WHERE request_id = ? "
                          "ORDER BY item_index", (request_id,))
        return self._record(rows[0], files)

    async def get(self, request_id: str) -> Optional[JobRecord]:
        return await self._call(self._get, request_id)

    async def list(self, caller: str, limit: int) -> list[JobRecord]:
        def select() -> list[JobRecord]:
            ids = self._run("SELECT request_id FROM jobs WHERE caller = ? ORDER BY created_s DESC LIMIT ?",
                            (caller, limit))
            return [record for (request_id,) in ids if (record := self._get(request_id)) is not None]

        return await self._call(select)

    async def save_file(self, request_id: str, item_index: int, audio_format: str, data: bytes) -> None:
        name = file_name(request_id, item_index, audio_format)

        def write() -> None:
            path = self.folder / "files" / name
            partial = path.with_suffix(path.suffix + ".part")
            partial.write_bytes(data)
            partial.replace(path)
            self._run("INSERT OR REPLACE INTO files (request_id, item_index, audio_format, size_bytes, name) "
                      "VALUES (?, ?, ?, ?, ?)", (request_id, item_index, audio_format, len(data), name))

        await self._call(write)

    async def read_file(self, request_id: str, item_index: int) -> Optional[tuple[StoredFile, bytes]]:
        def read() -> Optional[tuple[StoredFile, bytes]]:
            rows = self._run("SELECT audio_format, size_bytes, name FROM files WHERE request_id = ? AND item_index = ?",
                             (request_id, item_index))
            if not rows:
                return None
            audio_format, size, name = rows[0]
            try:
                data = (self.folder / "files" / name).read_bytes()
            except OSError:
                return None
            return StoredFile(item_index, audio_format, int(size)), data

        return await self._call(read)

    async def sweep(self, now_s: float) -> int:
        finals = tuple(state.value for state in JobState if state.is_final)

        def delete() -> int:
            marks = ",".join("?" * len(finals))
            expired = self._run(f"SELECT request_id FROM jobs WHERE state IN ({marks}) AND updated_s < ?",
                                (*finals, now_s - self.retention_s))
            for (request_id,) in expired:
                for (name,) in self._run("SELECT name FROM files WHERE request_id = ?", (request_id,)):
                    (self.folder / "files" / name).unlink(missing_ok=True)
                for table in ("files", "events", "jobs"):
                    self._run(f"DELETE FROM {table} WHERE request_id = ?", (request_id,))
            return len(expired)

        return await self._call(delete)

    async def recover(self, now_s: float, failed_event: Optional[FailedEvent] = None) -> list[str]:
        def fail(request_id: str) -> None:
            if failed_event is not None:
                self._append_locked(request_id, failed_event(request_id, _ORPHAN_REASON))
            self._db.execute("UPDATE jobs SET state = ?, updated_s = ?, error = ? WHERE request_id = ?",
                             (JobState.FAILED.value, now_s, _ORPHAN_REASON, request_id))

        def fail_orphans() -> list[str]:
            rows = self._run(f"SELECT request_id FROM jobs WHERE {_NOT_FINAL}")
            orphans = [request_id for (request_id,) in rows if request_id not in self._own]
            for request_id in orphans:
                self._transaction(lambda: fail(request_id))
            return orphans

        orphans = await self._call(fail_orphans)
        for request_id in orphans:
            self._wake(request_id)
        return orphans

    async def renew_leases(self, request_ids: list[str]) -> list[str]:
        """Nothing to renew: one process owns the store, and cancelling goes through its runner."""
        return []

    async def request_cancel(self, request_id: str) -> bool:
        """Only this process runs jobs here: one its runner does not hold has no live owner."""
        return False

    async def get_preference(self, caller: str, name: str) -> Optional[bytes]:
        rows = await self._call(self._run, "SELECT value FROM preferences WHERE caller = ? AND name = ?",
                                (caller, name))
        return bytes(rows[0][0]) if rows else None

    async def set_preference(self, caller: str, name: str, value: Optional[bytes]) -> None:
        if value is None:
            await self._call(self._run, "DELETE FROM preferences WHERE caller = ? AND name = ?", (caller, name))
        else:
            await self._call(self._run, "INSERT OR REPLACE INTO preferences (caller, name, value) VALUES (?, ?, ?)",
                             (caller, name, bytes(value)))

    async def close(self) -> None:
        with self._lock:
            self._db.close()
