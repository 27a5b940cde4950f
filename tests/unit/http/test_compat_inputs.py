"""Hostile input against the ACE-Step REST compatibility routes, in process (the ASGI app with its
gateway link pointed at a closed port): malformed JSON, wrong types, unknown fields, oversize
bodies, traversal paths. Every answer is a 4xx in the envelope naming the problem — never a 500 —
and input that passes the edge's checks gets 503 (no gateway), never a crash."""

from __future__ import annotations

import json
import socket
import urllib.parse

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from http_service.app import HttpSettings, create_app
from http_service.compat_audio import parse_file_id
from http_service.compat_fields import BY_SPELLING, FIELDS, IGNORED, REFUSED

POST_ROUTES = ("/release_task", "/query_result", "/format_input", "/create_random_sample")
MAX_BODY_BYTES = 64 * 1024
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


@pytest.fixture(scope="module")
def client():
    app = create_app(HttpSettings(gateway=f"127.0.0.1:{_closed_port()}", max_body_bytes=MAX_BODY_BYTES))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def assert_envelope(reply, statuses: tuple[int, ...]) -> dict:
    assert reply.status_code in statuses, (reply.status_code, reply.text[:300])
    body = reply.json()
    assert set(body) >= {"data", "code", "error", "timestamp", "extra"}
    assert body["code"] == reply.status_code and body["data"] is None
    assert isinstance(body["error"], str) and body["error"] and body["detail"] == body["error"]
    return body


def _not_json(raw: bytes) -> bool:
    try:
        return not isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return True


@PROPERTY
@given(route=st.sampled_from(POST_ROUTES),
       raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     st.sampled_from([b"{", b'{"a":', b"[1, 2]", b'"text"', b"null", b"{" * 5000 + b"}" * 5000,
                                      b'{"prompt": NaN}', b'{"a": 1' + b"0" * 5000 + b"}"]))
       .filter(lambda raw: raw.strip() and _not_json(raw)))
def test_malformed_json_is_a_400(client, route, raw) -> None:
    reply = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert_envelope(reply, (400,))


def _wrong_values(kind: str) -> st.SearchStrategy:
    containers = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                  max_size=2))
    not_numbers = st.text(min_size=1, max_size=12).filter(lambda s: s.strip() not in ("", "N/A") and not _number(s))
    if kind == "str":
        return st.one_of(containers, st.booleans())
    if kind in ("int", "seed"):
        not_numbers = not_numbers.filter(lambda s: "," not in s)  # "1,2" is a list of seeds
        return st.one_of(containers, st.booleans(), not_numbers,
                         st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()))
    if kind == "float":
        return st.one_of(containers, st.booleans(), not_numbers, st.sampled_from(["nan", "inf", "-Infinity"]))
    if kind == "bool":
        words = {"1", "true", "yes", "y", "on", "0", "false", "no", "n", "off"}
        return st.one_of(containers, st.integers().filter(lambda n: n not in (0, 1)),
                         st.floats(allow_nan=False, allow_infinity=False),  # JSON has no NaN or infinity
                         st.text(min_size=1, max_size=8).filter(
                             lambda s: s.strip().lower() not in words and s.strip() not in ("", "N/A")))
    return st.one_of(containers.filter(bool), st.booleans())  # timesteps: a list of non-numbers below


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


CHECKED = [f for f in FIELDS if f.kind in ("str", "int", "float", "bool", "seed") and f.fate != REFUSED
           and f.name not in ("ai_token",)]


@PROPERTY
@given(data=st.data(), spec=st.sampled_from(CHECKED))
def test_a_wrong_type_is_a_400_naming_the_field(client, data, spec) -> None:
    spelling = data.draw(st.sampled_from(spec.spellings))
    value = data.draw(_wrong_values(spec.kind))
    base = {} if spec.name == "prompt" else {"prompt": "lofi"}
    reply = client.post("/release_task", json={**base, spelling: value})
    body = assert_envelope(reply, (400,))
    assert body["error"].startswith(f"{spelling}: ")


@PROPERTY
@given(value=st.one_of(st.lists(st.text(max_size=5).filter(lambda s: s.strip() and not _number(s)), min_size=1,
                                max_size=4).map(",".join),
                       st.lists(st.sampled_from([[1], {"a": 1}, True]), min_size=1, max_size=3)))
def test_bad_timesteps_are_a_400(client, value) -> None:
    reply = client.post("/release_task", json={"prompt": "lofi", "timesteps": value})
    assert assert_envelope(reply, (400,))["error"].startswith("timesteps: ")


@PROPERTY
@given(route=st.sampled_from(POST_ROUTES),
       extra=st.dictionaries(st.text(min_size=1, max_size=20).filter(lambda k: k not in BY_SPELLING),
                             st.one_of(st.none(), st.integers(), st.text(max_size=10)), min_size=1, max_size=3))
def test_unknown_fields_are_a_400(client, route, extra) -> None:
    known = {"task_id_list", "taskIdList", "prompt", "lyrics", "temperature", "param_obj", "paramObj",
             "time_signature", "timeSignature", "sample_type", "sampleType", "ai_token", "aiToken"}
    extra = {key: value for key, value in extra.items() if key not in known} or {"__unknown__": 1}
    reply = client.post(route, json=extra)
    assert "unknown field" in assert_envelope(reply, (400,))["error"]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=30), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=10)


@PROPERTY
@given(route=st.sampled_from(POST_ROUTES), data=st.data())
def test_any_json_object_of_known_fields_never_crashes(client, route, data) -> None:
    names = [s for f in FIELDS if f.fate in (IGNORED, "mapped", "flow") for s in f.spellings] + [
        "task_id_list", "sample_type", "temperature", "param_obj"]
    body = data.draw(st.dictionaries(st.sampled_from(names), json_values, max_size=6))
    reply = client.post(route, json=body)
    if reply.status_code == 200:  # only an empty task_id_list can succeed without a gateway
        assert route == "/query_result" and reply.json()["data"] == []
    else:
        assert_envelope(reply, (400, 401, 413, 503))


@PROPERTY
@given(fields=st.dictionaries(st.sampled_from(["prompt", "inference_steps", "thinking", "bpm", "task_type"]),
                              st.text(max_size=20), max_size=4),
       upload_name=st.sampled_from(["src_audio", "ref_audio", "other_file", "prompt"]))
def test_multipart_forms_never_crash(client, fields, upload_name) -> None:
    reply = client.post("/release_task", data=fields, files={upload_name: ("song.mp3", b"\x00" * 64, "audio/mpeg")})
    assert_envelope(reply, (400, 503))
    if upload_name in ("other_file", "prompt"):
        assert reply.status_code == 400


def test_oversize_bodies_and_uploads_are_a_413(client) -> None:
    big = "x" * (MAX_BODY_BYTES + 1)
    assert client.post("/release_task", json={"prompt": big}).status_code == 413
    upload = client.post("/release_task", data={"prompt": "x"}, files={"src_audio": ("a.wav", big.encode())})
    assert upload.status_code == 413
    assert_envelope(client.get("/v1/audio", params={"path": "x.mp3"}), (404,))  # still serving


TRAVERSALS = ["../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
              "%252e%252e%252fetc%252fpasswd", "..%00.mp3", "..\x00.mp3", "....//....//etc/passwd",
              "/tmp/api_audio/abc123.mp3", "C:\\Windows\\win.ini", "..\\..\\boot.ini", "%2Ftmp%2Fapi_audio%2Fa.mp3",
              "file:///etc/passwd", "/proc/self/environ", "~/.ssh/id_rsa", "a/../../b.mp3", "./x.mp3", "%c0%ae%c0%ae/"]
SEGMENTS = ["..", ".", "/", "\\", "%2e", "%2f", "%252e", "%00", "\x00", "etc", "passwd", "x.mp3", "%5c", "~", ":"]


@PROPERTY
@given(path=st.one_of(st.sampled_from(TRAVERSALS), st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=8)
                      .map("".join), st.text(max_size=60)),
       encode=st.sampled_from(["raw", "once", "twice"]))
def test_audio_paths_other_than_issued_ids_are_a_404(client, path, encode) -> None:
    quoted = {"raw": urllib.parse.quote(path, safe="/%.:~\\"), "once": urllib.parse.quote(path, safe=""),
              "twice": urllib.parse.quote(urllib.parse.quote(path, safe=""), safe="")}[encode]
    assume(quoted and parse_file_id(urllib.parse.unquote(quoted)) is None)  # "path=" alone: a 400, below
    assert_envelope(client.get(f"/v1/audio?path={quoted}"), (404,))


def test_audio_without_a_path_is_a_400(client) -> None:
    assert_envelope(client.get("/v1/audio"), (400,))


@PROPERTY
@given(task_ids=st.one_of(st.lists(st.one_of(st.integers(), st.none(), st.just(""), st.text(min_size=129, max_size=140),
                                             st.just("a\nb")), min_size=1, max_size=3),
                          st.text(min_size=1, max_size=20).filter(lambda s: not s.strip().startswith("[")),
                          st.lists(st.just("id"), min_size=101, max_size=102)))
def test_bad_task_id_lists_are_a_400(client, task_ids) -> None:
    reply = client.post("/query_result", json={"task_id_list": task_ids})
    assert_envelope(reply, (400,))


def test_wrong_content_types_and_bad_keys() -> None:
    app = create_app(HttpSettings(gateway=f"127.0.0.1:{_closed_port()}"))
    with TestClient(app, raise_server_exceptions=False) as local:
        assert_envelope(local.post("/release_task", content=b"\x01\x02", headers={"content-type": "audio/mpeg"}), (415,))
        reply = local.post("/release_task", json={"prompt": "x"}, headers={"authorization": "Bearer caf\u00e9".encode("latin-1")})
        assert "API key" in assert_envelope(reply, (401,))["error"]
        assert_envelope(local.post("/release_task", json={"prompt": "x", "ai_token": ["k"]}), (400,))
        assert_envelope(local.get("/health"), (503,))
        assert_envelope(local.post("/release_task", json={"prompt": "lofi", "src_audio_path": "/etc/passwd"}), (400,))
