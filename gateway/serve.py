"""Run the whole stack on one machine: LM, DiT and gateway as separate processes.

Used by ``acestep serve``, ``make demo`` and the end-to-end tests. Every server binds
127.0.0.1 on a port the OS picks and publishes it in a port file; the stack stops cleanly
(SIGTERM, then SIGKILL of each service's whole process group after a grace period).

The stack owns its services, however its own process ends (see ``shared.process_lifeline``):
each service leads its own process group (its engine processes are in it too), gets SIGTERM from
the kernel when the process that started it dies (``PR_SET_PDEATHSIG``, armed when spawned from
the main thread), and a watchdog process SIGKILLs what is left of the groups a grace period after
that process is gone, SIGKILL included. :meth:`LocalStack.stop_on_signals` turns SIGTERM and
SIGINT into a clean stop (:class:`StopRequested` out of :meth:`LocalStack.start` and
:meth:`LocalStack.wait_for_exit`); a second signal cuts the grace period short.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from shared.grpc_server import read_port_file
from shared.process_lifeline import KILL_WAIT_S, Group, Lifeline, parent_death_preexec, terminate_groups


class StopRequested(Exception):
    """A stop signal (SIGTERM, SIGINT) arrived while the stack was starting or serving."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    port_file: Path
    log_path: Path
    port: int = 0
    metrics_port: Optional[int] = None
    group: Optional[Group] = None  # its process group (it is the leader)

    def wait_port(self, timeout_s: float, check: Callable[[], None] = lambda: None) -> int:
        """Wait for the port file; ``check()`` each round may raise to stop waiting."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            check()
            if self.port_file.exists():
                self.port, self.metrics_port = read_port_file(self.port_file)
                return self.port
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; log:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not start within {timeout_s:.0f} s; log:\n{self.log_tail()}")

    def log_tail(self, num_lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return "(no log)"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def scrape_metrics(self) -> str:
        """The service's Prometheus text exposition (needs a metrics port)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()


def find_model(checkpoints: Path, prefix: str, preferred: str) -> str:
    """The preferred model folder if present, else the first folder with the prefix."""
    if (checkpoints / preferred).is_dir():
        return preferred
    found = sorted(p.name for p in checkpoints.glob(f"{prefix}*") if p.is_dir())
    if not found:
        raise FileNotFoundError(f"no {prefix}* folder under {checkpoints}")
    return found[0]


@dataclass
class LocalStack:
    """LM + DiT(s) + gateway processes on 127.0.0.1."""

    checkpoints: Path
    lm_model: Optional[str] = None
    dit_model: Optional[str] = None
    num_dit: int = 1
    num_lm: int = 1
    with_lm: bool = True
    with_http: bool = False  # also the HTTP edge (``acestep-http``) in front of the gateway
    http_args: list[str] = field(default_factory=list)
    device: str = "cpu"
    extra_env: dict[str, str] = field(default_factory=dict)
    gateway_args: list[str] = field(default_factory=list)
    drain_grace_s: float = 5.0
    stop_grace_s: float = 10.0  # SIGTERM → SIGKILL of the process groups (in stop() and the watchdog)
    lifeline: bool = True  # a watchdog process stops the services if this process dies without stop()
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="acestep-stack-")))
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    stop_signals: list[int] = field(default_factory=list, init=False)  # caught by stop_on_signals()
    _watchdog: Optional[Lifeline] = field(default=None, init=False, repr=False)

    def _spawn(self, name: str, module: str, args: list[str]) -> ServiceProcess:
        self.check_stop()
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)  # a stale one from an earlier run in this folder
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        command = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                   "--port-file", str(port_file), "--drain-grace-s", str(self.drain_grace_s), *args]
        if self.lifeline and self._watchdog is None:
            self._watchdog = Lifeline(self.stop_grace_s, self.workdir / "lifeline.log")
        # The service leads its own process group (its engine processes join it) and gets SIGTERM
        # when this process dies; this must run on the main thread (see parent_death_preexec).
        preexec = parent_death_preexec(signal.SIGTERM)
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True, preexec_fn=preexec)
        service = ServiceProcess(name, process, port_file, log_path, group=Group.of(process.pid))
        self.services[name] = service
        if self._watchdog is not None:
            self._watchdog.add(service.group, armed=preexec is not None)
        return service

    def check_stop(self) -> None:
        """Raise :class:`StopRequested` once a stop signal has arrived."""
        if self.stop_signals:
            raise StopRequested(self.stop_signals[0])

    @contextlib.contextmanager
    def stop_on_signals(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
        """While inside: each of ``signals`` is recorded in ``stop_signals`` instead of ending the
        process, so that :meth:`start` and :meth:`wait_for_exit` raise :class:`StopRequested` and the
        caller stops the stack; one more during :meth:`stop` cuts its grace period short. The
        handlers are installed even where a signal was ignored (a background job's SIGINT): a stop
        must stop the services. Only the main thread can install them; elsewhere this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, lambda signum, frame: self.stop_signals.append(signum))
                    for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def wait_for_exit(self, poll_s: float = 0.2) -> ServiceProcess:
        """Block until a service exits (returned) or a stop signal arrives (:class:`StopRequested`)."""
        while True:
            self.check_stop()
            for service in self.services.values():
                if service.process.poll() is not None:
                    return service
            time.sleep(poll_s)

    def start_backends(self) -> None:
        ckpt = str(self.checkpoints)
        if self.with_lm:
            lm_model = self.lm_model = self.lm_model or find_model(self.checkpoints, "acestep-5Hz-lm-",
                                                                   "acestep-5Hz-lm-1.7B")
            for index in range(self.num_lm):
                self._spawn(f"lm{index}", "lm_service",
                            ["--checkpoints", ckpt, "--model", lm_model, "--device", self.device])
        dit_model = self.dit_model = self.dit_model or find_model(self.checkpoints, "acestep-v15-", "acestep-v15-turbo")
        for index in range(self.num_dit):
            self._spawn(f"dit{index}", "dit_service",
                        ["--checkpoints", ckpt, "--model", dit_model, "--device", self.device])

    def start_gateway(self, timeout_s: float = 600.0) -> ServiceProcess:
        dits = [s for n, s in self.services.items() if n.startswith("dit")]
        lms = [s for n, s in self.services.items() if n.startswith("lm")]
        args = ["--dit", ",".join(s.address for s in dits), "--job-dir", str(self.workdir / "jobs")]
        if lms:
            args += ["--lm", ",".join(s.address for s in lms)]
        gateway = self._spawn("gateway", "gateway", [*args, *self.gateway_args])
        gateway.wait_port(timeout_s, self.check_stop)
        return gateway

    def start_http(self, timeout_s: float = 120.0) -> ServiceProcess:
        """The HTTP edge in front of the gateway (its address: ``http_url``)."""
        names = ["--dit-model", self.dit_model or ""]
        if self.with_lm and self.lm_model:
            names += ["--lm-model", self.lm_model]
        edge = self._spawn("http", "http_service",
                           ["--gateway", self.services["gateway"].address, *names, *self.http_args])
        edge.wait_port(timeout_s, self.check_stop)
        return edge

    @property
    def http_url(self) -> str:
        return f"http://{self.services['http'].address}"

    def start(self, timeout_s: float = 600.0) -> str:
        """Start everything and return the gateway address once it is serving."""
        self.start_backends()
        for service in list(self.services.values()):
            service.wait_port(timeout_s, self.check_stop)
        address = self.start_gateway(timeout_s).address
        if self.with_http:
            self.start_http(timeout_s)
        return address

    def stop(self, grace_s: Optional[float] = None) -> None:
        """SIGTERM every service (they drain), wait up to ``grace_s`` (default ``stop_grace_s``) for
        their process groups to empty, SIGKILL the groups that are not, reap; then release the
        watchdog. A stop signal arriving meanwhile (see :meth:`stop_on_signals`) skips the rest of
        the grace period."""
        grace = self.stop_grace_s if grace_s is None else grace_s
        services = list(reversed(self.services.values()))  # the gateway first
        for service in services:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        signals_before = len(self.stop_signals)
        groups = [service.group or Group(service.process.pid) for service in services]
        terminate_groups(groups, grace, send_term=False, reap=self._reap,
                         hurry=lambda: len(self.stop_signals) > signals_before)
        for service in services:
            try:
                service.process.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None

    def _reap(self) -> None:
        for service in self.services.values():
            service.process.poll()

    def _memory_mib(self, field_name: str) -> dict[str, float]:
        values = {}
        for name, service in self.services.items():
            try:
                status = Path(f"/proc/{service.process.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith(field_name + ":"):
                    values[name] = int(line.split()[1]) / 1024
        return values

    def peak_rss_mib(self) -> dict[str, float]:
        """Peak resident memory of each live service process (Linux /proc VmHWM)."""
        return self._memory_mib("VmHWM")

    def current_rss_mib(self) -> dict[str, float]:
        return self._memory_mib("VmRSS")

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
