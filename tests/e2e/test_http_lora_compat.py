"""ACE-Step's /v1/lora/* routes through the real HTTP edge and gateway: they edit the calling API
key's LoRA default, which the gateway blends into that key's generations that name no adapter.
The e2e gateway has no key list, so every key is accepted and is its own caller."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest

from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from tests.e2e.helpers import decode_file, rpc_error

KEY_A, KEY_B = "lora-compat-a", "lora-compat-b"
TINY_ADAPTERS = {"tiny-attn", "tiny-mlp", "tiny-rslora"}
RELEASE = {"prompt": "lo-fi piano loop", "audio_duration": 10, "inference_steps": 2, "batch_size": 1,
           "audio_format": "wav", "use_random_seed": False, "seed": 42, "bpm": 90, "key_scale": "C major",
           "time_signature": "4", "thinking": False, "use_cot_caption": False, "use_cot_language": False}


@pytest.fixture(scope="module")
def http(http_url: str):
    with httpx.Client(base_url=http_url, timeout=120) as connection:
        yield connection


def call(http: httpx.Client, key: str, method: str, path: str, body: dict | None = None, code: int = 200):
    """The envelope's ``data`` (200) or ``error`` text, after checking the envelope and the status."""
    reply = http.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
    envelope = reply.json()
    assert reply.status_code == envelope["code"] == code, envelope
    assert {"data", "code", "error", "timestamp", "extra"} <= set(envelope)
    return envelope["data"] if code == 200 else envelope["error"]


def generated(http: httpx.Client, stub, key: str) -> tuple[gw.GenerateResult, np.ndarray]:
    """A release_task (no LoRA field) run to its end: the job's result and its waveform."""
    task_id = call(http, key, "POST", "/release_task", RELEASE)["task_id"]
    metadata = (("x-api-key", key),)
    events = list(stub.Watch(gw.WatchRequest(request_id=task_id), metadata=metadata, timeout=600))
    assert events[-1].WhichOneof("event") == "result", events[-1]
    audio = b"".join(c.data for c in stub.GetAudio(gw.GetAudioRequest(request_id=task_id), metadata=metadata))
    return events[-1].result, decode_file(audio)[0]


def test_status_lists_the_registry_and_bad_requests_are_refused(http) -> None:
    status = call(http, KEY_B, "GET", "/v1/lora/status")
    assert (status["lora_loaded"], status["use_lora"], status["adapters"], status["active_adapter"]) == (
        False, False, [], None)
    assert TINY_ADAPTERS <= {entry["lora_id"] for entry in status["available"]}
    assert all(entry["rank"] > 0 and entry["size_bytes"] > 0 for entry in status["available"])
    for body, code, expected in (
        ({}, 400, "lora_path: required"),
        ({"lora_path": "/home/me/lora_output/final"}, 400, "files are never read"),
        ({"lora_path": "checkpoints/loras/.."}, 400, "is not an adapter id"),
        ({"lora_path": "checkpoints/loras/no-such-style"}, 404, "no adapter 'no-such-style'"),
        ({"lora_path": "tiny-attn", "rank": 4}, 400, "'rank': unknown field"),
    ):
        assert expected in call(http, KEY_B, "POST", "/v1/lora/load", body, code=code)
    assert "no LoRA adapter is loaded" in call(http, KEY_B, "POST", "/v1/lora/scale", {"scale": 0.5}, code=400)
    assert "no LoRA adapter is loaded" in call(http, KEY_B, "POST", "/v1/lora/toggle", {"use_lora": True}, code=400)
    assert "use_lora: expected true or false" in call(http, KEY_B, "POST", "/v1/lora/toggle", {"use_lora": "maybe"},
                                                      code=400)
    assert call(http, KEY_B, "POST", "/v1/lora/unload")["message"].startswith("no LoRA adapter was loaded")
    assert call(http, KEY_B, "GET", "/v1/lora/status")["lora_loaded"] is False


def test_the_grpc_default_refuses_what_a_request_would(stub) -> None:
    metadata = (("x-api-key", "lora-compat-grpc"),)
    for entries, expected in (
        ([gw.DefaultLora(lora_id="no-such-style", scale=1.0)], "lora_id 'no-such-style' is not a known adapter"),
        ([gw.DefaultLora(lora_id="tiny-attn", scale=1.5)], "loras[0].scale"),
        ([gw.DefaultLora(lora_id="tiny-attn", scale=1.0), gw.DefaultLora(lora_id="tiny-mlp", scale=1.0, name="tiny-attn")],
         "loras[1].name 'tiny-attn' is used twice"),
        ([gw.DefaultLora(lora_id="../loras", scale=1.0)], "loras[0].lora_id must start with a letter or digit"),
    ):
        request = gw.SetLoraDefaultRequest(lora_default=gw.LoraDefault(loras=entries, enabled=True))
        error = rpc_error(lambda: stub.SetLoraDefault(request, metadata=metadata))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in error.details()
    assert not stub.GetLoraDefault(gw.GetLoraDefaultRequest(), metadata=metadata).lora_default.loras


def test_load_scale_generate_toggle_unload_for_one_key_only(http, stub) -> None:
    loaded = call(http, KEY_A, "POST", "/v1/lora/load", {"lora_path": "./checkpoints/loras/tiny-attn/"})
    assert (loaded["lora_id"], loaded["lora_path"]) == ("tiny-attn", "./checkpoints/loras/tiny-attn/")
    assert "already in use" in call(http, KEY_A, "POST", "/v1/lora/load", {"lora_path": "tiny-attn"}, code=400)
    assert "scale: must be in [0.0, 1.0]" in call(http, KEY_A, "POST", "/v1/lora/scale", {"scale": 1.5}, code=400)
    assert "no loaded adapter 'other'" in call(http, KEY_A, "POST", "/v1/lora/scale",
                                               {"scale": 0.5, "adapter_name": "other"}, code=404)
    assert call(http, KEY_A, "POST", "/v1/lora/scale", {"scale": 0.75})["scale"] == 0.75
    status = call(http, KEY_A, "GET", "/v1/lora/status")
    assert (status["lora_loaded"], status["use_lora"], status["lora_scale"], status["active_adapter"],
            status["scales"], status["adapter_type"]) == (True, True, 0.75, "tiny-attn", {"tiny-attn": 0.75}, "lora")
    assert call(http, KEY_B, "GET", "/v1/lora/status")["lora_loaded"] is False  # another key: untouched
    stored = stub.GetLoraDefault(gw.GetLoraDefaultRequest(), metadata=(("x-api-key", KEY_A),)).lora_default
    assert [(e.lora_id, e.scale) for e in stored.loras] == [("tiny-attn", 0.75)] and stored.enabled

    with_default, styled = generated(http, stub, KEY_A)
    assert [(w.lora_id, w.scale) for w in with_default.params.loras] == [("tiny-attn", 0.75)]
    assert call(http, KEY_A, "POST", "/v1/lora/toggle", {"use_lora": False}) == {"message": "LoRA disabled",
                                                                                 "use_lora": False}
    assert call(http, KEY_A, "GET", "/v1/lora/status")["use_lora"] is False
    without, plain = generated(http, stub, KEY_A)
    assert not without.params.loras and not without.params.lora_id
    same_conditions = [gw.GenerateResult(params=r.params) for r in (with_default, without)]
    for result in same_conditions:
        result.params.ClearField("loras")
    assert same_conditions[0] == same_conditions[1]  # everything but the adapter was the same
    assert plain.shape == styled.shape and np.abs(styled - plain).max() > 3e-3

    assert call(http, KEY_B, "POST", "/v1/lora/unload")["message"].startswith("no LoRA adapter was loaded")
    assert call(http, KEY_A, "GET", "/v1/lora/status")["lora_loaded"] is True  # B's unload left A's default
    assert "unloaded" in call(http, KEY_A, "POST", "/v1/lora/unload")["message"]
    status = call(http, KEY_A, "GET", "/v1/lora/status")
    assert (status["lora_loaded"], status["use_lora"], status["adapters"]) == (False, False, [])
