"""Replica pools for the LM and DiT backends.

Balancing is by outstanding work (fewest in-flight calls among healthy replicas), not round
robin over connections. Every replica is health-checked in the background with the standard
grpc.health.v1 service; one that stops serving is skipped until it reports SERVING again.
A ``dns:///host:port`` target is re-resolved periodically so every endpoint behind a headless
Kubernetes Service becomes its own replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from shared import metrics
from shared.errors import NotReady

log = logging.getLogger(__name__)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 320 * 1024 * 1024),
    ("grpc.max_send_message_length", 320 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]
MISSED_CHECKS_BEFORE_DOWN = 3


@dataclass
class Replica:
    """One backend endpoint with its channel, stub and load counters."""

    backend: str                      # "lm" | "dit"
    target: str                       # host:port
    stub: object
    channel: grpc.aio.Channel
    outstanding: int = 0
    healthy: bool = False
    failures: int = 0
    health_task: Optional[asyncio.Task] = field(default=None, repr=False)

    def set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            log.info("%s replica %s is now %s", self.backend, self.target, "SERVING" if healthy else "NOT SERVING")
        self.healthy = healthy
        metrics.GATEWAY_BACKEND_HEALTHY.labels(self.backend, self.target).set(1 if healthy else 0)


def _expand(target: str) -> list[str]:
    """``dns:///svc:port`` → every resolved ``ip:port``; a plain ``host:port`` stays as it is."""
    if not target.startswith("dns:///"):
        return [target]
    host, _, port = target[len("dns:///"):].rpartition(":")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    addresses = sorted({info[4][0] for info in infos})
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]


class ReplicaPool:
    """The replicas of one backend; ``lease()`` picks the least-loaded healthy one."""

    def __init__(self, backend: str, targets: list[str], stub_factory: Callable[[grpc.aio.Channel], object],
                 health_interval_s: float = 1.0, credentials: Optional[grpc.ChannelCredentials] = None,
                 resolve_interval_s: float = 10.0) -> None:
        self.backend = backend
        self.targets = targets
        self.stub_factory = stub_factory
        self.health_interval_s = health_interval_s
        self.credentials = credentials
        self.resolve_interval_s = resolve_interval_s  # how often ``dns:///`` targets are re-resolved
        self.replicas: dict[str, Replica] = {}
        self._refresh_task: Optional[asyncio.Task] = None

    def _open(self, address: str) -> Replica:
        interceptors = aio_client_interceptors()
        if self.credentials is not None:
            channel = grpc.aio.secure_channel(address, self.credentials, CHANNEL_OPTIONS, interceptors=interceptors)
        else:
            channel = grpc.aio.insecure_channel(address, CHANNEL_OPTIONS, interceptors=interceptors)
        replica = Replica(self.backend, address, self.stub_factory(channel), channel)
        replica.health_task = asyncio.ensure_future(self._watch(replica))
        return replica

    async def start(self) -> None:
        self._sync_addresses()
        self._refresh_task = asyncio.ensure_future(self._refresh_loop())

    def _sync_addresses(self) -> None:
        wanted = {a for t in self.targets for a in _expand(t)}
        for address in wanted - set(self.replicas):
            self.replicas[address] = self._open(address)
        for address in set(self.replicas) - wanted:
            asyncio.ensure_future(self._close(self.replicas.pop(address)))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_interval_s)
            self._sync_addresses()

    async def _watch(self, replica: Replica) -> None:
        """NOT_SERVING or an unreachable replica counts at once; a check that merely times out (a
        replica busy on a saturated host) only after ``MISSED_CHECKS_BEFORE_DOWN`` in a row."""
        stub = health_pb2_grpc.HealthStub(replica.channel)
        misses = 0
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=max(1.0, self.health_interval_s))
                misses = 0
                replica.set_healthy(reply.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.aio.AioRpcError as error:
                slow = error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                misses = misses + 1 if slow else MISSED_CHECKS_BEFORE_DOWN
                if misses >= MISSED_CHECKS_BEFORE_DOWN:
                    replica.set_healthy(False)
            await asyncio.sleep(self.health_interval_s)

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until at least one replica is healthy."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not any(r.healthy for r in self.replicas.values()):
            if loop.time() > deadline:
                raise NotReady(f"no {self.backend} replica is serving ({', '.join(self.targets)})")
            await asyncio.sleep(0.05)

    def pick(self, exclude: frozenset[str] = frozenset()) -> Replica:
        candidates = [r for r in self.replicas.values() if r.healthy and r.target not in exclude]
        if not candidates:
            raise NotReady(f"no healthy {self.backend} replica available")
        return min(candidates, key=lambda r: (r.outstanding, r.failures, r.target))

    @contextlib.asynccontextmanager
    async def lease(self, exclude: frozenset[str] = frozenset()) -> AsyncIterator[Replica]:
        replica = self.pick(exclude)
        replica.outstanding += 1
        try:
            yield replica
        finally:
            replica.outstanding -= 1

    def mark_failed(self, replica: Replica) -> None:
        """A transport failure: skip the replica until its health check passes again."""
        replica.failures += 1
        replica.set_healthy(False)

    @property
    def num_healthy(self) -> int:
        return sum(r.healthy for r in self.replicas.values())

    async def _close(self, replica: Replica) -> None:
        if replica.health_task is not None:
            replica.health_task.cancel()
        await replica.channel.close()

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        for replica in list(self.replicas.values()):
            await self._close(replica)
        self.replicas.clear()
