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
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
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
from dit_service.lora.registry import LoraInfo, LoraRegistry, RegistryConfig
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

log = logging.getLogger(__name__)
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
    vae_queue_batches: int = 1                 # denoised batches waiting for the VAE; 0: decode inline
    lora_dir: Optional[Path] = None             # adapter folders (<checkpoints>/loras); None: no adapters
    lora_cache_bytes: int = 1024 * 1024 * 1024  # device memory for loaded adapters
    lora_max_upload_bytes: int = 1024 * 1024 * 1024


class DitEngine:
    """Owns the batcher and the worker; the servicer's only dependency."""

    def __init__(self, pipeline: DitPipeline, config: EngineConfig = EngineConfig()) -> None:
        self.pipeline = pipeline
        self.config = config
        self.worker = BatchWorker(pipeline, file_chunk_bytes=config.file_chunk_bytes,
                                  pcm_chunk_bytes=config.pcm_chunk_bytes, decode_queue_batches=config.vae_queue_batches)
        self.batcher = Batcher(self.worker.run, max_batch_items=config.max_batch_items, max_queue=config.max_queue,
                               batch_window_s=config.batch_window_s)
        registry = RegistryConfig(config.lora_dir, config.lora_cache_bytes, config.lora_max_upload_bytes)
        self.loras = LoraRegistry(registry, pipeline.lora.targets, pipeline.device, pipeline.dtype)

    async def start(self) -> None:
        await self.batcher.start()
        found = await self.loras.scan()
        if found:
            log.info("LoRA adapters: %s", ", ".join(info.lora_id for info in found))

    async def stop(self) -> None:
        await self.batcher.stop()
        await asyncio.to_thread(self.worker.close)  # the decode thread still emits through the loop

    async def warm_up(self) -> None:
        """Run one short text2music item through every stage (allocations, kernels, caches)."""
        params = GenerationParams(task_type="text2music", caption="warm-up", duration=WARMUP_DURATION_S, thinking=False)
        request = SynthesisRequest("warm-up", params, (SynthesisItem(seed=0),), audio_format="wav")
        async for _ in self.submit(request):
            pass

    def abort(self, request_id: str) -> None:
        self.batcher.abort(request_id)

    async def submit(self, request: SynthesisRequest) -> AsyncIterator:
        """Admit ``request`` and stream its events (raises typed errors, before or during the stream).
        The request's LoRA adapters are loaded (if needed) and pinned before it joins the queue."""
        state = await self._plan(request)
        async with self.loras.pinned(state.plan.loras) as adapters:
            state.plan.adapters = adapters
            async for event in self._run(request, state):
                yield event

    async def _run(self, request: SynthesisRequest, state: RequestState) -> AsyncIterator:
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

    async def list_loras(self, lora_ids: Sequence[str] = ()) -> tuple[list[LoraInfo], list[str]]:
        return await self.loras.list(lora_ids)

    async def upload_lora(self, lora_id: str, config_text: str, chunks: AsyncIterator[bytes],
                          total_bytes: int) -> tuple[LoraInfo, bool]:
        return await self.loras.upload(lora_id, config_text, chunks, total_bytes)

    async def delete_lora(self, lora_id: str) -> None:
        await self.loras.delete(lora_id)

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
        vae_seed = request.vae_seed if request.vae_seed is not None else seeds[0]
        plan = plan_request(params, sources, has_codes=any(codes), is_turbo=self.pipeline.is_turbo,
                            model_name=self.pipeline.name, vae_seed=vae_seed)
        rows = [RowSpec(plan, index, seed, item_codes_, item.noise_mix)
                for index, (seed, item_codes_, item) in enumerate(zip(seeds, codes, request.items))]
        return RequestState(request.request_id, plan, rows, request.audio_format, request.stream_pcm,
                            request.return_latents)

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

