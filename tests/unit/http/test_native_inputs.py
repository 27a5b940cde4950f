"""Hostile input against the native API (``/v1``), in process: the ASGI app with its gateway link
pointed at a closed port. Malformed JSON, wrong types, unknown fields, oversize bodies, odd
multipart parts and odd job ids get a 4xx in the native error shape naming the problem, never a
500; input that passes the edge's checks reaches the (absent) gateway and gets 503. The app keeps
answering throughout. Also: which caller credentials go to the gateway, and the SSE reader."""

from __future__ import annotations

import json
import socket
import types
import typing
import urllib.parse

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from http_service.app import HttpSettings, create_app
from http_service.forms import ConfigModel, ParamsModel
from http_service.gateway_link import credentials
from http_service.sse_client import iter_sse

MAX_BODY_BYTES = 64 * 1024
JSON_ROUTES = ("/v1/generations", "/v1/understand", "/v1/create-sample", "/v1/format-sample")
JOB_PATHS = ("/v1/jobs/{id}", "/v1/jobs/{id}/events", "/v1/jobs/{id}/items/0/audio", "/v1/jobs/{id}/cancel")
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


@pytest.fixture(scope="module")
def client():
    app = create_app(HttpSettings(gateway=f"127.0.0.1:{_closed_port()}", max_body_bytes=MAX_BODY_BYTES))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(reply, statuses: tuple[int, ...]) -> dict:
    assert reply.status_code in statuses, (reply.status_code, reply.text[:300])
    error = reply.json()["error"]
    assert error["status"] == reply.status_code and isinstance(error["message"], str) and error["message"]
    return error


def still_up(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def _not_a_json_object(raw: bytes) -> bool:
    try:
        return not isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return True


@PROPERTY
@given(route=st.sampled_from(JSON_ROUTES),
       raw=st.one_of(st.binary(min_size=1, max_size=200), st.text(min_size=1, max_size=200).map(str.encode),
                     st.sampled_from([b"{", b'{"params":', b"[1, 2]", b'"text"', b"null", b"{" * 5000 + b"}" * 5000,
                                      b'{"caption": NaN}', b"\xff\xfe{}", b'{"a": 1' + b"0" * 5000 + b"}"]))
       .filter(lambda raw: raw.strip() and _not_a_json_object(raw)))
def test_malformed_json_is_a_400_naming_the_body(client, route, raw) -> None:
    reply = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert error_of(reply, (400,))["field"] == "body"
    still_up(client)


KNOWN = set(ParamsModel.model_fields) | {"src_audio", "reference_audio"}


@PROPERTY
@given(section=st.sampled_from(["params", "config", None]),
       name=st.text(min_size=1, max_size=30).filter(lambda n: n not in KNOWN and n not in ("params", "config")),
       value=st.one_of(st.none(), st.integers(), st.text(max_size=10)))
def test_unknown_fields_are_named(client, section, name, value) -> None:
    assume(not (section == "config" and name in ConfigModel.model_fields))
    body = {section: {name: value}} if section else {name: value}
    error = error_of(client.post("/v1/generations", json=body), (400,))
    assert error["field"] == (f"{section}.{name}" if section else name) and "unknown field" in error["message"]
    still_up(client)


def _plain_type(annotation) -> type | None:
    """str / bool / int / float for a field of that type (or Optional of it), else None."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _plain_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _plain_type(args[0]) if len(args) == 1 else None
    return annotation if annotation in (str, bool, int, float) else None


SCALAR_FIELDS = {name: kind for name, info in ParamsModel.model_fields.items()
                 if (kind := _plain_type(info.annotation)) is not None}
WRONG = {
    str: st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                   st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                              max_size=2)),
    bool: st.one_of(st.integers(), st.text(max_size=5), st.lists(st.booleans(), max_size=2)),
    int: st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2),
                   st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
                   st.integers(min_value=2**63, max_value=2**80)),
    float: st.one_of(st.text(max_size=5), st.booleans(),
                     st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=2)),
}


@PROPERTY
@given(data=st.data(), name=st.sampled_from(sorted(SCALAR_FIELDS)))
def test_wrong_types_are_named(client, data, name) -> None:
    value = data.draw(WRONG[SCALAR_FIELDS[name]])
    error = error_of(client.post("/v1/generations", json={"params": {name: value}}), (400,))
    assert error["field"] == f"params.{name}" and error["code"] == "INVALID_ARGUMENT"
    still_up(client)


def test_valid_input_reaches_the_gateway() -> None:
    """What passes the edge's checks is the gateway's to judge: here it is absent (503)."""
    app = create_app(HttpSettings(gateway=f"127.0.0.1:{_closed_port()}"))
    with TestClient(app, raise_server_exceptions=False) as client:
        body = {"params": {"caption": "x", "duration": 30, "loras": [["a", 0.5]], "timesteps": [1, 0.5]},
                "config": {"seeds": 3, "batch_size": 1}}
        assert error_of(client.post("/v1/generations", json=body), (503,))["code"] == "UNAVAILABLE"
        assert client.get("/readyz").status_code == 503


@PROPERTY
@given(size=st.integers(min_value=MAX_BODY_BYTES + 1, max_value=4 * MAX_BODY_BYTES),
       route=st.sampled_from(JSON_ROUTES), chunked=st.booleans())
def test_oversize_bodies_are_413(client, size, route, chunked) -> None:
    if chunked:
        def chunks():
            for start in range(0, size, 8192):
                yield b" " * min(8192, size - start)
        reply = client.post(route, content=chunks(), headers={"content-type": "application/json"})
    else:
        reply = client.post(route, content=b" " * size, headers={"content-type": "application/json"})
    assert error_of(reply, (413,))["code"] == "PAYLOAD_TOO_LARGE"
    still_up(client)


@PROPERTY
@given(parts=st.lists(st.tuples(st.sampled_from(["request", "src_audio", "reference_audio", "audio", "x", "../a"]),
                                st.booleans(), st.binary(max_size=40)), min_size=1, max_size=4))
def test_multipart_parts_are_checked(client, parts) -> None:
    files = [(name, ("f.bin", data) if as_file else (None, data)) for name, as_file, data in parts]
    reply = client.post("/v1/generations", files=files)
    names = [name for name, _, _ in parts]
    allowed = {"request", "src_audio", "reference_audio"}
    audio_as_text = any(n in ("src_audio", "reference_audio") and not f for n, f, _ in parts)
    if set(names) - allowed or len(names) != len(set(names)) or audio_as_text:
        error_of(reply, (400,))
    else:
        error_of(reply, (400, 503))  # a request part that is not a GenerationBody is a 400
    still_up(client)


ODD_IDS = st.one_of(st.sampled_from(["..", "%2e%2e", "%2E%2E%2F%2E%2E", "/etc/passwd", "%2Fetc%2Fpasswd", "%00",
                                     "a%00b", "C:%5Cwindows", "~root", "%252e%252e", " ", "x" * 129]),
                    st.text(min_size=1, max_size=200))


@PROPERTY
@given(job_id=ODD_IDS, template=st.sampled_from(JOB_PATHS))
def test_odd_job_ids_and_paths_are_4xx_or_unavailable(client, job_id, template) -> None:
    path = template.replace("{id}", urllib.parse.quote(job_id, safe="%/:~"))
    method = "POST" if path.endswith("/cancel") else "GET"
    reply = client.request(method, path)
    assert reply.status_code != 500
    error = error_of(reply, (400, 404, 405, 503))
    assert reply.status_code != 503 or error["code"] == "UNAVAILABLE"
    still_up(client)


@pytest.mark.parametrize("job_id", ["%00", "a%00b", "x" * 129, "%0a"])
def test_ids_no_gateway_could_hold_are_404_at_the_edge(client, job_id) -> None:
    for template in JOB_PATHS:
        path = template.replace("{id}", job_id)
        reply = client.post(path) if path.endswith("/cancel") else client.get(path)
        assert error_of(reply, (404,))["field"] == "request_id"


@PROPERTY
@given(value=st.text(min_size=1, max_size=30).filter(lambda v: not v.strip().isdigit() and v.strip()
                                                     and v.isprintable() and v.isascii()))
def test_a_bad_last_event_id_is_a_400(client, value) -> None:
    reply = client.get("/v1/jobs/some-job/events", headers={"Last-Event-ID": value})
    assert error_of(reply, (400,))["field"] == "Last-Event-ID"


@pytest.mark.parametrize("query", ["after=-1", "after=x", "after=99999999999999999999"])
def test_a_bad_after_is_a_400(client, query) -> None:
    assert error_of(client.get(f"/v1/jobs/some-job/events?{query}"), (400,))["field"] == "after"


def test_content_types_other_than_json_or_multipart_are_415(client) -> None:
    for kind in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        reply = client.post("/v1/generations", content=b"caption=x", headers={"content-type": kind})
        assert error_of(reply, (415,))["field"] == "content-type"


def _request(headers: dict[str, str], query: str = "") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw, "query_string": query.encode()})


@pytest.mark.parametrize("headers, query, expected", [
    ({"Authorization": "Bearer k1"}, "", (("authorization", "Bearer k1"),)),
    ({"Authorization": "bearer  k1 "}, "", (("authorization", "Bearer k1"),)),
    ({"X-API-Key": "k2"}, "", (("x-api-key", "k2"),)),
    ({}, "ai_token=k3", (("x-api-key", "k3"),)),
    ({"Authorization": "Bearer k1", "X-API-Key": "k2"}, "ai_token=k3", (("authorization", "Bearer k1"),)),
    ({"Authorization": "Bearer ", "X-API-Key": "k2"}, "", (("x-api-key", "k2"),)),
    ({"Authorization": "Basic dXNlcg=="}, "", ()),
    ({}, "", ()),
])
def test_credentials_forwarded_to_the_gateway(headers, query, expected) -> None:
    assert credentials(_request(headers, query)) == expected


def test_sse_reader_follows_the_standard() -> None:
    stream = ["retry: 100", ": heartbeat", "", "event: progress", "id: 7", "data: {\"a\":", "data: 1}", "",
              "data:x", "", "id: 8", ""]
    messages = list(iter_sse(stream))
    assert [m.is_comment for m in messages] == [True, False, False]
    assert (messages[1].event, messages[1].id, messages[1].json()) == ("progress", "7", {"a": 1})
    assert (messages[2].event, messages[2].data) == ("message", "x")
