"""The native HTTP API (``/v1``) through the real HTTP edge in front of the real stack: a job
created over HTTP, followed as server-sent events, dropped halfway and resumed with Last-Event-ID,
its file downloaded (whole and by byte ranges) byte-identical to gRPC GetAudio; uploads, keys,
other callers' jobs, bad input; and a second edge process with a short heartbeat and a small
body limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import pytest

from gateway.serve import ServiceProcess
from http_service.sse_client import SseMessage, iter_sse
from shared.audio_codes import format_codes
from shared.constants import SAMPLE_RATE_HZ
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from tests.e2e.conftest import MAX_AUDIO_BYTES
from tests.e2e.helpers import decode_file, rpc_error

QUICK = {"caption": "lo-fi piano loop", "duration": 10.0, "inference_steps": 2, "thinking": False,
         "use_cot_metas": False, "use_cot_caption": False, "use_cot_language": False}


def generation(seed: int, audio_format: str = "wav", **params) -> dict:
    return {"params": {**QUICK, **params}, "config": {"batch_size": 1, "seeds": [seed], "audio_format": audio_format}}


def follow(http: httpx.Client, path: str, headers: dict | None = None, stop_after: int = 0) -> list[SseMessage]:
    """The SSE events of ``path`` (comments left out) until the server ends the stream, or only
    the first ``stop_after`` events, closing the connection then (a dropped client)."""
    events = []
    with http.stream("GET", path, headers=headers or {}) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        for message in iter_sse(reply.iter_lines()):
            if message.is_comment:
                continue
            events.append(message)
            if len(events) == stop_after:
                break
    return events


def grpc_audio(stub, request_id: str, item_index: int = 0, key: str = "") -> bytes:
    metadata = (("x-api-key", key),) if key else ()
    request = gw.GetAudioRequest(request_id=request_id, item_index=item_index)
    return b"".join(chunk.data for chunk in stub.GetAudio(request, metadata=metadata))


def error_of(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, (reply.status_code, reply.text[:400])
    error = reply.json()["error"]
    assert error["status"] == status and error["message"]
    return error


@pytest.fixture(scope="module")
def http(http_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=http_url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def followed(http: httpx.Client) -> dict:
    """One job created over HTTP whose event stream is dropped after 3 events, then resumed with
    Last-Event-ID to the end."""
    reply = http.post("/v1/generations", json=generation(seed=11))
    assert reply.status_code == 202, reply.text
    created = reply.json()
    request_id = created["request_id"]
    assert created["links"]["events"] == f"/v1/jobs/{request_id}/events"
    first = follow(http, created["links"]["events"], stop_after=3)
    rest = follow(http, created["links"]["events"], headers={"Last-Event-ID": first[-1].id})
    return {"request_id": request_id, "created": created, "first": first, "rest": rest}


def test_sse_resumed_after_a_drop_delivers_every_event_once(http: httpx.Client, followed: dict) -> None:
    first, rest = followed["first"], followed["rest"]
    ids = [int(m.id) for m in first + rest]
    assert ids == list(range(1, len(ids) + 1))  # strictly increasing from 1, nothing missing, nothing twice
    kinds = [m.event for m in first + rest]
    assert kinds[0] == "accepted" and kinds[-1] == "result" and kinds.count("result") == 1
    assert kinds.index("item_finished") < kinds.index("result") and "progress" in kinds
    assert set(kinds) <= {"accepted", "progress", "lm_result", "item_finished", "result"}
    for message in first + rest:  # data is the gateway event's protobuf JSON
        data = message.json()
        assert message.event in data and data["sequence"] == message.id
    assert first[0].json()["accepted"]["request_id"] == followed["request_id"]

    replay = follow(http, f"/v1/jobs/{followed['request_id']}/events")  # the finished job, from the start
    assert [(m.id, m.event, m.data) for m in replay] == [(m.id, m.event, m.data) for m in first + rest]
    tail = follow(http, f"/v1/jobs/{followed['request_id']}/events?after={ids[-2]}")
    assert [m.id for m in tail] == [str(ids[-1])]


def test_the_finished_job_has_its_result_and_files(http: httpx.Client, followed: dict, stub) -> None:
    request_id = followed["request_id"]
    job = http.get(f"/v1/jobs/{request_id}").json()
    assert job["state"] == "succeeded"  # dropping the stream did not cancel it
    assert job["last_sequence"] == int(followed["rest"][-1].id)
    (item,) = job["result"]["audios"]
    assert job["result"]["seeds"] == [11] and item["seed"] == 11 and item["format"] == "wav"
    assert item["url"] == f"/v1/jobs/{request_id}/items/0/audio" == job["files"][0]["url"]
    assert job["result"]["params"]["caption"] == QUICK["caption"] and job["failure"] is None
    assert job["progress"]["overall"] > 0.9
    listed = http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]
    assert request_id in [j["request_id"] for j in listed]

    via_grpc = grpc_audio(stub, request_id)
    reply = http.get(item["url"])
    assert reply.status_code == 200 and reply.content == via_grpc
    assert reply.headers["content-type"] == "audio/wav" and reply.headers["accept-ranges"] == "bytes"
    assert int(reply.headers["content-length"]) == len(via_grpc) == job["files"][0]["size_bytes"]
    waveform, rate, container = decode_file(reply.content)
    assert (container, rate, waveform.shape[1]) == ("WAV", SAMPLE_RATE_HZ, 10 * SAMPLE_RATE_HZ)


def test_audio_byte_ranges_for_seeking(http: httpx.Client, followed: dict, stub) -> None:
    url = f"/v1/jobs/{followed['request_id']}/items/0/audio"
    data = grpc_audio(stub, followed["request_id"])
    total = len(data)
    head = http.get(url, headers={"Range": "bytes=0-99"})
    assert head.status_code == 206 and head.content == data[:100]
    assert head.headers["content-range"] == f"bytes 0-99/{total}" and head.headers["content-length"] == "100"
    middle = http.get(url, headers={"Range": f"bytes={total // 2}-"})
    assert middle.status_code == 206 and middle.content == data[total // 2:]
    suffix = http.get(url, headers={"Range": "bytes=-100"})
    assert suffix.status_code == 206 and suffix.content == data[-100:]
    assert suffix.headers["content-range"] == f"bytes {total - 100}-{total - 1}/{total}"
    outside = http.get(url, headers={"Range": f"bytes={total}-"})
    assert outside.status_code == 416 and outside.headers["content-range"] == f"bytes */{total}"
    download = http.get(url, params={"download": 1})
    assert download.headers["content-disposition"].startswith("attachment;") and download.content == data
    assert http.head(url).headers["content-length"] == str(total)


def test_other_callers_and_unknown_jobs_are_not_found(http: httpx.Client, followed: dict) -> None:
    request_id = followed["request_id"]
    stranger = {"X-API-Key": "someone-else"}
    for path in (f"/v1/jobs/{request_id}", f"/v1/jobs/{request_id}/events", f"/v1/jobs/{request_id}/items/0/audio"):
        assert error_of(http.get(path, headers=stranger), 404)["code"] == "NOT_FOUND"
    assert http.post(f"/v1/jobs/{request_id}/cancel", headers=stranger).status_code == 404
    for path in ("/v1/jobs/no-such-job", "/v1/jobs/no-such-job/events", "/v1/jobs/%2e%2e/items/0/audio",
                 f"/v1/jobs/{request_id}/items/5/audio", "/v1/jobs/" + "x" * 300):
        error_of(http.get(path), 404)
    assert http.get(f"/v1/jobs/{request_id}").json()["state"] == "succeeded"  # the owner still sees it


def test_the_callers_key_is_forwarded_to_the_gateway(http: httpx.Client, stub) -> None:
    """Jobs belong to the key that created them (the gateway keys them by caller): created over
    HTTP with a Bearer key, the job is the same key's over gRPC and nobody else's; then cancelled."""
    reply = http.post("/v1/generations", json=generation(seed=12, duration=60.0),
                      headers={"Authorization": "Bearer alice"})
    request_id = reply.json()["request_id"]
    job = stub.GetJob(gw.JobRequest(request_id=request_id), metadata=(("x-api-key", "alice"),))
    assert job.request_id == request_id
    assert rpc_error(lambda: stub.GetJob(gw.JobRequest(request_id=request_id))).code() == grpc.StatusCode.NOT_FOUND
    for headers, query in (({"X-API-Key": "alice"}, {}), ({}, {"ai_token": "alice"})):
        assert http.get(f"/v1/jobs/{request_id}", headers=headers, params=query).status_code == 200
    error_of(http.get(f"/v1/jobs/{request_id}"), 404)
    cancelled = http.delete(f"/v1/jobs/{request_id}", headers={"X-API-Key": "alice"}).json()
    assert cancelled["state"] == "cancelled"
    events = follow(http, f"/v1/jobs/{request_id}/events", headers={"X-API-Key": "alice"})
    assert events[-1].event == "failed" and events[-1].json()["failed"]["error"]["code"] == "CANCELLED"


def test_multipart_upload_of_a_source(http: httpx.Client, source_wav: bytes) -> None:
    body = generation(seed=13, task_type="cover", audio_cover_strength=0.5)
    reply = http.post("/v1/generations", data={"request": json.dumps(body)},
                      files={"src_audio": ("source.wav", source_wav, "audio/wav")})
    assert reply.status_code == 202, reply.text
    events = follow(http, reply.json()["links"]["events"])
    assert events[-1].event == "result", events[-1].data
    job = http.get(reply.json()["links"]["self"]).json()
    assert job["result"]["params"]["task_type"] == "cover" and job["result"]["params"]["src_audio"] is None
    audio = http.get(job["files"][0]["url"])
    assert decode_file(audio.content)[1] == SAMPLE_RATE_HZ

    oversize = http.post("/v1/generations", data={"request": json.dumps(body)},
                         files={"src_audio": ("big.wav", b"\0" * (MAX_AUDIO_BYTES + 1), "audio/wav")})
    error = error_of(oversize, 400)
    assert error["field"] == "src_audio" and str(MAX_AUDIO_BYTES) in error["message"]


@pytest.mark.parametrize("body, field", [
    ({"params": {"caption": "x", "tempo": 120}}, "params.tempo"),
    ({"params": {"duration": "ten"}}, "params.duration"),
    ({"config": {"batch_size": True}}, "config.batch_size"),
    ({"params": {"src_audio": "/etc/passwd"}}, "params.src_audio"),
    ({"settings": {}}, "settings"),
    ({"params": {"duration": 5000.0}}, "duration"),            # checked by the gateway
    ({"config": {"audio_format": "aiff"}}, "config.audio_format"),
])
def test_bad_generation_requests_are_refused_naming_the_field(http: httpx.Client, body: dict, field: str) -> None:
    error = error_of(http.post("/v1/generations", json=body), 400)
    assert error["field"] == field and error["code"] == "INVALID_ARGUMENT"


def test_malformed_bodies_and_types(http: httpx.Client) -> None:
    error_of(http.post("/v1/generations", content=b'{"params": {', headers={"content-type": "application/json"}), 400)
    error_of(http.post("/v1/generations", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    error_of(http.post("/v1/generations", content=b"caption=x", headers={"content-type": "text/plain"}), 415)
    error_of(http.get("/v1/jobs/x/events", headers={"Last-Event-ID": "abc"}), 400)
    error_of(http.post("/v1/format-sample", json={"caption": "x", "user_metadata": {"bpm": "fast"}}), 400)


def test_lm_routes(http: httpx.Client) -> None:
    sample = http.post("/v1/create-sample", json={"query": "a calm piano piece", "instrumental": True})
    assert sample.status_code == 200, sample.text
    assert {"caption", "lyrics", "bpm", "duration", "keyscale", "language", "timesignature"} <= set(sample.json())
    formatted = http.post("/v1/format-sample", json={"caption": "latin pop", "lyrics": "[Verse]\nhola",
                                                     "user_metadata": {"bpm": 100}})
    assert formatted.status_code == 200, formatted.text
    assert {"caption", "lyrics", "bpm", "duration", "keyscale", "language", "timesignature"} <= set(formatted.json())
    understood = http.post("/v1/understand", json={"audio_codes": format_codes(list(range(100, 150)))})
    assert understood.status_code == 200, understood.text
    assert isinstance(understood.json()["caption"], str)


def test_probes_and_openapi(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}
    document = http.get("/openapi.json").json()
    assert {"/v1/generations", "/v1/jobs/{request_id}/events", "/v1/jobs/{request_id}/items/{item_index}/audio",
            "/v1/understand", "/v1/create-sample", "/v1/format-sample"} <= set(document["paths"])
    assert "GenerationParams" in document["components"]["schemas"]
    assert http.get("/docs").status_code == 200


@pytest.fixture(scope="module")
def small_edge(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second edge on the same gateway: heartbeat every 50 ms, bodies up to 0.25 MiB."""
    folder = tmp_path_factory.mktemp("small-edge")
    port_file, log_path = folder / "http.port", folder / "http.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "http_service", "--gateway",
                                    stack.services["gateway"].address, "--port", "0", "--port-file", str(port_file),
                                    "--heartbeat-s", "0.05", "--max-body-mb", "0.25"],
                                   stdout=log, stderr=subprocess.STDOUT)
    edge = ServiceProcess("small-edge", process, Path(port_file), Path(log_path))
    try:
        edge.wait_port(60)
        yield f"http://{edge.address}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_heartbeats_while_silent_and_the_body_limit(small_edge: str) -> None:
    with httpx.Client(base_url=small_edge, timeout=300) as http:
        big = http.post("/v1/generations", content=b" " * 300_000, headers={"content-type": "application/json"})
        assert error_of(big, 413)["code"] == "PAYLOAD_TOO_LARGE"
        request_id = http.post("/v1/generations", json=generation(seed=14, duration=60.0)).json()["request_id"]
        seen = []
        with http.stream("GET", f"/v1/jobs/{request_id}/events?after=1") as reply:
            for message in iter_sse(reply.iter_lines()):
                seen.append(message)
                if message.is_comment:
                    break  # the job was silent for a heartbeat period
        assert seen[-1].is_comment and seen[-1].comment == "heartbeat"
        assert all(int(m.id) >= 2 for m in seen if not m.is_comment)
        assert http.post(f"/v1/jobs/{request_id}/cancel").json()["state"] == "cancelled"
