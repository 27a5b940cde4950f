"""Synthesize / EncodeAudio messages <-> engine requests and events (edge module)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Optional

import numpy as np

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
from shared import convert
from shared.constants import BATCH_SIZE_MAX, MAX_AUDIO_CODE
from shared.errors import InvalidArgument
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.dit.v1 import dit_pb2
from shared.types import GenerationParams
from shared.validation import MAX_SEED, check_range

MAX_NOISE_TERMS = 16  # a retake of a retake ... adds one term per generation
STAGES = {
    "conditioning": common_pb2.STAGE_CONDITIONING,
    "diffusion": common_pb2.STAGE_DIFFUSION,
    "decode": common_pb2.STAGE_DECODE,
    "encode": common_pb2.STAGE_ENCODE,
}


def synthesis_request(message: dit_pb2.SynthesizeRequest, timeout_s: Optional[float]) -> SynthesisRequest:
    """The engine request; no items means one item seeded by ``params.seed``."""
    params = convert.params_from_pb(message.params)
    items = tuple(_item(index, item) for index, item in enumerate(message.items)) or (SynthesisItem(params.seed),)
    if len(items) > BATCH_SIZE_MAX:
        raise InvalidArgument(f"items must hold at most {BATCH_SIZE_MAX} entries, got {len(items)}", field="items")
    audio_format = message.audio_format or common_pb2.AUDIO_FORMAT_FLAC
    if audio_format not in convert.AUDIO_FORMAT_FROM_PB:
        raise InvalidArgument(f"audio_format {audio_format} is not a known AudioFormat", field="audio_format")
    src_latents = None
    if message.HasField("src_latents"):
        src_latents = LatentArray(tuple(int(n) for n in message.src_latents.shape), message.src_latents.float32_le)
    vae_seed = message.vae_seed if message.HasField("vae_seed") else None
    if vae_seed is not None:
        check_range("vae_seed", vae_seed, 0, MAX_SEED)
    return SynthesisRequest(
        request_id=message.request_id or uuid.uuid4().hex, params=params, items=items,
        audio_format=convert.AUDIO_FORMAT_FROM_PB[audio_format], stream_pcm=message.stream_pcm,
        src_latents=src_latents, timeout_s=timeout_s, return_latents=message.return_latents, vae_seed=vae_seed,
    )


def params_for_validation(request: SynthesisRequest) -> GenerationParams:
    """``params`` as ``shared.validation`` should see them: uploaded latents count as the source."""
    if request.src_latents is not None and not request.params.src_audio:
        return dataclasses.replace(request.params, src_audio=b"src_latents")
    return request.params


def _item(index: int, item: dit_pb2.SynthesisItem) -> SynthesisItem:
    check_range(f"items[{index}].seed", item.seed, -1, MAX_SEED)
    codes = tuple(item.audio_codes)
    bad = [code for code in codes if not 0 <= code <= MAX_AUDIO_CODE]
    if bad:
        raise InvalidArgument(f"items[{index}].audio_codes must be in [0, {MAX_AUDIO_CODE}], got {bad[0]}",
                              field="items.audio_codes")
    if len(item.noise_mix) > MAX_NOISE_TERMS:
        raise InvalidArgument(f"items[{index}].noise_mix must hold at most {MAX_NOISE_TERMS} terms, got "
                              f"{len(item.noise_mix)}", field="items.noise_mix")
    for term in item.noise_mix:
        check_range(f"items[{index}].noise_mix.seed", term.seed, 0, MAX_SEED)
        check_range(f"items[{index}].noise_mix.weight", term.weight, -1.0, 1.0)
    mix = tuple((int(term.seed), float(term.weight)) for term in item.noise_mix)
    return SynthesisItem(seed=item.seed, audio_codes=codes, noise_mix=mix)


def synthesize_event(event: object) -> dit_pb2.SynthesizeEvent:
    """One engine event as a ``SynthesizeEvent``."""
    if isinstance(event, Progress):
        return dit_pb2.SynthesizeEvent(progress=common_pb2.Progress(
            stage=STAGES[event.stage], fraction=event.fraction, message=event.message,
            current=event.current, total=event.total))
    if isinstance(event, PcmChunk):
        return dit_pb2.SynthesizeEvent(audio=common_pb2.PcmChunk(
            item_index=event.item_index, sample_rate_hz=event.sample_rate_hz, num_channels=event.num_channels,
            start_sample=event.start_sample, pcm_s16le=event.pcm_s16le, is_last=event.is_last))
    if isinstance(event, FileChunk):
        return dit_pb2.SynthesizeEvent(file=common_pb2.FileChunk(
            item_index=event.item_index, format=convert.AUDIO_FORMAT_TO_PB[event.audio_format],
            offset=event.offset, data=event.data, is_last=event.is_last, total_bytes=event.total_bytes))
    if isinstance(event, ItemDone):
        done = dit_pb2.ItemDone(item_index=event.item_index, seed=event.seed, sample_rate_hz=event.sample_rate_hz,
                                num_samples=event.num_samples, duration_s=event.duration_s)
        if event.latents is not None:
            done.latents.CopyFrom(_tensor(event.latents))
        return dit_pb2.SynthesizeEvent(item_done=done)
    if isinstance(event, Accepted):
        return dit_pb2.SynthesizeEvent(accepted=dit_pb2.Accepted(request_id=event.request_id,
                                                                 queue_position=event.queue_position))
    if isinstance(event, BatchInfo):
        return dit_pb2.SynthesizeEvent(batch=dit_pb2.BatchInfo(
            batch_size=event.batch_size, num_requests=event.num_requests, num_steps=event.num_steps))
    if isinstance(event, Done):
        return dit_pb2.SynthesizeEvent(done=dit_pb2.SynthesizeDone(
            time_costs=common_pb2.TimeCosts(seconds=event.time_costs)))
    raise TypeError(f"not a DiT engine event: {type(event).__name__}")


def _tensor(array: np.ndarray) -> dit_pb2.Tensor:
    values = np.ascontiguousarray(array, dtype="<f4")
    return dit_pb2.Tensor(shape=list(values.shape), float32_le=values.tobytes())


def encode_audio_response(encoded: EncodedAudio) -> dit_pb2.EncodeAudioResponse:
    return dit_pb2.EncodeAudioResponse(latents=_tensor(encoded.latents), codes=encoded.codes,
                                       duration_s=encoded.duration_s)
