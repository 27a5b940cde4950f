"""Run the whole stack on one machine: LM, DiT and gateway as separate processes.

Used by ``acestep serve``, ``make demo`` and the end-to-end tests. Every server binds
127.0.0.1 on a port the OS picks and publishes it in a port file; the stack stops cleanly
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from shared.grpc_server import read_port_file


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    port_file: Path
    log_path: Path
    port: int = 0
    metrics_port: Optional[int] = None

    def wait_port(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
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
    device: str = "cpu"
    extra_env: dict[str, str] = field(default_factory=dict)
    gateway_args: list[str] = field(default_factory=list)
    drain_grace_s: float = 5.0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="acestep-stack-")))
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def _spawn(self, name: str, module: str, args: list[str]) -> ServiceProcess:
        port_file = self.workdir / f"{name}.port"
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        command = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                   "--port-file", str(port_file), "--drain-grace-s", str(self.drain_grace_s), *args]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        service = ServiceProcess(name, process, port_file, log_path)
        self.services[name] = service
        return service

    def start_backends(self) -> None:
        ckpt = str(self.checkpoints)
        if self.with_lm:
            lm_model = self.lm_model or find_model(self.checkpoints, "acestep-5Hz-lm-", "acestep-5Hz-lm-1.7B")
            for index in range(self.num_lm):
                self._spawn(f"lm{index}", "lm_service",
                            ["--checkpoints", ckpt, "--model", lm_model, "--device", self.device])
        dit_model = self.dit_model or find_model(self.checkpoints, "acestep-v15-", "acestep-v15-turbo")
        for index in range(self.num_dit):
            self._spawn(f"dit{index}", "dit_service",
                        ["--checkpoints", ckpt, "--model", dit_model, "--device", self.device])

    def start_gateway(self, timeout_s: float = 600.0) -> ServiceProcess:
        dits = [s for n, s in self.services.items() if n.startswith("dit")]
        lms = [s for n, s in self.services.items() if n.startswith("lm")]
        args = ["--dit", ",".join(s.address for s in dits)]
        if lms:
            args += ["--lm", ",".join(s.address for s in lms)]
        gateway = self._spawn("gateway", "gateway", [*args, *self.gateway_args])
        gateway.wait_port(timeout_s)
        return gateway

    def start(self, timeout_s: float = 600.0) -> str:
        """Start everything and return the gateway address once it is serving."""
        self.start_backends()
        for service in list(self.services.values()):
            service.wait_port(timeout_s)
        return self.start_gateway(timeout_s).address

    def stop(self, grace_s: float = 10.0) -> None:
        for service in reversed(list(self.services.values())):
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for service in self.services.values():
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(service.process.pid, signal.SIGKILL)
                service.process.wait()

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
