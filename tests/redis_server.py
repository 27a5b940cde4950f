"""A real redis-server for the tests: 127.0.0.1 on a free port, a temporary folder, no persistence.

``redis_server`` is a session fixture (one server for the whole run); tests keep apart by using
their own key prefix (``unique_prefix``). The server comes from the Debian package redis-server
(``make install`` installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import redis

REDIS_SERVER = "/usr/bin/redis-server"
START_TIMEOUT_S = 30.0


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log_tail(self) -> str:
        try:
            return "\n".join((self.folder / "redis.log").read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _executable() -> str:
    found = REDIS_SERVER if Path(REDIS_SERVER).exists() else shutil.which("redis-server")
    if found is None:
        pytest.fail("redis-server is not installed (Debian package redis-server; `make install` installs it)")
    return found


def start_redis(folder: Path) -> RedisServer:
    """Start redis-server in ``folder`` and wait until it answers PING (retrying another port if the
    one picked was taken meanwhile)."""
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        port = _free_port()
        command = [_executable(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                   "--save", "", "--appendonly", "no", "--logfile", str(folder / "redis.log")]
        server = RedisServer(subprocess.Popen(command, stdin=subprocess.DEVNULL), port, folder)
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while server.process.poll() is None and time.monotonic() < deadline:
                try:
                    if client.ping():
                        return server
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        server.stop()
    pytest.fail(f"redis-server did not start; log:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


def unique_prefix() -> str:
    """A key prefix no other test uses on the shared server."""
    return f"test-{uuid.uuid4().hex[:12]}:"
