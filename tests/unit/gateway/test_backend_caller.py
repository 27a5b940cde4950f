"""The gateway's backend calls: retry rules of ``BackendCaller`` and a draining replica, on 127.0.0.1.

Three replicas are real gRPC servers (``shared.grpc_server.GrpcServer``, so statuses, error mapping
and drain are the real ones) with a scripted DiT servicer: the n-th call to any replica does what
the n-th entry of a shared script says. The ``ReplicaPool`` in front of them is the gateway's own;
its health checks run once at start (the interval is an hour), so a replica marked failed by a
call stays marked for the rest of the test.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.orchestrator import BackendCaller
from gateway.upstream import ReplicaPool
from shared import metrics
from shared.config import ServerConfig
from shared.errors import DeadlineExceeded, InvalidArgument, NotReady, ResourceExhausted
from shared.grpc_server import GrpcServer, ServiceBinding
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.dit.v1 import dit_pb2, dit_pb2_grpc

NUM_REPLICAS = 3
CALL_TIMEOUT_S = 10.0
ERRORS = {  # script entry -> what the replica raises (the interceptor maps it to the status code)
    "unavailable": lambda: NotReady("replica is going away"),
    "exhausted": lambda: ResourceExhausted("queue is full (4 waiting, limit 4)"),
    "invalid": lambda: InvalidArgument("duration must be in [10, 600] seconds, got 700", field="duration"),
    "deadline": lambda: DeadlineExceeded("the deadline passed during diffusion"),
}


@dataclass
class Script:
    """What the n-th call does ("ok", "<error>_before" or "<error>_after" its first output, "hold"),
    and which replica served each call."""

    steps: list[str] = field(default_factory=list)
    served_by: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def next_step(self, replica: str) -> str:
        self.served_by.append(replica)
        return self.steps.pop(0) if self.steps else "ok"


class ScriptedDit(dit_pb2_grpc.DitServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.target = ""  # known once the server is bound

    async def Synthesize(self, request: dit_pb2.SynthesizeRequest, context):
        step = self.script.next_step(self.target)
        yield dit_pb2.SynthesizeEvent(accepted=dit_pb2.Accepted(request_id=request.request_id))
        yield dit_pb2.SynthesizeEvent(progress=common_pb2.Progress(stage=common_pb2.STAGE_DIFFUSION, fraction=0.5))
        if step == "hold":
            await self.script.release.wait()
        if step.endswith("_before"):
            raise ERRORS[step.removesuffix("_before")]()
        yield dit_pb2.SynthesizeEvent(audio=common_pb2.PcmChunk(item_index=0, pcm_s16le=b"\x00\x00" * 4))
        if step.endswith("_after"):
            raise ERRORS[step.removesuffix("_after")]()
        yield dit_pb2.SynthesizeEvent(item_done=dit_pb2.ItemDone(item_index=0, seed=1))
        yield dit_pb2.SynthesizeEvent(done=dit_pb2.SynthesizeDone())

    async def EncodeAudio(self, request: dit_pb2.EncodeAudioRequest, context) -> dit_pb2.EncodeAudioResponse:
        step = self.script.next_step(self.target)
        if step != "ok":
            raise ERRORS[step.removesuffix("_before")]()
        return dit_pb2.EncodeAudioResponse()


@dataclass
class Replicas:
    pool: ReplicaPool
    servers: dict[str, GrpcServer]
    script: Script


@pytest.fixture
async def replicas():
    script = Script()
    servers: dict[str, GrpcServer] = {}
    for index in range(NUM_REPLICAS):
        servicer = ScriptedDit(script)
        binding = ServiceBinding(dit_pb2_grpc.add_DitServiceServicer_to_server, servicer, "acestep.dit.v1.DitService")
        server = GrpcServer(ServerConfig(service_name=f"dit-{index}", metrics_port=-1, drain_grace_s=5.0), [binding])
        servicer.target = f"127.0.0.1:{await server.start()}"
        await server.mark_serving()
        servers[servicer.target] = server
    pool = ReplicaPool("dit", list(servers), dit_pb2_grpc.DitServiceStub, health_interval_s=3600.0)
    await pool.start()
    await _wait_for(lambda: pool.num_healthy == NUM_REPLICAS, "every replica to pass its health check")
    yield Replicas(pool, servers, script)
    script.release.set()
    await pool.close()
    for server in servers.values():
        await server.drain(grace_s=0)


async def _wait_for(predicate, what: str, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _is_output(event: dit_pb2.SynthesizeEvent) -> bool:
    """As the orchestrator counts the DiT's output: events a retry could not take back."""
    return event.WhichOneof("event") in ("audio", "file", "item_done")


async def _synthesize(caller: BackendCaller, kinds: list[str]) -> None:
    request = dit_pb2.SynthesizeRequest(request_id="req-1")
    async for event in caller.stream("Synthesize", request, lambda: CALL_TIMEOUT_S, _is_output):
        kinds.append(event.WhichOneof("event"))


def _retries() -> float:
    return metrics.GATEWAY_RETRIES.labels("dit")._value.get()


async def test_a_call_that_fails_before_output_is_retried_on_another_replica(replicas: Replicas) -> None:
    replicas.script.steps = ["unavailable_before"]
    retries_before = _retries()
    kinds: list[str] = []
    await _synthesize(BackendCaller(replicas.pool, "dit", max_attempts=3), kinds)
    first, second = replicas.script.served_by
    assert first != second
    assert kinds[-3:] == ["audio", "item_done", "done"]
    assert _retries() == retries_before + 1
    failed = replicas.pool.replicas[first]
    assert not failed.healthy and failed.failures == 1  # skipped until its health check passes again
    assert [r.outstanding for r in replicas.pool.replicas.values()] == [0] * NUM_REPLICAS


async def test_retries_stop_after_max_attempts_with_the_last_error(replicas: Replicas) -> None:
    replicas.script.steps = ["unavailable_before"] * NUM_REPLICAS
    retries_before = _retries()
    with pytest.raises(NotReady) as raised:
        await _synthesize(BackendCaller(replicas.pool, "dit", max_attempts=2), [])
    assert len(replicas.script.served_by) == 2 and len(set(replicas.script.served_by)) == 2
    assert raised.value.stage == "dit"
    assert raised.value.message == "dit failed: UNAVAILABLE: replica is going away"
    assert _retries() == retries_before + 1


async def test_a_call_that_emitted_output_is_not_retried_and_names_the_stage(replicas: Replicas) -> None:
    replicas.script.steps = ["unavailable_after"]
    retries_before = _retries()
    kinds: list[str] = []
    with pytest.raises(NotReady) as raised:
        await _synthesize(BackendCaller(replicas.pool, "dit", max_attempts=3), kinds)
    assert kinds == ["accepted", "progress", "audio"]
    assert len(replicas.script.served_by) == 1
    assert raised.value.stage == "dit"
    assert raised.value.message.startswith("dit failed: UNAVAILABLE")
    assert _retries() == retries_before


@pytest.mark.parametrize("step, error_type, message", [
    ("invalid_before", InvalidArgument, "duration must be in [10, 600] seconds, got 700"),
    ("deadline_before", DeadlineExceeded, "dit failed: DEADLINE_EXCEEDED: the deadline passed during diffusion"),
])
async def test_non_retryable_codes_are_not_retried(replicas: Replicas, step: str, error_type: type,
                                                   message: str) -> None:
    replicas.script.steps = [step]
    retries_before = _retries()
    with pytest.raises(error_type) as raised:
        await _synthesize(BackendCaller(replicas.pool, "dit", max_attempts=3), [])
    assert len(replicas.script.served_by) == 1
    assert raised.value.stage == "dit"
    assert raised.value.message == message
    assert _retries() == retries_before
    assert replicas.pool.num_healthy == NUM_REPLICAS  # the replica answered: it is not down


async def test_a_full_replica_is_retried_elsewhere_but_not_marked_down(replicas: Replicas) -> None:
    replicas.script.steps = ["exhausted_before"]
    kinds: list[str] = []
    await _synthesize(BackendCaller(replicas.pool, "dit", max_attempts=3), kinds)
    first, second = replicas.script.served_by
    assert first != second and kinds[-1] == "done"
    assert replicas.pool.replicas[first].healthy and replicas.pool.replicas[first].failures == 0


async def test_unary_calls_follow_the_same_rules(replicas: Replicas) -> None:
    caller = BackendCaller(replicas.pool, "dit", max_attempts=3)
    replicas.script.steps = ["unavailable_before"]
    await caller.unary("EncodeAudio", dit_pb2.EncodeAudioRequest(), lambda: CALL_TIMEOUT_S)
    assert len(set(replicas.script.served_by)) == 2
    replicas.script.steps, replicas.script.served_by = ["invalid_before"], []
    with pytest.raises(InvalidArgument):
        await caller.unary("EncodeAudio", dit_pb2.EncodeAudioRequest(), lambda: CALL_TIMEOUT_S)
    assert len(replicas.script.served_by) == 1


async def test_no_healthy_replica_is_unavailable_naming_the_stage(replicas: Replicas) -> None:
    for replica in replicas.pool.replicas.values():
        replicas.pool.mark_failed(replica)
    with pytest.raises(NotReady) as raised:
        await _synthesize(BackendCaller(replicas.pool, "dit", max_attempts=3), [])
    assert raised.value.stage == "dit" and "no healthy dit replica" in raised.value.message
    assert replicas.script.served_by == []


async def test_a_draining_replica_finishes_its_call_while_new_calls_go_elsewhere(replicas: Replicas) -> None:
    draining = replicas.pool.pick()  # the replica the next call would go to
    server = replicas.servers[draining.target]
    replicas.script.steps = ["hold"]
    held_events: list[str] = []

    async def held_call() -> None:  # a call of another client, on the replica directly
        async for event in dit_pb2_grpc.DitServiceStub(draining.channel).Synthesize(
                dit_pb2.SynthesizeRequest(request_id="held"), timeout=CALL_TIMEOUT_S):
            held_events.append(event.WhichOneof("event"))

    held = asyncio.ensure_future(held_call())
    await _wait_for(lambda: replicas.script.served_by == [draining.target], "the held call to start")
    drain = asyncio.ensure_future(server.drain(grace_s=30.0))
    health = health_pb2_grpc.HealthStub(draining.channel)
    while (await health.Check(health_pb2.HealthCheckRequest())).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        await asyncio.sleep(0.01)
    assert replicas.pool.pick() is draining  # the pool has not noticed yet (its next health check is far off)

    retries_before = _retries()
    kinds: list[str] = []
    await _synthesize(BackendCaller(replicas.pool, "dit", max_attempts=3), kinds)
    assert kinds[-1] == "done" and replicas.script.served_by[-1] != draining.target
    assert _retries() == retries_before + 1  # refused with UNAVAILABLE by the draining replica, then retried
    assert not draining.healthy

    assert not held.done()
    replicas.script.release.set()
    await asyncio.wait_for(held, CALL_TIMEOUT_S)
    assert held_events[-1] == "done"
    await asyncio.wait_for(drain, CALL_TIMEOUT_S)
