"""LoRA adapters through the DiT service's real gRPC on 127.0.0.1 (tiny turbo checkpoint, CPU).

Upload -> list -> synthesize with it -> delete; corrupt uploads refused naming the key; requests
with different adapters (and a blend, and none) coalesced into one diffusion batch.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools import tiny_checkpoints as tc
from dit_service.engine import DitEngine, EngineConfig
from dit_service.lora.format import CONFIG_FILE, WEIGHTS_FILE
from dit_service.pipeline import DitPipeline
from dit_service.servicer import DitServicer
from shared import convert
from shared.config import ServerConfig
from shared.grpc_server import GrpcServer, ServiceBinding
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.dit.v1 import dit_pb2, dit_pb2_grpc
from shared.types import GenerationParams
from tests.integration.dit.test_dit_service import Served, collect, expect_error, request

WINDOW_S = 0.5  # long enough for four concurrent requests (and their adapter loads) to meet
PARAMS = dict(caption="lofi piano", duration=10.0)
Q_A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-lora-checkpoints")
    wanted = (tc.TEXT_ENCODER_DIR, tc.VAE_DIR, tc.TURBO_DIR, tc.LORA_DIR)
    notes = tc.write_all(root, seed=0, steps=[step for step in tc.WRITER_STEPS if step.folder in wanted])
    assert not any(notes.values()), notes
    return root


@pytest.fixture(scope="module")
async def turbo(checkpoints: Path):
    pipeline = await asyncio.to_thread(DitPipeline.load, checkpoints, tc.TURBO_DIR, "cpu", torch.float32)
    config = EngineConfig(max_batch_items=8, batch_window_s=WINDOW_S, lora_dir=checkpoints / tc.LORA_DIR,
                          lora_max_upload_bytes=1 << 20)
    engine = DitEngine(pipeline, config)
    binding = ServiceBinding(dit_pb2_grpc.add_DitServiceServicer_to_server, DitServicer(engine),
                             "acestep.dit.v1.DitService")
    server = GrpcServer(ServerConfig(service_name="test-lora", metrics_port=-1, drain_grace_s=2.0), [binding])
    port = await server.start()
    await engine.start()
    await server.mark_serving()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Served(engine, server, channel, dit_pb2_grpc.DitServiceStub(channel))
    await channel.close()
    await server.drain(0.5)
    await engine.stop()


def upload(lora_id: str, config_json: str, weights: bytes, chunk: int = 8192) -> list[common_pb2.UploadLoraRequest]:
    header = common_pb2.LoraUploadHeader(lora_id=lora_id, adapter_config_json=config_json, total_bytes=len(weights))
    chunks = [common_pb2.UploadLoraRequest(chunk=weights[i:i + chunk]) for i in range(0, len(weights), chunk)]
    return [common_pb2.UploadLoraRequest(header=header), *chunks]


def adapter_files(checkpoints: Path, name: str) -> tuple[str, bytes]:
    folder = checkpoints / tc.LORA_DIR / name
    return (folder / CONFIG_FILE).read_text(), (folder / WEIGHTS_FILE).read_bytes()


def synth(seed: int, **lora) -> dit_pb2.SynthesizeRequest:
    return request(GenerationParams(**PARAMS, **lora), seeds=(seed,), stream_pcm=True)


def pcm(result) -> np.ndarray:
    return np.frombuffer(bytes(result.pcm[0]), dtype="<i2").astype(np.int32)


async def test_upload_list_synthesize_delete(turbo, checkpoints):
    config_json, weights = adapter_files(checkpoints, "tiny-attn")
    reply = await turbo.stub.UploadLora(iter(upload("my-style", config_json, weights)))
    assert (reply.lora.lora_id, reply.lora.rank, reply.lora.alpha, reply.already_present) == ("my-style", 4, 8.0, False)
    assert list(reply.lora.targets) == ["k_proj", "o_proj", "q_proj", "v_proj"] and reply.lora.num_modules == 16
    listed = await turbo.stub.ListLoras(common_pb2.ListLorasRequest())
    assert {"my-style", *tc.TINY_LORAS} <= {info.lora_id for info in listed.loras}
    plain = await collect(turbo.stub.Synthesize(synth(3)))
    styled = await collect(turbo.stub.Synthesize(synth(3, lora_id="my-style", lora_scale=1.0)))
    assert len(pcm(styled)) == len(pcm(plain)) and np.abs(pcm(styled) - pcm(plain)).max() > 100
    shown = await turbo.stub.ListLoras(common_pb2.ListLorasRequest(lora_ids=["my-style", "nope"]))
    assert [(i.lora_id, i.loaded) for i in shown.loras] == [("my-style", True)] and list(shown.missing) == ["nope"]
    await turbo.stub.DeleteLora(common_pb2.DeleteLoraRequest(lora_id="my-style"))
    gone = await turbo.stub.ListLoras(common_pb2.ListLorasRequest(lora_ids=["my-style"]))
    assert list(gone.missing) == ["my-style"] and not (checkpoints / tc.LORA_DIR / "my-style").exists()
    await expect_error(turbo.stub.Synthesize(synth(3, lora_id="my-style")), grpc.StatusCode.INVALID_ARGUMENT,
                       "lora_id 'my-style' is not a known adapter")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await turbo.stub.DeleteLora(common_pb2.DeleteLoraRequest(lora_id="my-style"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_corrupt_or_oversized_uploads_are_refused_naming_the_problem(turbo, checkpoints, tmp_path):
    config_json, weights = adapter_files(checkpoints, "tiny-attn")
    tensors = load_file(str(checkpoints / tc.LORA_DIR / "tiny-attn" / WEIGHTS_FILE))
    tensors[Q_A] = torch.zeros(4, 32)  # the decoder's q_proj takes 64 features
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    bad = (tmp_path / "bad.safetensors").read_bytes()
    cases = [
        (upload("bad-style", config_json, bad), [Q_A, "shape [4, 32]", "expected [4, 64]"]),
        (upload("bad-style", config_json, b"\x00" * 100), ["not a readable safetensors file"]),
        (upload("../escape", config_json, weights), ["lora_id must start with a letter or digit"]),
        (upload("big-style", config_json, b"\x00" * (2 << 20)), ["total_bytes must be in [1, 1048576]"]),
        (upload("bad-style", config_json, weights)[1:], ["an upload starts with its header"]),
    ]
    for messages, fragments in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await turbo.stub.UploadLora(iter(messages))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        for fragment in fragments:
            assert fragment in info.value.details()
    listed = await turbo.stub.ListLoras(common_pb2.ListLorasRequest(lora_ids=["bad-style", "big-style"]))
    assert list(listed.missing) == ["bad-style", "big-style"]
    assert not [p for p in (checkpoints / tc.LORA_DIR).iterdir() if p.name.startswith(".")]


async def test_adapters_copied_onto_the_volume_are_found_on_demand(turbo, checkpoints):
    shutil.copytree(checkpoints / tc.LORA_DIR / "tiny-rslora", checkpoints / tc.LORA_DIR / "copied-in")
    listed = await turbo.stub.ListLoras(common_pb2.ListLorasRequest(lora_ids=["copied-in"]))
    assert [(i.lora_id, i.rank) for i in listed.loras] == [("copied-in", 8)]


async def test_requests_with_different_adapters_share_one_diffusion_batch(turbo):
    blend = [("tiny-attn", 0.5), ("tiny-rslora", 1.0)]
    requests = [synth(5, lora_id="tiny-attn"), synth(5, lora_id="tiny-mlp", lora_scale=0.8), synth(5, loras=blend),
                synth(5)]
    results = await asyncio.gather(*(collect(turbo.stub.Synthesize(r)) for r in requests))
    for result in results:
        assert (result.batches[0].num_requests, result.batches[0].batch_size) == (4, 4)
    waves = [pcm(result) for result in results]
    for i in range(len(waves)):
        for j in range(i + 1, len(waves)):
            assert np.abs(waves[i] - waves[j]).max() > 100, (i, j)  # every row got its own adapters
    for index in (0, 3):  # a row gives in the shared batch what it gives alone
        alone = await collect(turbo.stub.Synthesize(requests[index]))
        assert alone.batches[0].batch_size == 1
        assert np.abs(pcm(alone) - waves[index]).max() <= 2


def test_blend_survives_the_wire():
    params = GenerationParams(lora_id="a", lora_scale=0.25, loras=[("b", 0.5)])
    back = convert.params_from_pb(common_pb2.GenerationParams.FromString(
        convert.params_to_pb(params).SerializeToString()))
    assert (back.lora_id, back.lora_scale, back.loras) == ("a", 0.25, [("b", 0.5)])
