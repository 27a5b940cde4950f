"""ACE-Step REST compatibility through the real stack and the real HTTP edge: every curl example
of the upstream API document (``data/upstream_api_curl.txt``) run with ``curl`` unchanged except
host and port, a release_task → query_result → /v1/audio round trip, and the gateway's keys and
queue limit seen through the envelope (a second gateway with a key and room for one job)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import soundfile

from gateway.serve import LocalStack
from shared.audio import decode_audio, encode_audio
from shared.constants import SAMPLE_RATE_HZ
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from tests.e2e.helpers import wait_until

CURL_FILE = Path(__file__).resolve().parent / "data" / "upstream_api_curl.txt"
UPSTREAM_BASE = "http://localhost:8001"
UPSTREAM_SONG = "/path/to/local/song.mp3"
ENVELOPE = {"data", "code", "error", "timestamp", "extra"}
SAMPLE_KEYS = {"caption", "lyrics", "bpm", "key_scale", "time_signature", "duration", "vocal_language"}
RESULT_KEYS = {"file", "wave", "status", "create_time", "env", "prompt", "lyrics", "metas", "generation_info",
               "seed_value", "lm_model", "dit_model", "progress", "stage"}
METAS_KEYS = {"bpm", "duration", "genres", "keyscale", "timesignature"}
MP3_FRAME_SAMPLES = 1152
ROUND_TRIP = {"prompt": "lo-fi piano loop", "audio_duration": 10, "inference_steps": 2, "batch_size": 1,
              "audio_format": "mp3", "use_random_seed": False, "seed": 42, "bpm": 90, "key_scale": "C major",
              "time_signature": "4", "use_cot_caption": False, "use_cot_language": False}


def _examples() -> list[tuple[str, str]]:
    """``(route, command)`` of every example, in the document's order."""
    parts = re.split(r"^## .*$", CURL_FILE.read_text(), flags=re.M)[1:]
    commands = [part.strip() for part in parts]
    return [(re.search(r"localhost:8001(/[a-z0-9_/]+)", c).group(1), c) for c in commands]


EXAMPLES = _examples()


@pytest.fixture(scope="module")
def curl_dir(tmp_path_factory: pytest.TempPathFactory, source_wav: bytes) -> Path:
    """Where the examples run; holds the song the upload example names (the generated source, as MP3)."""
    folder = tmp_path_factory.mktemp("curl")
    waveform, _ = decode_audio(source_wav, field="source")
    (folder / "song.mp3").write_bytes(encode_audio(waveform, "mp3"))
    return folder


def run_curl(command: str, http_url: str, folder: Path) -> str:
    local = command.replace(UPSTREAM_BASE, http_url).replace(UPSTREAM_SONG, str(folder / "song.mp3"))
    done = subprocess.run(["bash", "-c", local], cwd=folder, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def _enveloped(body: dict, code: int = 200):
    """The envelope's ``data`` (success) or ``error`` text (failure), after checking its shape."""
    assert set(body) >= ENVELOPE and body["code"] == code, body
    assert isinstance(body["timestamp"], int) and body["extra"] is None
    if code == 200:
        assert body["error"] is None
        return body["data"]
    assert body["data"] is None and isinstance(body["error"], str) and body["error"]
    return body["error"]


def _query(http: httpx.Client, task_id: str, **headers: str) -> dict:
    reply = http.post("/query_result", json={"task_id_list": [task_id]}, headers=headers)
    (entry,) = _enveloped(reply.json())
    assert set(entry) >= {"task_id", "status", "result", "progress_text"} and entry["task_id"] == task_id
    assert isinstance(entry["result"], str)  # a JSON string, as upstream returns it
    return entry


def _check_released(data: dict, command: str, stub, http_url: str) -> None:
    assert set(data) == {"task_id", "status", "queue_position"} and data["status"] == "queued"
    assert isinstance(data["queue_position"], int) and data["queue_position"] >= 0
    key = "your-api-key" if "Bearer your-api-key" in command else ""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    stub.CancelJob(gw.JobRequest(request_id=data["task_id"]), metadata=metadata)  # keep the CI short
    with httpx.Client(base_url=http_url, timeout=60) as http:
        entry = _query(http, data["task_id"], **({"Authorization": f"Bearer {key}"} if key else {}))
    if entry["status"] == 2:  # cancelled (1 only if it finished first)
        (item,) = json.loads(entry["result"])
        assert item["stage"] == "failed" and "CANCELLED" in item["error"] and entry["progress_text"]
    else:
        assert entry["status"] == 1


@pytest.mark.parametrize("route, command", EXAMPLES, ids=[f"{i}{route}" for i, (route, _) in enumerate(EXAMPLES)])
def test_every_upstream_curl_example(route, command, http_url, stub, curl_dir) -> None:
    out = run_curl(command, http_url, curl_dir)
    if route == "/v1/audio":  # a path of upstream's server: never opened here
        written = curl_dir / "output.mp3"
        _enveloped(json.loads(written.read_text()), code=404)
        written.unlink()
        return
    data = _enveloped(json.loads(out))
    if route == "/release_task":
        _check_released(data, command, stub, http_url)
    elif route == "/query_result":
        (entry,) = data
        assert entry["task_id"] == "550e8400-e29b-41d4-a716-446655440000" and entry["status"] == 2
        (item,) = json.loads(entry["result"])
        assert {"file", "wave", "status", "create_time", "env", "error"} <= set(item) and item["status"] == 2
    elif route in ("/format_input", "/create_random_sample"):
        assert set(data) == SAMPLE_KEYS and isinstance(data["caption"], str) and isinstance(data["lyrics"], str)
        if route == "/format_input":  # the example's param_obj: the LM keeps the user's metadata
            assert (data["duration"], data["vocal_language"]) == (180, "en")
    elif route == "/v1/models":
        assert set(data) == {"models", "default_model"}  # the stack's DiT folder, named by `acestep serve`
        assert data["models"] == [{"name": data["default_model"], "is_default": True}]
        assert data["default_model"].startswith("acestep-v15-")
    else:
        assert route == "/v1/stats" and set(data) >= {"jobs", "queue_size", "queue_maxsize", "avg_job_seconds"}
        jobs = data["jobs"]
        assert set(jobs) == {"total", "queued", "running", "succeeded", "failed"} and jobs["total"] >= 1
        assert jobs["queued"] + jobs["running"] + jobs["succeeded"] + jobs["failed"] == jobs["total"]


def test_release_query_download_round_trip(http_url, stub) -> None:
    with httpx.Client(base_url=http_url, timeout=120) as http:
        task_id = _enveloped(http.post("/release_task", json=ROUND_TRIP).json())["task_id"]
        snapshots: list[dict] = []

        def probe() -> dict:
            snapshots.append(_query(http, task_id))
            return snapshots[-1]

        entry = wait_until(probe, lambda e: e["status"] != 0, 600, "the task to finish")
        for running in snapshots[:-1]:
            (item,) = json.loads(running["result"])
            assert running["status"] == 0 and 0.0 <= item["progress"] <= 1.0 and isinstance(item["stage"], str)
            assert isinstance(running["progress_text"], str)
        assert entry["status"] == 1, entry
        (item,) = json.loads(entry["result"])
        assert RESULT_KEYS <= set(item) and set(item["metas"]) == METAS_KEYS
        assert (item["status"], item["stage"], item["progress"], item["seed_value"]) == (1, "succeeded", 1.0, "42")
        assert (item["metas"]["bpm"], item["metas"]["duration"], item["metas"]["timesignature"]) == (90, 10, "4")
        assert item["file"].startswith("/v1/audio?path=") and item["file"].endswith(".mp3")

        reply = http.get(item["file"])
        assert reply.status_code == 200 and reply.headers["content-type"] == "audio/mpeg"
        assert int(reply.headers["content-length"]) == len(reply.content)
        info = soundfile.info(io.BytesIO(reply.content))
        assert (info.format, info.samplerate, info.channels) == ("MP3", SAMPLE_RATE_HZ, 2)
        assert abs(info.frames - 10 * SAMPLE_RATE_HZ) <= MP3_FRAME_SAMPLES
        _check_ranges(http, item["file"], reply.content)

        assert http.get(item["file"], headers={"X-API-Key": "somebody-else"}).status_code == 404  # not theirs
        _enveloped(http.get("/v1/audio?path=..%2F..%2Fetc%2Fpasswd").json(), code=404)
        refused = http.post("/release_task", json={"prompt": "x", "task_type": "repaint", "src_audio_path": "/etc/passwd"})
        assert "server-side paths" in _enveloped(refused.json(), code=400)
        again = http.post("/release_task", json={"prompt": "repaint it", "task_type": "repaint", "batch_size": 1,
                                                 "src_audio_path": http_url + item["file"]})  # a file it issued
        stub.CancelJob(gw.JobRequest(request_id=_enveloped(again.json())["task_id"]))
        assert _enveloped(http.get("/health").json()) == {"status": "ok", "service": "ACE-Step API", "version": "1.0"}


def _check_ranges(http: httpx.Client, url: str, whole: bytes) -> None:
    part = http.get(url, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == whole[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(whole)}"
    tail = http.get(url, headers={"Range": "bytes=-500"})
    assert tail.status_code == 206 and tail.content == whole[-500:]
    assert http.get(url, headers={"Range": f"bytes={len(whole)}-"}).status_code == 416


@pytest.fixture(scope="module")
def keyed_edge(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory):
    """An HTTP edge in front of a second gateway with the API key ``k1`` and room for one job
    (``--max-active 1 --max-queued 0``), on the stack's LM and first DiT."""
    previous = os.environ.get("ACESTEP_API_KEYS")
    os.environ["ACESTEP_API_KEYS"] = "k1"
    try:
        gateway = stack._spawn("gateway-keyed", "gateway", [
            "--dit", stack.services["dit0"].address, "--lm", stack.services["lm0"].address, "--max-active", "1",
            "--max-queued", "0", "--health-interval-s", "1", "--job-dir", str(tmp_path_factory.mktemp("keyed-jobs"))])
    finally:
        if previous is None:
            del os.environ["ACESTEP_API_KEYS"]
        else:
            os.environ["ACESTEP_API_KEYS"] = previous
    services = [gateway]
    try:
        gateway.wait_port(120.0)
        services.append(stack._spawn("http-keyed", "http_service", ["--gateway", gateway.address]))
        services[-1].wait_port(120.0)
        yield f"http://{services[-1].address}", gateway.address
    finally:
        for service in services:
            service.process.send_signal(signal.SIGTERM)
        for service in services:
            service.process.wait(60)


def test_keys_and_a_full_queue_come_back_in_the_envelope(keyed_edge) -> None:
    import grpc

    from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc

    url, gateway_address = keyed_edge
    long_job = {"prompt": "slow ambient drone", "audio_duration": 120, "batch_size": 1, "use_cot_caption": False,
                "use_cot_language": False}
    with httpx.Client(base_url=url, timeout=120) as http:
        assert "API key" in _enveloped(http.post("/release_task", json=long_job).json(), code=401)
        _enveloped(http.post("/release_task", json=long_job, headers={"Authorization": "Bearer k2"}).json(), code=401)
        _enveloped(http.get("/v1/models").json(), code=401)
        task_id = _enveloped(http.post("/release_task", json={**long_job, "ai_token": "k1"}).json())["task_id"]
        wait_until(lambda: json.loads(_query(http, task_id, Authorization="k1")["result"])[0]["stage"],
                   lambda stage: stage != "queued", 120, "the first job to hold the gateway's one slot")
        busy = http.post("/release_task", json=long_job, headers={"Authorization": "Bearer k1"})
        assert busy.status_code == 429 and "capacity" in _enveloped(busy.json(), code=429)
        with grpc.insecure_channel(gateway_address) as channel:
            gateway_pb2_grpc.GatewayServiceStub(channel).CancelJob(gw.JobRequest(request_id=task_id),
                                                                   metadata=(("x-api-key", "k1"),))
        assert _query(http, task_id, Authorization="Bearer k1")["status"] == 2
        _enveloped(http.post("/query_result", json={"task_id_list": [task_id]}).json(), code=401)
        stats = _enveloped(http.get("/v1/stats", params={"ai_token": "k1"}).json())
        assert stats["jobs"]["total"] == 1 and stats["jobs"]["failed"] == 1
