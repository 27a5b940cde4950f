"""LoRA adapters through the gateway: upload to every DiT replica (they share the checkpoint
volume here), list, generate with an adapter and a blend, delete; unknown ids refused before the
LM runs."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from gateway import sdk
from shared.types import GenerationConfig, GenerationParams
from tests.e2e.helpers import lms, metric, quick_params, rpc_error

CONFIG = GenerationConfig(batch_size=1, seeds=[3], audio_format="wav")


def waveform(client, params: GenerationParams) -> np.ndarray:
    result = sdk.generate_music(client, params, CONFIG)
    assert result.success, result.error
    return result.audios[0].tensor.numpy()


def test_upload_list_generate_delete(client, checkpoints, stack):
    info = sdk.upload_lora(client, "e2e-style", checkpoints / "loras" / "tiny-attn")
    assert (info["lora_id"], info["rank"]) == ("e2e-style", 4)
    assert info["targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    again = sdk.upload_lora(client, "e2e-style", checkpoints / "loras" / "tiny-attn")
    assert again["already_present"] is True
    listed = sdk.list_loras(client, ("e2e-style",))
    assert [(i["lora_id"], i["loaded_on"]) for i in listed] == [("e2e-style", [])]

    plain = waveform(client, quick_params())
    styled = waveform(client, quick_params(lora_id="e2e-style", lora_scale=1.0))
    blended = waveform(client, quick_params(lora_id="e2e-style", lora_scale=0.5, loras=[("tiny-mlp", 1.0)]))
    assert plain.shape == styled.shape == blended.shape
    assert np.abs(styled - plain).max() > 3e-3 and np.abs(blended - styled).max() > 3e-3
    loaded_on = sdk.list_loras(client, ("e2e-style",))[0]["loaded_on"]
    assert len(loaded_on) >= 1 and set(loaded_on) <= {s.address for n, s in stack.services.items() if "dit" in n}

    sdk.delete_lora(client, "e2e-style")
    assert sdk.list_loras(client, ("e2e-style",)) == []
    error = rpc_error(lambda: sdk.delete_lora(client, "e2e-style"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("params, named", [
    (GenerationParams(caption="city pop", thinking=True, lora_id="no-such-style"), "no-such-style"),
    (GenerationParams(caption="city pop", thinking=True, loras=[("tiny-attn", 0.5), ("gone-style", 1.0)]),
     "gone-style"),
])
def test_unknown_adapter_is_refused_before_the_lm_runs(client, stack, params, named):
    plans_before = metric(lms(stack), "acestep_rpc_requests_total", method="Plan")
    result = sdk.generate_music(client, params, CONFIG)
    assert not result.success
    assert result.error.startswith("INVALID_ARGUMENT") and f"lora_id {named!r} is not a known adapter" in result.error
    assert metric(lms(stack), "acestep_rpc_requests_total", method="Plan") == plans_before


def test_bad_uploads_are_refused_naming_the_problem(client, checkpoints, tmp_path):
    folder = tmp_path / "lokr"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((checkpoints / "loras" / "tiny-attn" / "adapter_config.json")
                                                .read_text().replace('"LORA"', '"LOKR"'))
    (folder / "adapter_model.safetensors").write_bytes(
        (checkpoints / "loras" / "tiny-attn" / "adapter_model.safetensors").read_bytes())
    error = rpc_error(lambda: sdk.upload_lora(client, "lokr-style", folder))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PEFT LoKr adapters are not supported" in error.details()
    error = rpc_error(lambda: sdk.upload_lora(client, "bad/id", checkpoints / "loras" / "tiny-attn"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "lora_id must start with a letter" in error.details()
    assert sdk.list_loras(client, ("lokr-style",)) == []
