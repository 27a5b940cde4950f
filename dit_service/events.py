"""Requests and events of the DiT engine: pure data (scalars, strings, bytes, tuples; numpy only in results)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from shared.errors import InvalidArgument
from shared.types import GenerationParams


@dataclass(frozen=True)
class LatentArray:
    """A float32 little-endian tensor as bytes, e.g. source latents ``[T, 64]``."""

    shape: tuple[int, ...]
    float32_le: bytes

    def to_numpy(self, field_name: str) -> np.ndarray:
        expected = int(np.prod(self.shape)) * 4
        if len(self.float32_le) != expected:
            raise InvalidArgument(f"{field_name} holds {len(self.float32_le)} bytes, shape {list(self.shape)} needs "
                                  f"{expected}", field=field_name)
        return np.frombuffer(self.float32_le, dtype="<f4").reshape(self.shape).astype(np.float32)


@dataclass(frozen=True)
class SynthesisItem:
    seed: int = -1                       # -1: random
    audio_codes: tuple[int, ...] = ()
    noise_mix: tuple[tuple[int, float], ...] = ()  # retake: (seed, weight) terms of every draw; empty: seed


@dataclass(frozen=True)
class SynthesisRequest:
    """One Synthesize call (pure data)."""

    request_id: str
    params: GenerationParams
    items: tuple[SynthesisItem, ...]
    audio_format: str = "flac"
    stream_pcm: bool = False
    src_latents: Optional[LatentArray] = None
    timeout_s: Optional[float] = None    # time left before the caller's deadline
    return_latents: bool = False         # ItemDone carries the item's final latents
    vae_seed: Optional[int] = None       # VAE encode sampling seed; None: the first item's seed


@dataclass(frozen=True)
class Accepted:
    request_id: str
    queue_position: int


@dataclass(frozen=True)
class BatchInfo:
    batch_size: int
    num_requests: int
    num_steps: int


@dataclass(frozen=True)
class Progress:
    stage: str                           # "conditioning" | "diffusion" | "decode" | "encode"
    fraction: float
    current: int = 0
    total: int = 0
    message: str = ""


@dataclass(frozen=True)
class PcmChunk:
    item_index: int
    sample_rate_hz: int
    num_channels: int
    start_sample: int
    pcm_s16le: bytes
    is_last: bool


@dataclass(frozen=True)
class FileChunk:
    item_index: int
    audio_format: str
    offset: int
    data: bytes
    is_last: bool
    total_bytes: int


@dataclass(frozen=True)
class ItemDone:
    item_index: int
    seed: int
    sample_rate_hz: int
    num_samples: int
    duration_s: float
    latents: Optional[np.ndarray] = None  # [T, 64] float32, when the request asked for them


@dataclass(frozen=True)
class Done:
    time_costs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedAudio:
    latents: np.ndarray                  # [T, 64] float32
    codes: list[int]
    duration_s: float
