"""The pipelined VAE decode: diffusion of batch N+1 overlaps the decode of batch N on a second
thread (two devices simulated by two worker threads on the CPU), with the same bytes as the inline
decode, a bounded hand-off queue, cancellation and per-batch failures.

The tiny checkpoints run for real; :class:`Probe` wraps the pipeline only to observe and hold its
stages at chosen points (events, never timings).
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dit_service.engine import DitEngine, EngineConfig
from dit_service.events import Done, FileChunk, ItemDone, PcmChunk, SynthesisItem, SynthesisRequest
from dit_service.pipeline import DitPipeline
from devtools import tiny_checkpoints as tc
from shared import metrics
from shared.errors import Cancelled, Internal
from shared.types import GenerationParams

HOLD_S = 60.0  # deadlock guard only: every wait below is released by an event
DURATION_S = 2.0  # 50 latent frames: four decode tiles with the small tiling below


class Probe:
    """The real pipeline, with hooks: counts ``prepare`` calls, logs stage order, and can hold a decode."""

    def __init__(self, pipeline: DitPipeline) -> None:
        self._pipeline = pipeline
        self.log: list[tuple[str, int]] = []
        self.num_prepared = 0
        self.num_decodes = 0
        self.tiles: dict[int, int] = defaultdict(int)  # decode call -> tiles decoded
        self.prepared_events: dict[int, threading.Event] = defaultdict(threading.Event)
        self.decode_started = threading.Event()
        self.first_tile = threading.Event()
        self.hold_decode: threading.Event | None = None      # the first decode waits for it before decoding
        self.hold_after_tile: threading.Event | None = None  # the first decode waits after its first tile
        self.wait_results: list[bool] = []
        self.fail_decode_call: int | None = None

    def __getattr__(self, name: str):
        return getattr(self._pipeline, name)

    def prepare(self, rows):
        self.num_prepared += 1
        number = self.num_prepared
        self.log.append(("prepare", number))
        self.prepared_events[number].set()
        return self._pipeline.prepare(rows)

    def decode_tiles(self, latents, num_frames, live_rows) -> Iterator:
        self.num_decodes += 1
        call = self.num_decodes
        self.log.append(("decode_start", call))
        self.decode_started.set()
        if call == 1 and self.hold_decode is not None:
            self.wait_results.append(self.hold_decode.wait(HOLD_S))
        if call == self.fail_decode_call:
            raise RuntimeError("VAE decode failed (test)")
        for tile in self._pipeline.decode_tiles(latents, num_frames, live_rows):
            self.tiles[call] += 1
            yield tile
            if call == 1 and self.tiles[call] == 1:
                self.first_tile.set()
                if self.hold_after_tile is not None:
                    self.wait_results.append(self.hold_after_tile.wait(HOLD_S))
        self.log.append(("decode_end", call))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> DitPipeline:
    root: Path = tmp_path_factory.mktemp("tiny-vae-pipeline")
    tc.write_all(root, seed=0, steps=[step for step in tc.WRITER_STEPS if step.folder != tc.LM_DIR])
    loaded = DitPipeline.load(root, tc.TURBO_DIR, "cpu", torch.float32)
    loaded.vae.decode_chunk_frames, loaded.vae.decode_overlap_frames = 24, 4  # several tiles per song
    return loaded


async def started_engine(pipeline, *, queue_batches: int, max_batch_items: int = 1) -> DitEngine:
    config = EngineConfig(max_batch_items=max_batch_items, batch_window_s=0.0, vae_queue_batches=queue_batches)
    engine = DitEngine(pipeline, config)
    await engine.start()
    return engine


def request(request_id: str, seeds: tuple[int, ...] = (7,), stream_pcm: bool = True) -> SynthesisRequest:
    params = GenerationParams(caption="a calm piano line", lyrics="[Instrumental]", duration=DURATION_S,
                              thinking=False)
    return SynthesisRequest(request_id, params, tuple(SynthesisItem(seed=s) for s in seeds), audio_format="wav",
                            stream_pcm=stream_pcm)


async def collect(engine: DitEngine, req: SynthesisRequest) -> list:
    return [event async for event in engine.submit(req)]


def outputs(events: list) -> dict[str, bytes]:
    """PCM and file bytes per item, in order."""
    out: dict[str, bytearray] = defaultdict(bytearray)
    for event in events:
        if isinstance(event, PcmChunk):
            out[f"pcm{event.item_index}"] += event.pcm_s16le
        elif isinstance(event, FileChunk):
            out[f"file{event.item_index}"] += event.data
    return {key: bytes(value) for key, value in out.items()}


async def run_requests(pipeline, queue_batches: int) -> list[dict[str, bytes]]:
    engine = await started_engine(pipeline, queue_batches=queue_batches, max_batch_items=2)
    try:
        requests = [request(f"same-{i}", seeds=(10 * i + 1, 10 * i + 2)) for i in range(3)]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
    finally:
        await engine.stop()
    return [outputs(events) for events in results]


async def test_pipelined_decode_gives_the_same_bytes_as_the_inline_decode(pipeline) -> None:
    inline = await run_requests(pipeline, queue_batches=0)
    pipelined = await run_requests(pipeline, queue_batches=1)
    assert all(set(result) == {"pcm0", "pcm1", "file0", "file1"} for result in inline)
    assert all(len(result["pcm0"]) == DURATION_S * 48_000 * 4 for result in inline)
    assert pipelined == inline


async def test_diffusion_of_the_next_batch_runs_while_a_batch_decodes(pipeline) -> None:
    probe = Probe(pipeline)
    probe.hold_decode = probe.prepared_events[2]  # decode of batch 1 waits until batch 2 is being prepared
    engine = await started_engine(probe, queue_batches=1)
    busy = {stage: metrics.DIT_STAGE_BUSY_SECONDS.labels(stage)._value.get() for stage in ("diffusion", "decode")}
    try:
        results = await asyncio.gather(collect(engine, request("first")), collect(engine, request("second")))
    finally:
        await engine.stop()
    assert probe.wait_results == [True]
    for stage, before in busy.items():
        assert metrics.DIT_STAGE_BUSY_SECONDS.labels(stage)._value.get() > before, stage
        assert 0 < metrics.DIT_STAGE_BUSY_FRACTION.labels(stage)._value.get() <= 1, stage
    assert probe.log.index(("prepare", 2)) < probe.log.index(("decode_end", 1))
    assert all(isinstance(events[-1], Done) for events in results)


async def test_inline_decode_finishes_a_batch_before_the_next_one_starts(pipeline) -> None:
    probe = Probe(pipeline)
    engine = await started_engine(probe, queue_batches=0)
    try:
        await asyncio.gather(collect(engine, request("first")), collect(engine, request("second")))
    finally:
        await engine.stop()
    assert probe.log.index(("decode_end", 1)) < probe.log.index(("prepare", 2))


async def test_a_full_decode_queue_holds_diffusion_back(pipeline) -> None:
    probe = Probe(pipeline)
    release = threading.Event()
    probe.hold_decode = release
    engine = await started_engine(probe, queue_batches=1)
    decoder = engine.worker.decoder
    waits_before = metrics.DIT_DECODE_BACKPRESSURE._value.get()
    tasks = [asyncio.create_task(collect(engine, request(f"bp-{i}"))) for i in range(4)]
    try:
        # batch 1 decodes (held), batch 2 waits in the queue, batch 3 waits for room; batch 4 is not started
        assert await asyncio.to_thread(probe.prepared_events[3].wait, HOLD_S)
        assert await asyncio.to_thread(decoder.is_waiting_for_room.wait, HOLD_S)
        assert probe.num_prepared == 3
        assert decoder.depth == decoder.max_batches == 1
        assert engine.batcher.waiting_items == 1
        assert metrics.DIT_DECODE_BACKPRESSURE._value.get() > waits_before
    finally:
        release.set()
        results = await asyncio.gather(*tasks)
        await engine.stop()
    assert probe.num_prepared == 4
    assert all(isinstance(events[-1], Done) for events in results)


async def test_cancelling_during_decode_stops_its_rows_and_frees_both_stages(pipeline) -> None:
    probe = Probe(pipeline)
    release = threading.Event()
    probe.hold_after_tile = release
    engine = await started_engine(probe, queue_batches=1)
    events = []
    try:
        stream = engine.submit(request("cancelled"))
        with pytest.raises(Cancelled):
            async for event in stream:
                events.append(event)
                if isinstance(event, PcmChunk):
                    assert await asyncio.to_thread(probe.first_tile.wait, HOLD_S)
                    engine.abort("cancelled")
                    release.set()
        after = await collect(engine, request("after"))
    finally:
        release.set()
        await engine.stop()
    assert probe.wait_results == [True]
    assert probe.tiles[1] == 1  # the three remaining tiles of the cancelled row were never decoded
    assert not any(isinstance(event, (ItemDone, FileChunk)) for event in events)
    assert isinstance(after[-1], Done) and probe.tiles[2] == 4
    assert engine.worker.decoder.depth == 0


async def test_cancelling_while_queued_for_decode_skips_the_batch(pipeline) -> None:
    probe = Probe(pipeline)
    release = threading.Event()
    probe.hold_decode = release
    engine = await started_engine(probe, queue_batches=1)
    first = asyncio.create_task(collect(engine, request("held")))
    queued = asyncio.create_task(collect(engine, request("queued")))
    try:
        assert await asyncio.to_thread(probe.decode_started.wait, HOLD_S)
        assert await asyncio.to_thread(_wait_until_depth, engine.worker.decoder, 1)
        engine.abort("queued")
        with pytest.raises(Cancelled):
            await queued
    finally:
        release.set()
        held = await first
        await engine.stop()
    assert isinstance(held[-1], Done)
    assert probe.num_decodes == 1  # the cancelled batch never reached the VAE


def _wait_until_depth(decoder, depth: int) -> bool:
    """Wait until the diffusion thread has put ``depth`` batches in the queue (False: deadlock guard hit)."""
    pause = threading.Event()
    for _ in range(int(HOLD_S / 0.01)):
        if decoder.depth >= depth:
            return True
        pause.wait(0.01)
    return False


async def test_a_failing_decode_fails_only_its_request(pipeline) -> None:
    probe = Probe(pipeline)
    probe.fail_decode_call = 1
    engine = await started_engine(probe, queue_batches=1)
    try:
        results = await asyncio.gather(collect(engine, request("broken")), collect(engine, request("fine")),
                                       return_exceptions=True)
    finally:
        await engine.stop()
    assert isinstance(results[0], Internal)
    assert "VAE decode failed" in str(results[0])
    assert isinstance(results[1][-1], Done)
    assert sum(isinstance(event, ItemDone) for event in results[1]) == 1


def test_a_negative_decode_queue_is_refused_with_the_flag_named(pipeline) -> None:
    from dit_service.__main__ import engine_config, parse_args
    from shared.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="--vae-queue-batches must be >= 0, got -1"):
        engine_config(parse_args(["--vae-queue-batches", "-1"]))
    with pytest.raises(InvalidArgument, match="decode_queue_batches must be >= 0"):
        DitEngine(pipeline, EngineConfig(vae_queue_batches=-1))
