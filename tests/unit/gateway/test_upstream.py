"""The gateway's replica pool: least-outstanding-work balancing, and ``dns:///`` targets re-resolved
into one replica per address (real health-checked servers on 127.0.0.1 and 127.0.0.2)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.upstream import Replica, ReplicaPool
from shared.config import ServerConfig
from shared.errors import NotReady
from shared.grpc_server import GrpcServer
from shared.pb.acestep.dit.v1 import dit_pb2_grpc

FAST_S = 0.05  # health and resolve intervals of the pools under test


def _pool(*targets: str) -> ReplicaPool:
    """A pool of healthy replicas that are never called (balancing only looks at the counters)."""
    pool = ReplicaPool("dit", list(targets), dit_pb2_grpc.DitServiceStub)
    pool.replicas = {t: Replica("dit", t, stub=None, channel=None, healthy=True) for t in targets}
    return pool


async def test_a_lease_goes_to_the_replica_with_the_fewest_calls_in_flight() -> None:
    pool = _pool("10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1")
    async with pool.lease() as first, pool.lease() as second:
        async with pool.lease() as third:
            assert len({first.target, second.target, third.target}) == 3  # one call each
            async with pool.lease() as fourth:
                assert fourth.outstanding == 2
        # the third call is over: its replica now has the fewest in flight (0 against 1 and 1)
        async with pool.lease() as fifth:
            assert fifth is third
    assert [r.outstanding for r in pool.replicas.values()] == [0, 0, 0]


async def test_a_lease_is_returned_when_the_call_fails() -> None:
    pool = _pool("10.0.0.1:1")
    with pytest.raises(RuntimeError):
        async with pool.lease():
            raise RuntimeError("the call failed")
    assert pool.replicas["10.0.0.1:1"].outstanding == 0


def test_unhealthy_and_excluded_replicas_are_skipped_and_failures_break_ties() -> None:
    pool = _pool("10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1")
    first, second, third = pool.replicas.values()
    first.failures = 2
    second.failures = 1
    assert pool.pick() is third
    third.healthy = False
    assert pool.pick() is second
    assert pool.pick(exclude=frozenset({second.target})) is first
    with pytest.raises(NotReady, match="no healthy dit replica available"):
        pool.pick(exclude=frozenset({first.target, second.target}))


async def _serving(host: str, port: int = 0) -> GrpcServer:
    """A server on ``host`` whose health service says SERVING (all the pool checks)."""
    server = GrpcServer(ServerConfig(service_name=f"replica-{host}", host=host, port=port, metrics_port=-1), [])
    await server.start()
    await server.mark_serving()
    return server


async def _wait_for(predicate, what: str, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_dns_targets_follow_the_addresses_behind_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """As endpoints of a headless Kubernetes Service come and go, so do the pool's replicas."""
    first = await _serving("127.0.0.1")
    second = await _serving("127.0.0.2", first.port)  # every endpoint listens on the same port
    hosts = {"replicas.test": ["127.0.0.1"]}  # what the name resolves to, changed by the test
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in hosts:
            return real_getaddrinfo(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port)) for a in hosts[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    a, b = f"127.0.0.1:{first.port}", f"127.0.0.2:{first.port}"
    pool = ReplicaPool("dit", [f"dns:///replicas.test:{first.port}"], dit_pb2_grpc.DitServiceStub,
                       health_interval_s=FAST_S, resolve_interval_s=FAST_S)
    try:
        await pool.start()
        await _wait_for(lambda: pool.num_healthy == 1, "the first endpoint to serve")
        assert set(pool.replicas) == {a}

        hosts["replicas.test"] = ["127.0.0.1", "127.0.0.2"]  # scaled up
        await _wait_for(lambda: pool.num_healthy == 2, "the new endpoint to join")
        assert set(pool.replicas) == {a, b}
        async with pool.lease() as one, pool.lease() as other:
            assert {one.target, other.target} == {a, b}

        hosts["replicas.test"] = ["127.0.0.2"]  # the first endpoint went away
        await _wait_for(lambda: set(pool.replicas) == {b}, "the old endpoint to leave")
        assert pool.pick().target == b
    finally:
        await pool.close()
        for server in (first, second):
            await server.drain(grace_s=0)


async def test_a_dns_target_of_a_real_name_resolves_to_its_addresses() -> None:
    server = await _serving("127.0.0.1")
    pool = ReplicaPool("dit", [f"dns:///localhost:{server.port}"], dit_pb2_grpc.DitServiceStub,
                       health_interval_s=FAST_S, resolve_interval_s=FAST_S)
    try:
        await pool.start()
        target = f"127.0.0.1:{server.port}"
        await _wait_for(lambda: target in pool.replicas and pool.replicas[target].healthy,
                        "localhost's 127.0.0.1 to become a serving replica")
        assert pool.pick().target == target  # an IPv6 ::1 replica, if localhost has one, is not serving
    finally:
        await pool.close()
        await server.drain(grace_s=0)
