"""``acestep serve`` owns its children: whichever way it ends, no process of the stack survives and
the gateway port is free again.

Real processes, no mocks: ``acestep serve`` runs on tiny checkpoints; once the gateway serves,
every descendant of it (services, their vLLM engine processes, the watchdog) and every process
group they are in is recorded from /proc; then SIGTERM, SIGINT or SIGKILL goes to ``acestep serve``
alone, as docker stop, systemd, Kubernetes or the OOM killer would send it. SIGTERM and SIGINT run
the stack without the LM (seconds); SIGKILL, the hardest case, runs it with the LM on vLLM so that
the engine processes (grandchildren, outside the kernel's parent-death signal) are covered.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from devtools import tiny_checkpoints as tc
from shared.process_lifeline import Group

pytestmark = pytest.mark.slow

STOP_GRACE_S = 10.0  # acestep serve --stop-grace-s: SIGTERM → SIGKILL of the process groups
DRAIN_GRACE_S = 2.0
GONE_WITHIN_S = STOP_GRACE_S + 20.0  # the bound on "no process of the stack survives"
START_TIMEOUT_NO_LM_S = 180.0
START_TIMEOUT_LM_S = 420.0  # vLLM's engine takes ~30 s to start on a free CPU; the machine may be busy
POLL_S = 0.1


@dataclass(frozen=True)
class Proc:
    """One process as /proc shows it; (pid, start_time) names it even after its pid is reused."""

    pid: int
    ppid: int
    pgid: int
    start_time: int
    state: str
    comm: str
    cmdline: str

    def __str__(self) -> str:
        return f"{self.pid} [{self.comm}] pgid {self.pgid}: {self.cmdline[:120]}"


def _read(pid: int) -> Optional[Proc]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    comm = stat[stat.index("(") + 1: stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()  # field 3 (state) onwards
    return Proc(pid, int(fields[1]), int(fields[2]), int(fields[19]), fields[0], comm, cmdline.strip())


def _all_processes() -> list[Proc]:
    found = (_read(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [proc for proc in found if proc is not None]


def descendants(root: int) -> list[Proc]:
    """``root`` and every process below it (by parent pid; /proc/<pid>/task/*/children is not
    available on every kernel)."""
    processes = _all_processes()
    children: dict[int, list[Proc]] = {}
    for proc in processes:
        children.setdefault(proc.ppid, []).append(proc)
    found = [proc for proc in processes if proc.pid == root]
    index = 0
    while index < len(found):
        found.extend(children.get(found[index].pid, []))
        index += 1
    return found


def running(proc: Proc) -> bool:
    """Whether that very process still runs (a zombie has exited: it holds no memory, no port)."""
    now = _read(proc.pid)
    return now is not None and now.start_time == proc.start_time and now.state not in ("Z", "X")


def survivors(recorded: list[Proc]) -> list[Proc]:
    """Recorded processes still running, and any running process in one of their process groups
    (one forked after the snapshot, during the shutdown, must be gone too)."""
    groups = {proc.pgid for proc in recorded}
    left = [proc for proc in recorded if running(proc)]
    known = {proc.pid for proc in left}
    left += [proc for proc in _all_processes()
             if proc.pgid in groups and proc.pid not in known and proc.state not in ("Z", "X")]
    return left


def port_free(port: int) -> bool:
    """Whether a new gateway could bind the port (gRPC sets SO_REUSEADDR too, so connections of the
    old one in TIME_WAIT do not count; a socket still listening does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def acestep_command() -> list[str]:
    script = Path(sys.executable).parent / "acestep"  # the console script of this environment
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


@dataclass
class Served:
    process: subprocess.Popen
    port: int
    workdir: Path
    output: Path

    def diagnostics(self) -> str:
        parts = [f"--- acestep serve output:\n{self.output.read_text(errors='replace')}"]
        for log in sorted(self.workdir.glob("*.log")):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            parts.append(f"--- {log.name} (tail):\n{tail}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    steps = [step for step in tc.WRITER_STEPS if step.folder != tc.BASE_DIR]  # serve uses the turbo DiT
    missing = {folder: note for folder, note in tc.write_all(root, seed=0, steps=steps).items() if note}
    if missing:
        pytest.fail(f"tiny checkpoints incomplete: {missing}")
    return root


@contextlib.contextmanager
def serving(checkpoints: Path, tmp_path: Path, with_lm: bool) -> Iterator[Served]:
    """``acestep serve`` up and serving on a free port; whatever the test leaves of it is killed."""
    port = free_port()
    workdir = tmp_path / "stack"
    output = tmp_path / "serve.out"
    command = [*acestep_command(), "serve", "--checkpoints", str(checkpoints), "--port", str(port),
               "--workdir", str(workdir), "--drain-grace-s", str(DRAIN_GRACE_S),
               "--stop-grace-s", str(STOP_GRACE_S), *([] if with_lm else ["--no-lm"])]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with open(output, "wb") as sink:
        # Its own session: the signals of this test reach it alone, as `kill <pid>` does.
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    served = Served(process, port, workdir, output)
    seen: dict[tuple[int, int], Proc] = {}  # for the clean-up of a failed test
    try:
        timeout_s = START_TIMEOUT_LM_S if with_lm else START_TIMEOUT_NO_LM_S
        deadline = time.monotonic() + timeout_s
        rounds = 0
        while "gateway serving on" not in output.read_text(errors="replace"):
            if process.poll() is not None:
                pytest.fail(f"acestep serve exited with {process.returncode} before serving\n{served.diagnostics()}")
            if time.monotonic() > deadline:
                pytest.fail(f"acestep serve did not serve within {timeout_s:.0f} s\n{served.diagnostics()}")
            if rounds % 10 == 0:
                seen.update(((p.pid, p.start_time), p) for p in descendants(process.pid))
            rounds += 1
            time.sleep(POLL_S)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the gateway listens on the port it was given
        yield served
    finally:
        if process.poll() is None:
            seen.update(((p.pid, p.start_time), p) for p in descendants(process.pid))
            process.kill()
        process.wait()
        for proc in seen.values():  # a failed test leaves nothing behind either
            if proc.pid == proc.pgid:  # a group leader: its start time tells a reused pid
                Group(proc.pgid, proc.start_time).signal(signal.SIGKILL)


def record(served: Served) -> list[Proc]:
    """Every process of the stack, ``acestep serve`` included, checked to be the whole stack."""
    procs = descendants(served.process.pid)
    commands = [proc.cmdline for proc in procs]
    for module in ("-m gateway ", "-m dit_service ", "-m shared.process_lifeline "):
        assert any(module in command for command in commands), f"no {module!r} process in {commands}"
    return procs


def assert_stack_gone(recorded: list[Proc], served: Served, since: float) -> float:
    """Poll until no recorded process (nor member of their groups) runs and the port is free; fail
    after ``GONE_WITHIN_S``. Returns the seconds it took."""
    deadline = since + GONE_WITHIN_S
    while True:
        left = survivors(recorded)
        free = port_free(served.port)
        if not left and free:
            return time.monotonic() - since
        if time.monotonic() > deadline:
            listing = "\n".join(str(proc) for proc in left) or "(none)"
            pytest.fail(f"{GONE_WITHIN_S:.0f} s after the signal: still running:\n{listing}\n"
                        f"gateway port {served.port} free: {free}\n{served.diagnostics()}")
        time.sleep(POLL_S)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_every_service_and_frees_the_port(checkpoints: Path, tmp_path: Path,
                                                               signum: int) -> None:
    with serving(checkpoints, tmp_path, with_lm=False) as served:
        recorded = record(served)
        sent = time.monotonic()
        os.kill(served.process.pid, signum)
        try:
            returncode = served.process.wait(timeout=GONE_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"acestep serve still runs {GONE_WITHIN_S:.0f} s after {signum!r}\n{served.diagnostics()}")
        assert returncode == 0, served.diagnostics()
        took = assert_stack_gone(recorded, served, sent)
        assert f"{signal.Signals(signum).name}: stopping the stack" in served.output.read_text()
        print(f"{signal.Signals(signum).name}: {len(recorded)} processes gone, port free after {took:.1f} s")


@pytest.mark.vllm
def test_sigkill_of_serve_stops_every_service_and_the_lm_engine(checkpoints: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    with serving(checkpoints, tmp_path, with_lm=True) as served:
        recorded = record(served)
        assert any("-m lm_service " in proc.cmdline for proc in recorded), [str(p) for p in recorded]
        lm = next(proc for proc in recorded if "-m lm_service " in proc.cmdline)
        engine = [proc for proc in recorded if proc.ppid == lm.pid]
        assert any(proc.comm.startswith("VLLM") for proc in engine), \
            f"no vLLM engine process under the LM service: {[str(p) for p in engine]}"
        sent = time.monotonic()
        os.kill(served.process.pid, signal.SIGKILL)
        assert served.process.wait(timeout=GONE_WITHIN_S) == -signal.SIGKILL
        took = assert_stack_gone(recorded, served, sent)
        print(f"SIGKILL: {len(recorded)} processes gone, port free after {took:.1f} s")
