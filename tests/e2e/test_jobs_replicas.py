"""Two gateway replicas sharing one Redis job store and one files folder, in front of the e2e
stack's LM and first DiT: a job submitted through replica A is watched (dropped halfway, resumed)
and downloaded through replica B, and cancelled through B while A runs it."""

from __future__ import annotations

import signal

import grpc
import pytest

from gateway.serve import LocalStack
from shared.constants import SAMPLE_RATE_HZ
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc
from tests.e2e.helpers import decode_file, wait_until
from tests.e2e.test_jobs import _audio, _request
from tests.redis_server import unique_prefix


@pytest.fixture(scope="module")
def replicas(stack: LocalStack, redis_server, tmp_path_factory: pytest.TempPathFactory):
    """Stubs of gateway replicas A and B (separate processes and job folders, one Redis, one files folder)."""
    shared_files = tmp_path_factory.mktemp("shared-job-files")
    common = ["--dit", stack.services["dit0"].address, "--lm", stack.services["lm0"].address,
              "--health-interval-s", "1", "--job-store", redis_server.url, "--job-files-dir", str(shared_files),
              "--job-key-prefix", unique_prefix()]
    services = [stack._spawn(f"gateway-replica-{name}", "gateway",
                             [*common, "--replica-id", f"replica-{name}",
                              "--job-dir", str(tmp_path_factory.mktemp(f"jobs-{name}"))])
                for name in ("a", "b")]
    channels = []
    try:
        for service in services:
            service.wait_port(120.0)
            channels.append(grpc.insecure_channel(service.address))
        yield [gateway_pb2_grpc.GatewayServiceStub(channel) for channel in channels]
    finally:
        for channel in channels:
            channel.close()
        for service in services:
            service.process.send_signal(signal.SIGTERM)
        for service in services:
            service.process.wait(60)


def test_a_job_submitted_on_one_replica_is_followed_and_fetched_on_another(replicas) -> None:
    replica_a, replica_b = replicas
    assert replica_a.Submit(_request("replicated", seed=21)).request_id == "replicated"
    seen: list[gw.GenerateEvent] = []
    stream = replica_b.Watch(gw.WatchRequest(request_id="replicated"))
    for event in stream:
        seen.append(event)
        if len(seen) == 3:
            stream.cancel()  # the client drops its stream while A still runs the job
            break
    rest = list(replica_b.Watch(gw.WatchRequest(request_id="replicated", after_sequence=seen[-1].sequence)))
    followed = seen + rest
    sequences = [e.sequence for e in followed]
    assert sequences == list(range(1, len(sequences) + 1))  # every event exactly once, in order
    assert followed[0].WhichOneof("event") == "accepted" and followed[-1].WhichOneof("event") == "result"
    assert [e.WhichOneof("event") for e in followed].count("result") == 1
    logged_on_a = list(replica_a.Watch(gw.WatchRequest(request_id="replicated")))
    assert logged_on_a == followed  # the same log, whichever replica serves it

    job = replica_b.GetJob(gw.JobRequest(request_id="replicated"))
    assert job.state == gw.JOB_STATE_SUCCEEDED and [f.item_index for f in job.files] == [0]
    from_b = _audio(replica_b, "replicated")
    assert from_b == _audio(replica_a, "replicated")
    waveform, rate, container = decode_file(from_b)
    assert (container, rate, waveform.shape[1]) == ("WAV", SAMPLE_RATE_HZ, 10 * SAMPLE_RATE_HZ)
    assert "replicated" in [j.request_id for j in replica_b.ListJobs(gw.ListJobsRequest()).jobs]


def test_a_cancel_on_one_replica_stops_the_job_running_on_another(replicas) -> None:
    replica_a, replica_b = replicas
    replica_a.Submit(_request("replicated-cancel", seed=22, duration=120.0))
    wait_until(lambda: replica_b.GetJob(gw.JobRequest(request_id="replicated-cancel")).state,
               lambda state: state == gw.JOB_STATE_RUNNING, 60.0, "the job to run on replica A")
    job = replica_b.CancelJob(gw.JobRequest(request_id="replicated-cancel"))
    assert job.state == gw.JOB_STATE_CANCELLED and job.error == "the job was cancelled"
    events = list(replica_b.Watch(gw.WatchRequest(request_id="replicated-cancel")))
    assert events[-1].failed.error.code == "CANCELLED"
    assert replica_a.GetJob(gw.JobRequest(request_id="replicated-cancel")).state == gw.JOB_STATE_CANCELLED
