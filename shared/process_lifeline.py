"""Tie the life of child process trees to their parent's (Linux; no-ops elsewhere).

A parent that runs services as child processes, each the leader of its own process group
(``start_new_session=True``) because the services fork helpers of their own (vLLM engine
processes), must not leave them behind, whichever way it ends:

* :func:`parent_death_preexec` — a ``preexec_fn`` for :class:`subprocess.Popen` that asks the
  kernel to send the child SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), SIGKILL included.
  The signal fires when the *thread* that forked the child exits, so fork from the main thread
  (:func:`parent_death_preexec` returns ``None`` elsewhere); it is kept across ``exec`` but not
  inherited by the child's own children.
* :class:`Lifeline` — a small watchdog process (``python -m shared.process_lifeline``) that is told
  every process group through a pipe. When the pipe closes — the parent exited or was killed — it
  waits a grace period for the groups to empty (the services drain on SIGTERM and stop their
  engines), then SIGKILLs whatever is left of them: a service stuck in its shutdown and the
  grandchildren the kernel's parent-death signal does not reach.
* :func:`terminate_groups` — SIGTERM the leaders, wait, SIGKILL the whole groups: a clean stop.

This module imports nothing outside the standard library (the watchdog starts in milliseconds).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

PR_SET_PDEATHSIG = 1
POLL_S = 0.1
KILL_WAIT_S = 5.0  # after SIGKILL: how long to wait for the kernel to take the processes away


def _load_prctl() -> Optional[Callable[..., int]]:
    """libc's prctl, resolved in the parent (a child between fork and exec must not dlopen)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # the process's own libc
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def parent_death_supported() -> bool:
    """Whether :func:`parent_death_preexec` can arm the parent-death signal here (the main thread
    of a Linux process)."""
    return _PRCTL is not None and threading.current_thread() is threading.main_thread()


def parent_death_preexec(sig: int = signal.SIGTERM) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies, or ``None``
    where that is not available (not Linux, or not called from the main thread: the signal would
    fire when the calling thread exits, not the process).

    The function runs in the child between fork and exec: it arms the signal, then compares
    ``os.getppid()`` with this process's pid, which closes the race where the parent died before
    the signal was armed (the child then ends at once, before it execs)."""
    if not parent_death_supported():
        return None
    prctl = _PRCTL
    parent = os.getpid()

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(126)  # no safety net: do not start an orphan-to-be
        if os.getppid() != parent:
            os._exit(128 + int(sig))

    return arm


@dataclass(frozen=True)
class Group:
    """A process group this process started: its leader's pid (= the pgid) and the leader's start
    time (``/proc/<pid>/stat`` field 22; ``None`` where unknown). The start time tells our leader
    from an unrelated process that got the same pid after ours was reaped; a group's number cannot
    be reused while any member is left, so members found without the leader are our leftovers."""

    pgid: int
    start_time: Optional[int] = None

    @classmethod
    def of(cls, pid: int) -> "Group":
        """The group led by ``pid`` (call it while the leader is alive or not yet reaped)."""
        stat = _stat(pid)
        return cls(pid, stat[2] if stat is not None else None)

    def reused(self) -> bool:
        """Whether the pid now belongs to another process (so the group is no longer ours)."""
        stat = _stat(self.pgid)
        return stat is not None and self.start_time is not None and stat[2] != self.start_time

    def alive(self) -> bool:
        """Whether the group has a member that has not exited (zombies do not count: they hold
        no memory, no port, no device)."""
        return bool(live_groups([self]))

    def signal(self, sig: int) -> None:
        """``sig`` to every member."""
        if self.reused():
            return
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def signal_leader(self, sig: int) -> None:
        if self.reused():
            return
        try:
            os.kill(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(state, process group, start time) of ``pid``, or ``None`` (gone, or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # field 3 (state) onwards
    return fields[0], int(fields[2]), int(fields[19])


def _all_stats() -> Iterator[tuple[str, int, int]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                yield stat


def live_groups(groups: Iterable[Group]) -> list[Group]:
    """The groups with a member that has not exited (zombies do not count: they hold no memory, no
    port, no device); one pass over /proc for all of them."""
    candidates = []
    for group in groups:
        if group.reused():
            continue
        try:
            os.killpg(group.pgid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        candidates.append(group)
    if not candidates or not Path("/proc").is_dir():
        return candidates
    running = {pgrp for state, pgrp, _ in _all_stats() if state not in ("Z", "X")}
    return [group for group in candidates if group.pgid in running]


def wait_groups_gone(groups: Iterable[Group], deadline: float, reap: Callable[[], None] = lambda: None,
                     hurry: Callable[[], bool] = lambda: False) -> list[Group]:
    """Poll until every group is empty, ``deadline`` (monotonic) passes or ``hurry()`` is true; the
    groups still alive. ``reap`` is called each round (the caller reaps its children there, so that
    they do not linger as zombies)."""
    alive = list(groups)
    while True:
        reap()
        alive = live_groups(alive)
        if not alive or time.monotonic() >= deadline or hurry():
            return alive
        time.sleep(POLL_S)


def terminate_groups(groups: Iterable[Group], grace_s: float, send_term: bool = True,
                     reap: Callable[[], None] = lambda: None, hurry: Callable[[], bool] = lambda: False) -> list[Group]:
    """Stop process groups: SIGTERM each leader (the service drains and stops its own children),
    wait up to ``grace_s`` (or until ``hurry()``) for the groups to empty, then SIGKILL every group
    that is not empty and wait for the kernel to remove them. Returns the groups that SIGKILL did
    not empty within a few seconds (normally none)."""
    groups = list(dict.fromkeys(groups))
    if send_term:
        for group in groups:
            group.signal_leader(signal.SIGTERM)
    left = wait_groups_gone(groups, time.monotonic() + grace_s, reap, hurry)
    for group in left:
        group.signal(signal.SIGKILL)
    return wait_groups_gone(left, time.monotonic() + KILL_WAIT_S, reap) if left else []


class Lifeline:
    """The watchdog of a parent's process groups; see the module docstring.

    ``add(group, armed)`` after spawning each group leader; ``armed``: the leader has the
    parent-death signal, so the watchdog need not SIGTERM it itself. ``close()`` once the groups are
    stopped: the watchdog then finds nothing left and exits."""

    def __init__(self, grace_s: float, log_path: Optional[Path] = None) -> None:
        self.grace_s = grace_s
        command = [sys.executable, "-m", "shared.process_lifeline", "--grace-s", str(grace_s)]
        log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
        try:
            # Its own session: no terminal signal reaches it; only the end of the pipe sets it off.
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                                            start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]))
        finally:
            if log is not subprocess.DEVNULL:
                log.close()

    def add(self, group: Group, armed: bool) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.closed:
            return
        start_time = -1 if group.start_time is None else group.start_time
        try:
            stdin.write(f"{group.pgid} {start_time} {int(armed)}\n".encode())
            stdin.flush()
        except OSError:
            pass  # the watchdog is gone; the parent-death signal and the parent's own stop remain

    def close(self, timeout_s: float = 5.0) -> None:
        """End the pipe and reap the watchdog (it exits at once when no group is left)."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def watch(stream: Iterable[bytes], grace_s: float) -> int:
    """The watchdog: read ``pgid start_time armed`` lines until end of file, then stop the groups
    that are left: SIGTERM to the leaders without the parent-death signal, SIGKILL to every group
    still alive after ``grace_s``."""
    groups: dict[Group, bool] = {}
    for line in stream:
        parts = line.split()
        if len(parts) == 3:
            start_time = int(parts[1])
            groups[Group(int(parts[0]), None if start_time < 0 else start_time)] = parts[2] == b"1"
    alive = live_groups(groups)
    if not alive:
        return 0
    print(f"process_lifeline: parent gone; stopping process groups {[g.pgid for g in alive]} "
          f"(grace {grace_s:.1f} s)", file=sys.stderr, flush=True)
    for group in alive:
        if not groups[group]:
            group.signal_leader(signal.SIGTERM)
    left = terminate_groups(alive, grace_s, send_term=False)
    if left:
        print(f"process_lifeline: groups {[g.pgid for g in left]} survive SIGKILL", file=sys.stderr, flush=True)
    return 1 if left else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.process_lifeline",
                                     description="stop the process groups listed on stdin once stdin closes")
    parser.add_argument("--grace-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    return watch(sys.stdin.buffer, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
