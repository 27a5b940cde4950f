"""Jobs that outlive the connection, through the real stack: Submit, Watch with resume, GetAudio,
Generate detached from its stream, and a gateway killed and restarted on the same job store."""

from __future__ import annotations

import signal

import grpc

from gateway import sdk
from gateway.serve import LocalStack
from shared.constants import SAMPLE_RATE_HZ
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc
from shared.types import GenerationConfig
from tests.e2e.helpers import decode_file, quick_params, rpc_error, wait_until


def _request(request_id: str, seed: int, duration: float = 10.0, **extra) -> gw.GenerateRequest:
    request = sdk.build_request(quick_params(duration=duration),
                                GenerationConfig(batch_size=1, seeds=[seed], audio_format="wav"))
    request.request_id = request_id
    for name, value in extra.items():
        setattr(request, name, value)
    return request


def _audio(stub, request_id: str, item: int = 0) -> bytes:
    return b"".join(chunk.data for chunk in stub.GetAudio(gw.GetAudioRequest(request_id=request_id, item_index=item)))


def test_submit_then_watch_with_a_dropped_stream_resumed(stub) -> None:
    submitted = stub.Submit(_request("job-resume", seed=3))
    assert submitted.request_id == "job-resume"
    seen: list[gw.GenerateEvent] = []
    stream = stub.Watch(gw.WatchRequest(request_id="job-resume"))
    for event in stream:
        seen.append(event)
        if len(seen) == 3:
            stream.cancel()  # the client drops the stream halfway
            break
    rest = list(stub.Watch(gw.WatchRequest(request_id="job-resume", after_sequence=seen[-1].sequence)))
    sequences = [e.sequence for e in seen + rest]
    assert sequences == list(range(1, len(sequences) + 1))  # every event exactly once, in order
    assert seen[0].WhichOneof("event") == "accepted" and rest[-1].WhichOneof("event") == "result"
    assert [e.WhichOneof("event") for e in rest].count("result") == 1

    job = stub.GetJob(gw.JobRequest(request_id="job-resume"))
    assert job.state == gw.JOB_STATE_SUCCEEDED and job.last_sequence == sequences[-1]
    assert [f.item_index for f in job.files] == [0]
    waveform, rate, container = decode_file(_audio(stub, "job-resume"))
    assert (container, rate, waveform.shape[1]) == ("WAV", SAMPLE_RATE_HZ, 10 * SAMPLE_RATE_HZ)
    again = list(stub.Watch(gw.WatchRequest(request_id="job-resume", after_sequence=0)))
    assert [e.sequence for e in again] == sequences  # replayable while retained
    assert "job-resume" in [j.request_id for j in stub.ListJobs(gw.ListJobsRequest()).jobs]


def test_generate_detached_from_its_stream_finishes_and_matches(stub) -> None:
    stream = stub.Generate(_request("job-detached", seed=5, detach_on_disconnect=True))
    first = next(iter(stream))
    assert first.WhichOneof("event") == "accepted"
    stream.cancel()
    events = list(stub.Watch(gw.WatchRequest(request_id="job-detached")))
    assert events[-1].WhichOneof("event") == "result"
    attached = list(stub.Generate(_request("job-attached", seed=5)))
    file_bytes = b"".join(e.file.data for e in attached if e.WhichOneof("event") == "file")
    assert _audio(stub, "job-detached") == file_bytes == _audio(stub, "job-attached")  # same seed, same song


def test_an_abandoned_generate_is_cancelled(stub) -> None:
    stream = stub.Generate(_request("job-abandoned", seed=6, duration=60.0))
    next(iter(stream))
    stream.cancel()
    job = wait_until(lambda: stub.GetJob(gw.JobRequest(request_id="job-abandoned")),
                     lambda j: j.state != gw.JOB_STATE_RUNNING and j.state != gw.JOB_STATE_QUEUED, 60.0,
                     "the abandoned job to end")
    assert job.state == gw.JOB_STATE_CANCELLED
    events = list(stub.Watch(gw.WatchRequest(request_id="job-abandoned")))
    assert events[-1].failed.error.code == "CANCELLED"


def test_unknown_jobs_and_bad_watch_requests(stub) -> None:
    error = rpc_error(lambda: stub.GetJob(gw.JobRequest(request_id="no-such-job")))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "no-such-job" in error.details()
    stub.Submit(_request("job-once", seed=8))
    error = rpc_error(lambda: stub.Submit(_request("job-once", seed=8)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "already a job" in error.details()
    error = rpc_error(lambda: stub.Watch(gw.WatchRequest(request_id="job-once", after_sequence=-1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(lambda: stub.GetAudio(gw.GetAudioRequest(request_id="job-once", item_index=7)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_a_killed_gateway_restarts_on_its_store(stack: LocalStack, tmp_path) -> None:
    """SIGKILL with one job finished and one running; the restarted gateway serves the finished
    job's file byte-identical and reports the interrupted one failed with the reason."""
    jobs_dir = tmp_path / "jobs"
    dits = ",".join(s.address for n, s in stack.services.items() if n.startswith("dit"))
    args = ["--dit", dits, "--job-dir", str(jobs_dir), "--health-interval-s", "1"]
    first = stack._spawn("gateway-restart-1", "gateway", args)
    first.wait_port(120.0)
    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(first.address))
    list(stub.Generate(_request("job-before-kill", seed=9)))
    finished = _audio(stub, "job-before-kill")
    stub.Submit(_request("job-killed", seed=10, duration=120.0))
    wait_until(lambda: stub.GetJob(gw.JobRequest(request_id="job-killed")).state,
               lambda state: state == gw.JOB_STATE_RUNNING, 60.0, "the long job to run")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(30)

    second = stack._spawn("gateway-restart-2", "gateway", args)
    second.wait_port(120.0)
    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(second.address))
    assert _audio(stub, "job-before-kill") == finished
    killed = stub.GetJob(gw.JobRequest(request_id="job-killed"))
    assert killed.state == gw.JOB_STATE_FAILED and "restarted" in killed.error
    events = list(stub.Watch(gw.WatchRequest(request_id="job-killed")))
    assert events[-1].failed.error.code == "UNAVAILABLE" and "restarted" in events[-1].failed.error.message
    second.process.send_signal(signal.SIGTERM)
    second.process.wait(30)


def test_jobs_are_private_to_their_caller(stub, address: str) -> None:
    """The stack runs without API keys; a caller presenting a key is another caller."""
    stub.Submit(_request("job-private", seed=11))
    other = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(address))
    error = rpc_error(lambda: other.GetJob(gw.JobRequest(request_id="job-private"),
                                           metadata=(("x-api-key", "someone-else"),)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert stub.GetJob(gw.JobRequest(request_id="job-private")).request_id == "job-private"


def test_cli_detach_watch_and_get(address: str, tmp_path) -> None:
    from tests.e2e.test_quickstart import CLI, _run

    common = ["--gateway", address]
    job_id = _run([str(CLI), "generate", *common, "--caption", "lofi piano", "--duration", "10", "--batch-size", "1",
                   "--no-thinking", "--no-use-cot-metas", "--no-use-cot-caption", "--no-use-cot-language",
                   "--audio-format", "wav", "--seed", "12", "--detach"]).strip()
    assert job_id and "\n" not in job_id
    watched = _run([str(CLI), "watch", *common, job_id, "--out", str(tmp_path / "watched")])
    fetched = _run([str(CLI), "get", *common, job_id, "--out", str(tmp_path / "fetched")])
    [watched_path] = [line.split()[0] for line in watched.splitlines() if "seed=12" in line]
    [fetched_path] = [line.split()[0] for line in fetched.splitlines() if "seed=12" in line]
    data = open(watched_path, "rb").read()
    assert data == open(fetched_path, "rb").read()
    waveform, rate, container = decode_file(data)
    assert (container, waveform.shape[1]) == ("WAV", 10 * rate)
