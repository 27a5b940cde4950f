"""``DitEngine``: requests in, event streams out; the batcher plus the pipeline.

``submit(request)`` decodes and checks the uploaded audio (off the event loop), resolves seeds
and the request plan, admits the request to the :class:`~dit_service.batcher.Batcher` and
returns an async stream of pure-data events:

``Accepted`` -> ``BatchInfo`` -> ``Progress`` (conditioning, every diffusion step, every decode
tile) -> per item ``PcmChunk``... (when ``stream_pcm``, as VAE tiles finish) -> ``FileChunk``...
-> ``ItemDone`` -> finally ``Done`` with the time costs.

Streamed PCM is the raw decoder output (clipped to [-1, 1] by the 16-bit conversion); the file is
encoded from the whole item after the reference's anti-clip (division by the peak when it exceeds
1), which needs the entire waveform. Rows of a batch are padded to the longest one; each item is
cut back to its own length. ``abort(request_id)`` stops a request at the next step.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Optional

import numpy as np

from dit_service.batcher import Admitted, BatchFormed, Batcher
from dit_service.events import (
    Accepted,
    BatchInfo,
    Done,
    EncodedAudio,
    FileChunk,
    ItemDone,
    LatentArray,
    PcmChunk,
    Progress,
    SynthesisItem,
    SynthesisRequest,
)
from dit_service.pipeline import DitPipeline
from dit_service.planning import RowSpec, Sources, item_codes, plan_request
from dit_service.worker import BatchWorker, RequestState
from shared import metrics
from shared.audio import DEFAULT_CHUNK_BYTES, decode_to_stereo_48k
from shared.constants import AUDIO_FORMATS, DURATION_MAX_S, SAMPLE_RATE_HZ
from shared.errors import AceStepError, InvalidArgument
from shared.types import GenerationParams

__all__ = [
    "Accepted", "BatchInfo", "DitEngine", "Done", "EncodedAudio", "EngineConfig", "FileChunk", "ItemDone",
    "LatentArray", "PcmChunk", "Progress", "SynthesisItem", "SynthesisRequest",
]

MAX_SEED = 2**32 - 1
WARMUP_DURATION_S = 10.0


@dataclass(frozen=True)
class EngineConfig:
    max_batch_items: int = 8
    max_queue: int = 64
    batch_window_s: float = 0.02
    max_source_s: float = DURATION_MAX_S
    file_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    pcm_chunk_bytes: int = DEFAULT_CHUNK_BYTES


class DitEngine:
    """Owns the batcher and the worker; the servicer's only dependency."""

    def __init__(self, pipeline: DitPipeline, config: EngineConfig = EngineConfig()) -> None:
        self.pipeline = pipeline
        self.config = config
        self.worker = BatchWorker(pipeline, file_chunk_bytes=config.file_chunk_bytes,
                                  pcm_chunk_bytes=config.pcm_chunk_bytes)
        self.batcher = Batcher(self.worker.run, max_batch_items=config.max_batch_items, max_queue=config.max_queue,
                               batch_window_s=config.batch_window_s)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.worker.close()

    async def warm_up(self) -> None:
        """Run one short text2music item through every stage (allocations, kernels, caches)."""
        params = GenerationParams(task_type="text2music", caption="warm-up", duration=WARMUP_DURATION_S, thinking=False)
        request = SynthesisRequest("warm-up", params, (SynthesisItem(seed=0),), audio_format="wav")
        async for _ in self.submit(request):
            pass

    def abort(self, request_id: str) -> None:
        self.batcher.abort(request_id)

    async def submit(self, request: SynthesisRequest) -> AsyncIterator:
        """Admit ``request`` and stream its events (raises typed errors, before or during the stream)."""
        state = await self._plan(request)
        deadline = None if request.timeout_s is None else time.monotonic() + request.timeout_s
        stream = self.batcher.submit(request.request_id, state.plan.batch_key, len(state.rows), state, deadline)
        try:
            async for event in stream:
                if isinstance(event, Admitted):
                    yield Accepted(request.request_id, event.queue_position)
                elif isinstance(event, BatchFormed):
                    state.mark_scheduled()
                    yield BatchInfo(event.batch_size, event.num_requests, state.plan.num_steps)
                else:
                    yield event
        except AceStepError as error:
            metrics.DIT_ITEMS.labels(error.grpc_code_name.lower()).inc(len(state.rows) - state.num_done)
            raise
        except asyncio.CancelledError:  # the caller went away
            metrics.DIT_ITEMS.labels("cancelled").inc(len(state.rows) - state.num_done)
            raise
        finally:
            await stream.aclose()

    async def encode_audio(self, data: bytes) -> EncodedAudio:
        """Source audio bytes -> 25 Hz VAE latents ``[T, 64]`` and 5 Hz audio codes."""
        audio = await asyncio.to_thread(decode_to_stereo_48k, data, "audio", self.config.max_source_s)
        latents, codes = await self.batcher.run_exclusive(lambda: self.pipeline.encode_audio(audio))
        return EncodedAudio(latents=latents.numpy(), codes=codes, duration_s=audio.shape[-1] / SAMPLE_RATE_HZ)

    async def _plan(self, request: SynthesisRequest) -> RequestState:
        if request.audio_format not in AUDIO_FORMATS:
            raise InvalidArgument(f"audio_format must be one of {', '.join(AUDIO_FORMATS)}, got "
                                  f"{request.audio_format!r}", field="audio_format")
        if not request.items:
            raise InvalidArgument("items must hold at least one item", field="items")
        params = request.params
        sources = await asyncio.to_thread(self._decode_sources, params, request.src_latents)
        codes = item_codes(params, [item.audio_codes for item in request.items])
        seeds = [item.seed if item.seed >= 0 else random.randint(0, MAX_SEED) for item in request.items]
        plan = plan_request(params, sources, has_codes=any(codes), is_turbo=self.pipeline.is_turbo,
                            model_name=self.pipeline.name, vae_seed=seeds[0])
        rows = [RowSpec(plan, index, seed, item_codes_) for index, (seed, item_codes_) in enumerate(zip(seeds, codes))]
        return RequestState(request.request_id, plan, rows, request.audio_format, request.stream_pcm)

    def _decode_sources(self, params: GenerationParams, src_latents: Optional[LatentArray]) -> Sources:
        """Decode uploads to 48 kHz stereo (runs on a helper thread; errors name the field)."""
        limit = self.config.max_source_s
        src_audio = decode_to_stereo_48k(params.src_audio, "src_audio", limit) if params.src_audio else None
        refer = None
        if params.reference_audio:
            refer = decode_to_stereo_48k(params.reference_audio, "reference_audio", limit)
        latents = None
        if src_latents is not None and src_audio is None:
            channels = self.pipeline.config.audio_acoustic_hidden_dim
            latents = _checked_latents(src_latents.to_numpy("src_latents"), channels)
        return Sources(src_audio=src_audio, src_latents=latents, refer_audio=refer)


def _checked_latents(latents: np.ndarray, channels: int) -> np.ndarray:
    if latents.ndim != 2 or latents.shape[1] != channels or latents.shape[0] < 1:
        raise InvalidArgument(f"src_latents must have shape [T, {channels}], got {list(latents.shape)}",
                              field="src_latents")
    if not np.isfinite(latents).all():
        raise InvalidArgument("src_latents holds NaN or infinite values", field="src_latents")
    return latents

