"""Fixtures of the reliability tests: real processes on 127.0.0.1 with tiny random-weight checkpoints.

One shared stack (2 LM + 2 DiT replicas behind a gateway with low admission limits) serves the
load, fuzz and auth tests. A test that kills or drains processes declares the replicas it
sacrifices with ``@pytest.mark.spares(lm=N, dit=M, fault=...)``: those spares start beside the shared
stack (their start-up overlaps its own; slow-starting LMs are worth it, DiTs may also start on
demand) and the test puts its own gateway in front of its spares plus shared survivors. Shared
replicas are never killed or drained, so test order does not matter.

A spare may start with a test fault (``shared.faults``, ``ACESTEP_TEST_FAULT``) that holds each of
its streaming calls at its first output until the process dies, so that a test that kills it finds
it mid-call whatever the load of the machine. Shared replicas and gateways never have one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway import sdk
from gateway.serve import LocalStack, ServiceProcess
from devtools import tiny_checkpoints as tc
from devtools.tiny_checkpoints import TINY_LM_ENV
from shared import faults
from shared.grpc_server import ERROR_DETAIL_KEY
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc
from shared.types import GenerationConfig, GenerationParams

SONG_S = 10.0
CALL_TIMEOUT_S = 120.0            # deadline of every Generate call the tests make
# Drain grace of the test's own gateways and spares: longer than any call's deadline, so a call in
# flight at SIGTERM ends on its own (done or past its deadline) however slow the machine is.
DRAIN_GRACE_S = CALL_TIMEOUT_S + 30.0
STARTUP_TIMEOUT_S = 600.0
MAX_ACTIVE, MAX_QUEUED = 3, 3     # shared gateway admission: low, so that load gets refused
MAX_AUDIO_BYTES = 4 * 1024 * 1024
HEALTH_INTERVAL_S = 0.5
OUTPUT_KINDS = ("audio", "file", "item_finished")
# Small KV caches (the tiny LM needs a few MiB) keep five-plus model processes within memory;
# an API key set in the caller's environment must not switch auth on for the shared gateway.
STACK_ENV = {**TINY_LM_ENV, "ACESTEP_LM_KV_CACHE_GIB": "0.25", "ACESTEP_API_KEYS": "", "TOKENIZERS_PARALLELISM": "false",
             "ACESTEP_TEST_FAULT": ""}
SHARED_GATEWAY_ARGS = ["--max-active", str(MAX_ACTIVE), "--max-queued", str(MAX_QUEUED),
                       "--max-audio-bytes", str(MAX_AUDIO_BYTES), "--health-interval-s", str(HEALTH_INTERVAL_S)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "spares(lm=0, dit=0, fault=''): replicas the test kills or drains, "
                                       "started beside the shared stack with that test fault (others start "
                                       "on demand)")


def _spare_counts(items: Sequence[pytest.Item]) -> dict[str, tuple[int, int]]:
    """(LM count, DiT count) of the spares to pre-start, by test fault ("" for none)."""
    counts: dict[str, tuple[int, int]] = {}
    for item in items:
        for mark in item.iter_markers("spares"):
            fault = mark.kwargs.get("fault", "")
            num_lm, num_dit = counts.get(fault, (0, 0))
            counts[fault] = (num_lm + mark.kwargs.get("lm", 0), num_dit + mark.kwargs.get("dit", 0))
    return counts


def _spare_env(fault: str) -> dict[str, str]:
    if fault and fault not in faults.TEST_FAULTS:
        raise ValueError(f"unknown test fault {fault!r}; one of {faults.TEST_FAULTS}")
    return {**STACK_ENV, "ACESTEP_TEST_FAULT": fault}


@dataclass
class Fleet:
    """The shared stack plus spare replicas: pre-started ones (by test fault) and any started on demand."""

    checkpoints: Path
    shared: LocalStack
    spares: dict[str, LocalStack]
    workdir: Path
    _taken: set[tuple[str, str]] = field(default_factory=set)
    _on_demand: list[LocalStack] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.shared.services["gateway"].address

    def service(self, name: str) -> ServiceProcess:
        """A shared service: "lm0", "lm1", "dit0", "dit1" or "gateway"."""
        return self.shared.services[name]

    def take_spare(self, kind: str, fault: str = "") -> ServiceProcess:
        """A replica of ``kind`` ("lm" or "dit") with test fault ``fault`` ("" for none) that no test
        used before, once it serves: a pre-started one if any is left, else one started now."""
        candidates = self.spares[fault].services.items() if fault in self.spares else ()
        for name, service in candidates:
            if name.startswith(kind) and (fault, name) not in self._taken:
                self._taken.add((fault, name))
                service.wait_port(STARTUP_TIMEOUT_S)
                return service
        workdir = self.workdir / f"spare{len(self._on_demand)}"
        workdir.mkdir()
        stack = LocalStack(self.checkpoints, num_dit=int(kind == "dit"), num_lm=int(kind == "lm"),
                           extra_env=_spare_env(fault), drain_grace_s=DRAIN_GRACE_S, workdir=workdir)
        self._on_demand.append(stack)
        stack.start_backends()
        service = next(iter(stack.services.values()))
        service.wait_port(STARTUP_TIMEOUT_S)
        return service

    def stop(self) -> None:
        for stack in [self.shared, *self.spares.values(), *self._on_demand]:
            stack.stop()


def _write_checkpoints(root: Path) -> Path:
    steps = [step for step in tc.WRITER_STEPS if step.folder != tc.BASE_DIR]
    notes = tc.write_all(root, seed=0, steps=steps)
    missing = {folder: note for folder, note in notes.items() if note}
    if missing:
        pytest.fail(f"tiny checkpoints incomplete: {missing}")
    return root


@pytest.fixture(scope="session")
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    checkpoints = _write_checkpoints(tmp_path_factory.mktemp("tiny-checkpoints"))
    shared = LocalStack(checkpoints, num_dit=2, num_lm=2, extra_env=STACK_ENV, gateway_args=SHARED_GATEWAY_ARGS,
                        drain_grace_s=5.0, workdir=tmp_path_factory.mktemp("shared-stack"))
    spares = {fault: LocalStack(checkpoints, num_dit=num_dit, num_lm=num_lm, extra_env=_spare_env(fault),
                                drain_grace_s=DRAIN_GRACE_S, workdir=tmp_path_factory.mktemp("spares"))
              for fault, (num_lm, num_dit) in _spare_counts(request.session.items).items() if num_lm or num_dit}
    fleet = Fleet(checkpoints, shared, spares, tmp_path_factory.mktemp("more"))
    try:
        shared.start_backends()
        for stack in spares.values():
            stack.start_backends()
        for service in list(shared.services.values()):
            service.wait_port(STARTUP_TIMEOUT_S)
        shared.start_gateway(STARTUP_TIMEOUT_S)
        yield fleet
    finally:
        fleet.stop()


def stop_process(service: ServiceProcess, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL of the whole process group after ``grace_s``."""
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGTERM)
    try:
        service.process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait()


def kill_hard(service: ServiceProcess) -> None:
    """``kill -9`` of the service's whole process group, as a pod kill does (vLLM's engine processes too)."""
    os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait(timeout=30)


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are still running (zombies excluded)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.fixture
def spares(fleet: Fleet) -> Iterator[Callable[..., ServiceProcess]]:
    """``spares("lm" | "dit", fault="")``: take a spare replica (with that test fault, see
    ``shared.faults``); whatever is left of it is stopped afterwards."""
    taken: list[ServiceProcess] = []

    def take(kind: str, fault: str = "") -> ServiceProcess:
        taken.append(fleet.take_spare(kind, fault))
        return taken[-1]

    yield take
    for service in taken:
        stop_process(service)


@pytest.fixture
def gateways(fleet: Fleet) -> Iterator[Callable[..., ServiceProcess]]:
    """``gateways(name, dit=[...], lm=[...], env=..., args=...)``: a gateway process of this test."""
    started: list[ServiceProcess] = []

    def start(name: str, dit: Sequence[ServiceProcess], lm: Sequence[ServiceProcess] = (), *,
              env: Optional[dict[str, str]] = None, args: Sequence[str] = ()) -> ServiceProcess:
        service = spawn_gateway(fleet.workdir, name, dit, lm, env or {}, args)
        started.append(service)
        service.wait_port(STARTUP_TIMEOUT_S)
        return service

    yield start
    for service in started:
        stop_process(service)


def spawn_gateway(workdir: Path, name: str, dit: Sequence[ServiceProcess], lm: Sequence[ServiceProcess],
                  env: dict[str, str], args: Sequence[str]) -> ServiceProcess:
    """Start ``python -m gateway`` on 127.0.0.1 in front of the given replicas (does not wait)."""
    port_file, log_path = workdir / f"{name}.port", workdir / f"{name}.log"
    command = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
               "--port-file", str(port_file), "--health-interval-s", str(HEALTH_INTERVAL_S),
               "--drain-grace-s", str(DRAIN_GRACE_S), "--dit", ",".join(s.address for s in dit)]
    if lm:
        command += ["--lm", ",".join(s.address for s in lm)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **STACK_ENV, **env}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([*command, *args], stdout=log_file, stderr=subprocess.STDOUT, env=full_env,
                                   start_new_session=True)
    return ServiceProcess(name, process, port_file, log_path)


def metric(service: ServiceProcess, name: str, **labels: str) -> float:
    """Sum of the service's samples called ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(service.scrape_metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def in_flight(service: ServiceProcess, method: str) -> float:
    return metric(service, "acestep_rpc_in_flight", method=method)


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll ``predicate`` (run off the event loop: it may scrape metrics) until true or fail."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval_s)


def song_request(*, thinking: bool, batch_size: int = 1, seed: int = 0, stream_pcm: bool = False,
                 duration_s: float = SONG_S) -> gw.GenerateRequest:
    """A text2music request; thinking on runs the LM (metadata and codes), off skips it entirely."""
    params = GenerationParams(caption=f"reliability song {seed}", lyrics="[Verse]\nla la la", duration=duration_s,
                              thinking=thinking, use_cot_metas=thinking, use_cot_caption=thinking,
                              use_cot_language=thinking, bpm=None if thinking else 120, shift=3.0)
    config = GenerationConfig(batch_size=batch_size, seeds=[seed + i for i in range(batch_size)], audio_format="wav")
    return sdk.build_request(params, config, stream_pcm=stream_pcm)


def error_detail(error: grpc.RpcError) -> Optional[common_pb2.ErrorDetail]:
    """The ``acestep-error-bin`` trailer of a failed call, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_DETAIL_KEY:
            return common_pb2.ErrorDetail.FromString(value)
    return None


@dataclass
class CallResult:
    """How one Generate call ended: "OK" with its result, or a status with details and trailer."""

    code: str
    kinds: list[str]
    details: str = ""
    detail: Optional[common_pb2.ErrorDetail] = None
    result: Optional[gw.GenerateResult] = None

    @property
    def saw_output(self) -> bool:
        return any(kind in OUTPUT_KINDS for kind in self.kinds)

    def describe(self) -> str:
        stage = self.detail.stage if self.detail is not None else "-"
        return f"{self.code} (stage {stage}): {self.details!r} after {self.kinds[:6]}"


class Stream:
    """One Generate call running as a task. ``kinds`` fills in as events arrive."""

    def __init__(self, address: str, request: gw.GenerateRequest, *, timeout_s: float = CALL_TIMEOUT_S,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.kinds: list[str] = []
        self.first_output = asyncio.Event()
        self.accepted = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(address, request, timeout_s, tuple(metadata)))

    @property
    def saw_output(self) -> bool:
        return any(kind in OUTPUT_KINDS for kind in self.kinds)

    async def _run(self, address: str, request: gw.GenerateRequest, timeout_s: float,
                   metadata: tuple[tuple[str, str], ...]) -> CallResult:
        result = None
        async with grpc.aio.insecure_channel(address) as channel:
            call = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(request, timeout=timeout_s,
                                                                         metadata=metadata)
            try:
                async for event in call:
                    self._observe(event)
                    if event.WhichOneof("event") == "result":
                        result = event.result
            except grpc.aio.AioRpcError as error:
                return CallResult(error.code().name, self.kinds, error.details() or "", error_detail(error))
        return CallResult("OK", self.kinds, result=result)

    def _observe(self, event: gw.GenerateEvent) -> None:
        kind = event.WhichOneof("event")
        self.kinds.append(kind)
        if kind == "accepted":
            self.accepted.set()
        if kind in OUTPUT_KINDS:
            self.first_output.set()

    async def outcome(self, timeout_s: float = CALL_TIMEOUT_S + 10) -> CallResult:
        return await asyncio.wait_for(self.task, timeout_s)


async def generate(address: str, request: gw.GenerateRequest, **kwargs) -> CallResult:
    return await Stream(address, request, **kwargs).outcome()


async def health(address: str, service: str = "", timeout_s: float = 3.0) -> str:
    """The grpc.health.v1 status name, or the status code name of a failed check."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def assert_song_result(outcome: CallResult, request: gw.GenerateRequest) -> None:
    """A completed call delivered every item of the request at the requested length."""
    assert outcome.code == "OK", outcome.describe()
    assert outcome.result is not None, f"no result event: {outcome.kinds}"
    assert len(outcome.result.audios) == request.config.batch_size
    for item in outcome.result.audios:
        assert abs(item.duration_s - request.params.duration) < 0.1, item

