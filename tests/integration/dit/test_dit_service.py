"""The DiT service through real gRPC on 127.0.0.1 with the tiny random-weight checkpoints.

Two in-process servers: the turbo DiT (text2music, cover, repaint) and the base DiT (lego,
extract, complete, long runs to cancel). Songs are short (1-10 s) so the file stays fast on CPU.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
import numpy as np
import pytest
import soundfile
import torch

from dit_service.engine import DitEngine, EngineConfig
from dit_service.pipeline import DitPipeline
from dit_service.servicer import DitServicer
from shared import convert, metrics
from devtools import tiny_checkpoints as tc
from shared.audio import encode_audio
from shared.config import ServerConfig
from shared.grpc_server import GrpcServer, ServiceBinding
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.dit.v1 import dit_pb2, dit_pb2_grpc
from shared.types import GenerationParams

RATE = 48_000
HOP = 1920
WINDOW_S = 0.25  # long enough for two concurrent test requests to meet in one batch
FORMATS = {"wav": common_pb2.AUDIO_FORMAT_WAV, "flac": common_pb2.AUDIO_FORMAT_FLAC,
           "mp3": common_pb2.AUDIO_FORMAT_MP3, "ogg": common_pb2.AUDIO_FORMAT_OGG}


@dataclass
class Served:
    engine: DitEngine
    server: GrpcServer
    channel: grpc.aio.Channel
    stub: dit_pb2_grpc.DitServiceStub


@dataclass
class Result:
    kinds: list[str] = field(default_factory=list)
    batches: list[dit_pb2.BatchInfo] = field(default_factory=list)
    progress: list[common_pb2.Progress] = field(default_factory=list)
    pcm: dict[int, bytearray] = field(default_factory=dict)
    files: dict[int, bytearray] = field(default_factory=dict)
    items: dict[int, dit_pb2.ItemDone] = field(default_factory=dict)
    done: Optional[dit_pb2.SynthesizeDone] = None


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    steps = [step for step in tc.WRITER_STEPS if step.folder != tc.LM_DIR]
    notes = tc.write_all(root, seed=0, steps=steps)
    missing = {folder: note for folder, note in notes.items() if note}
    if missing:
        pytest.fail(f"tiny checkpoints incomplete: {missing}")
    return root


async def _serve(checkpoints: Path, model: str, max_queue: int) -> Served:
    pipeline = await asyncio.to_thread(DitPipeline.load, checkpoints, model, "cpu", torch.float32)
    engine = DitEngine(pipeline, EngineConfig(max_batch_items=8, max_queue=max_queue, batch_window_s=WINDOW_S))
    binding = ServiceBinding(dit_pb2_grpc.add_DitServiceServicer_to_server, DitServicer(engine),
                             "acestep.dit.v1.DitService")
    server = GrpcServer(ServerConfig(service_name=f"test-{model}", metrics_port=-1, drain_grace_s=2.0), [binding])
    port = await server.start()
    await engine.start()
    await server.mark_serving()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Served(engine, server, channel, dit_pb2_grpc.DitServiceStub(channel))


async def _close(served: Served) -> None:
    await served.channel.close()
    await served.server.drain(0.5)
    await served.engine.stop()


@pytest.fixture(scope="session")
async def turbo(checkpoints: Path):
    served = await _serve(checkpoints, tc.TURBO_DIR, max_queue=4)
    yield served
    await _close(served)


@pytest.fixture(scope="session")
async def base(checkpoints: Path):
    served = await _serve(checkpoints, tc.BASE_DIR, max_queue=16)
    yield served
    await _close(served)


def request(params: GenerationParams, seeds=(0,), fmt: str = "wav", stream_pcm: bool = False,
            codes: Optional[list[int]] = None, src_latents: Optional[np.ndarray] = None,
            request_id: str = "") -> dit_pb2.SynthesizeRequest:
    items = [dit_pb2.SynthesisItem(seed=seed, audio_codes=codes or []) for seed in seeds]
    message = dit_pb2.SynthesizeRequest(request_id=request_id, params=convert.params_to_pb(params), items=items,
                                        audio_format=FORMATS[fmt], stream_pcm=stream_pcm)
    if src_latents is not None:
        message.src_latents.CopyFrom(dit_pb2.Tensor(shape=list(src_latents.shape),
                                                    float32_le=src_latents.astype("<f4").tobytes()))
    return message


async def collect(call, on_event=None) -> Result:
    result = Result()
    async for event in call:
        kind = event.WhichOneof("event")
        result.kinds.append(kind)
        if kind == "batch":
            result.batches.append(event.batch)
        elif kind == "progress":
            result.progress.append(event.progress)
        elif kind == "audio":
            chunk = event.audio
            buffer = result.pcm.setdefault(chunk.item_index, bytearray())
            assert chunk.start_sample * 4 == len(buffer)  # contiguous, in order
            buffer += chunk.pcm_s16le
        elif kind == "file":
            chunk = event.file
            buffer = result.files.setdefault(chunk.item_index, bytearray())
            assert chunk.offset == len(buffer) and len(chunk.data) < 4 * 1024 * 1024
            buffer += chunk.data
        elif kind == "item_done":
            result.items[event.item_done.item_index] = event.item_done
        elif kind == "done":
            result.done = event.done
        if on_event is not None:
            await on_event(event)
    return result


def assert_audio(result: Result, num_items: int, duration_s: float) -> None:
    """Every item finished with a file of the requested duration (48 kHz stereo)."""
    assert result.kinds[0] == "accepted" and result.kinds[-1] == "done"
    assert sorted(result.items) == list(range(num_items))
    expected = round(duration_s * RATE)
    for index, item in result.items.items():
        assert item.num_samples == expected and item.sample_rate_hz == RATE
        audio, rate = soundfile.read(io.BytesIO(bytes(result.files[index])), dtype="float32", always_2d=True)
        assert rate == RATE and audio.shape == (expected, 2)
        assert np.abs(audio).max() > 0
    assert result.done.time_costs.seconds["dit_total_time_cost"] > 0


def source_wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    tone = 0.4 * np.sin(2 * np.pi * 220.0 * t) * (1 + 0.3 * np.sin(2 * np.pi * 2 * t))
    return encode_audio(np.stack([tone, 0.8 * tone]).astype(np.float32), "wav")


def source_latents(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((frames, 64)).astype(np.float32)


async def expect_error(call, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(call)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    return info.value.details()


async def test_text2music_streams_pcm_and_returns_a_file_of_the_requested_duration(turbo):
    params = GenerationParams(caption="bright synth pop", lyrics="[Verse]\nla la la", duration=10.0)
    result = await collect(turbo.stub.Synthesize(request(params, seeds=(1, 2), fmt="flac", stream_pcm=True)))
    assert_audio(result, 2, 10.0)
    assert result.batches[0].num_steps == 8
    assert [p.current for p in result.progress if p.stage == common_pb2.STAGE_DIFFUSION] == list(range(1, 9))
    for index in (0, 1):
        pcm = np.frombuffer(bytes(result.pcm[index]), dtype="<i2").reshape(-1, 2)
        decoded, _ = soundfile.read(io.BytesIO(bytes(result.files[index])), dtype="int16", always_2d=True)
        assert pcm.shape == decoded.shape == (10 * RATE, 2)
    assert result.kinds.index("audio") < result.kinds.index("file")


async def test_text2music_with_lm_codes_runs_as_a_cover_of_the_hints(turbo):
    params = GenerationParams(caption="lofi", duration=10.0)
    codes = list(np.random.default_rng(3).integers(0, 64_000, size=55))
    result = await collect(turbo.stub.Synthesize(request(params, fmt="ogg", codes=[int(c) for c in codes])))
    assert_audio(result, 1, 55 / 5)  # five codes per second, whatever the requested duration


async def test_cover_of_source_audio_keeps_the_source_duration(turbo):
    params = GenerationParams(task_type="cover", caption="jazz cover", src_audio=source_wav(1.0))
    result = await collect(turbo.stub.Synthesize(request(params, fmt="mp3")))
    assert_audio(result, 1, 1.0)


async def test_repaint_past_the_end_outpaints_the_source(turbo):
    params = GenerationParams(task_type="repaint", caption="guitar solo", src_audio=source_wav(1.0),
                              repainting_start=0.5, repainting_end=2.0)
    result = await collect(turbo.stub.Synthesize(request(params, fmt="wav")))
    assert_audio(result, 1, 2.0)


@pytest.mark.parametrize("task, extra, fmt", [
    ("lego", {"track_name": "guitar"}, "ogg"),
    ("extract", {"track_name": "vocals"}, "wav"),
    ("complete", {"track_classes": ["drums", "bass"]}, "flac"),
])
async def test_base_model_source_tasks(base, task, extra, fmt):
    params = GenerationParams(task_type=task, caption="rock band", inference_steps=4, **extra)
    result = await collect(base.stub.Synthesize(request(params, fmt=fmt, src_latents=source_latents(130))))
    assert_audio(result, 1, 130 * HOP / RATE)
    assert result.batches[0].num_steps == 4


async def test_two_concurrent_requests_share_one_batch(turbo):
    params = GenerationParams(caption="ambient", duration=10.0)
    first, second = await asyncio.gather(
        collect(turbo.stub.Synthesize(request(params, seeds=(5,)))),
        collect(turbo.stub.Synthesize(request(GenerationParams(caption="ambient, piano", duration=10.0), seeds=(6,)))),
    )
    for result in (first, second):
        assert_audio(result, 1, 10.0)
        assert (result.batches[0].num_requests, result.batches[0].batch_size) == (2, 2)


async def test_same_seed_gives_identical_audio(turbo):
    params = GenerationParams(caption="drum and bass", lyrics="[Chorus]\nhey", duration=10.0)
    runs = [await collect(turbo.stub.Synthesize(request(params, seeds=(seed,), stream_pcm=True)))
            for seed in (11, 11, 12)]
    assert runs[0].pcm[0] == runs[1].pcm[0] and runs[0].files[0] == runs[1].files[0]
    assert runs[0].pcm[0] != runs[2].pcm[0]
    assert runs[0].items[0].seed == 11 and runs[2].items[0].seed == 12


async def test_cancelled_request_frees_its_rows_while_the_other_finishes(base):
    params = GenerationParams(task_type="extract", caption="strings", inference_steps=120)
    latents = source_latents(128)
    cancelled = base.stub.Synthesize(request(params, seeds=(1,), src_latents=latents))
    active_after_cancel: list[float] = []

    async def cancel_after_a_few_steps(event):
        if event.WhichOneof("event") == "progress" and event.progress.current == 5:
            cancelled.cancel()

    async def watch_survivor(event):
        if cancelled.cancelled() and event.WhichOneof("event") == "progress" and event.progress.current > 0:
            active_after_cancel.append(metrics.DIT_ACTIVE_ITEMS._value.get())

    survivor, outcome = await asyncio.gather(
        collect(base.stub.Synthesize(request(params, seeds=(2,), src_latents=latents)), watch_survivor),
        collect(cancelled, cancel_after_a_few_steps), return_exceptions=True)
    assert isinstance(outcome, asyncio.CancelledError)
    assert survivor.batches[0].num_requests == 2
    assert_audio(survivor, 1, 128 * HOP / RATE)
    assert [p.current for p in survivor.progress if p.stage == common_pb2.STAGE_DIFFUSION] == list(range(1, 121))
    assert active_after_cancel and active_after_cancel[-1] == 1
    for _ in range(100):  # the worker returns right after handing the last item to the encoder pool
        if base.engine.batcher.idle:
            break
        await asyncio.sleep(0.01)
    assert base.engine.batcher.idle


async def test_over_long_caption_is_invalid(turbo):
    params = GenerationParams(caption="x" * 513, duration=10.0)
    await expect_error(turbo.stub.Synthesize(request(params)), grpc.StatusCode.INVALID_ARGUMENT, "caption", "512")


async def test_unknown_track_name_is_invalid(base):
    params = GenerationParams(task_type="lego", track_name="kazoo", inference_steps=4)
    await expect_error(base.stub.Synthesize(request(params, src_latents=source_latents(128))),
                       grpc.StatusCode.INVALID_ARGUMENT, "track_name", "kazoo")


async def test_turbo_refuses_base_only_tasks(turbo):
    params = GenerationParams(task_type="extract", track_name="vocals")
    await expect_error(turbo.stub.Synthesize(request(params, src_latents=source_latents(128))),
                       grpc.StatusCode.INVALID_ARGUMENT, "task_type", "extract", "turbo")


async def test_corrupt_source_audio_is_invalid(turbo):
    params = GenerationParams(task_type="cover", src_audio=b"RIFF\x00\x00not really audio")
    await expect_error(turbo.stub.Synthesize(request(params)), grpc.StatusCode.INVALID_ARGUMENT, "src_audio")


async def test_full_queue_is_resource_exhausted(turbo):
    params = GenerationParams(caption="queue", duration=10.0)
    started = asyncio.Event()

    async def on_event(event):
        if event.WhichOneof("event") == "batch":
            started.set()

    running = asyncio.ensure_future(collect(turbo.stub.Synthesize(request(params, seeds=(1,))), on_event))
    await started.wait()
    waiting_call = turbo.stub.Synthesize(request(params, seeds=(1, 2, 3, 4)))
    waiting = asyncio.ensure_future(collect(waiting_call))
    while turbo.engine.batcher.waiting_items < 4:
        await asyncio.sleep(0.01)
    await expect_error(turbo.stub.Synthesize(request(params)), grpc.StatusCode.RESOURCE_EXHAUSTED,
                       "DiT service is at capacity (items: 4 queued, limit 4); retry later")
    waiting_call.cancel()
    assert_audio(await running, 1, 10.0)
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_encode_audio_returns_latents_and_codes(turbo):
    response = await turbo.stub.EncodeAudio(dit_pb2.EncodeAudioRequest(
        request_id="enc", audio=common_pb2.AudioInput(data=source_wav(1.0))))
    frames = RATE // HOP
    assert list(response.latents.shape) == [frames, 64]
    latents = np.frombuffer(response.latents.float32_le, dtype="<f4")
    assert latents.size == frames * 64 and np.isfinite(latents).all()
    assert len(response.codes) == -(-frames // 5) and all(0 <= c < 64_000 for c in response.codes)
    assert response.duration_s == pytest.approx(1.0)
