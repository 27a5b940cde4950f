"""The non-text model inputs of a DiT batch, assembled from per-item specs (reference-dit §4.5-4.11).

Task recipes (what each row receives before the model's cover swap):

| task | src latents | chunk mask | is_cover |
|---|---|---|---|
| text2music | silence | all 1 | 0 |
| text2music with LM codes (run as ``cover``) | code hints | all 1 | 1 |
| cover (source) | source latents (hints = detok(tok(source))) | all 1 | 1 |
| repaint | source, silence inside the window | 1 in window | 0 |
| lego | source | 1 in window (default: whole) | 0 |
| extract / complete | source | all 1 | 0 |
| extend | silence, source, silence | 1 on both new ends | 0 |
| edit | silence (the source is the flow edit's start) | all 1 | 0 |

Every row shares ``T = max(row frames, 128)``; rows are padded with silence-latent frames at
their own positions. The silence latent is tiled when more frames are needed than it holds.
Outpainting (a repaint window before 0 or past the end of the source) pads the source in latent
space with silence frames, the latent of the zero audio the reference pads with.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from dit_service import studio
from dit_service.denoise import RepaintPlan
from shared.constants import DURATION_MAX_S, LATENT_FRAMES_PER_SECOND, SAMPLE_RATE_HZ, VAE_HOP_SAMPLES
from shared.errors import InvalidArgument

MIN_LATENT_FRAMES = 128
TIMBRE_FRAMES = 750                     # 30 s at 25 Hz
REFERENCE_CLIP_S = 30.0
REFERENCE_SEGMENTS = 3
FULL_SPAN_MASK_VALUE = 1.0              # reference-dit §10: 1.0 (not the newer 2.0 "auto" sentinel)
WINDOW_TASKS = ("repaint", "lego")
SOURCE_TASKS = ("cover", "repaint", "lego", "extract", "complete", "extend", "edit")
DEFAULT_DURATION_S = 30.0


@dataclass(frozen=True)
class SourcePlan:
    """Latent layout of a source-audio item: its length, outpaint padding and generate window."""

    num_frames: int                      # after padding
    pad_left_frames: int = 0
    pad_right_frames: int = 0
    window: Optional[tuple[int, int]] = None  # [start, end) frames to generate (repaint/lego); None: all
    windows: tuple[tuple[int, int], ...] = ()  # extend: several spans to generate (then window is None)


@dataclass
class RowInputs:
    """What one batch row needs besides its text (tensors on any device; ``[frames, 64]`` latents)."""

    num_frames: int
    is_cover: bool = False
    src_latents: Optional[Tensor] = None      # [num_frames, 64] source (padded); None: silence
    hints: Optional[Tensor] = None            # [>= num_frames, 64] LM hints of a cover row
    window: Optional[tuple[int, int]] = None
    silence_window: bool = False              # repaint: the window's source frames become silence
    refer_latents: Optional[Tensor] = None    # [750, 64] timbre reference; None: silence
    windows: tuple[tuple[int, int], ...] = ()  # several windows (extend); used instead of window

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """The ``[start, end)`` spans to generate; empty: the whole row."""
        return self.windows or ((self.window,) if self.window is not None else ())


@dataclass(frozen=True)
class BatchInputs:
    """Tensor inputs of ``prepare_condition`` for a batch (``T = max frames``, at least 128)."""

    src_latents: Tensor         # [B, T, 64]
    chunk_masks: Tensor         # [B, T, 64]
    is_covers: Tensor           # [B] bool
    hints: Optional[Tensor]     # [B, T, 64] when some row is a cover
    refer_packed: Tensor        # [B, 750, 64]
    refer_order: Tensor         # [B] int64
    non_cover_src: Tensor       # [B, T, 64]: cover rows silenced (the audio_cover_strength < 1 set)
    repaint: Optional[RepaintPlan]
    num_frames: tuple[int, ...]


def frames_for_samples(num_samples: int) -> int:
    """Latent frames of ``num_samples`` at 48 kHz (``samples // 1920``)."""
    return num_samples // VAE_HOP_SAMPLES


def text2music_frames(duration_s: float) -> int:
    """``int(round(max(0.1, d), 1) * 48000) // 1920``; ``d <= 0`` means the 30 s default."""
    duration_s = duration_s if duration_s > 0 else DEFAULT_DURATION_S
    return frames_for_samples(int(round(max(0.1, duration_s), 1) * SAMPLE_RATE_HZ))


def _seconds_to_frame(seconds: float) -> int:
    return int(seconds * SAMPLE_RATE_HZ // VAE_HOP_SAMPLES)


def plan_source(num_src_frames: int, task_type: str, start_s: float = 0.0, end_s: float = -1.0) -> SourcePlan:
    """Length, outpaint padding and window of a source item (repaint/lego use the window).

    ``start = floor(start_s * 25)``; a negative start pads the source on the left and the window
    moves with it; an end past the source pads on the right; ``end_s < 0`` means the end. The
    window is clamped to ``start in [0, T - 1]``, ``end in [start + 1, T]``.
    """
    if num_src_frames < 1:
        raise InvalidArgument("src_audio is shorter than one latent frame (40 ms)", field="src_audio")
    if task_type not in WINDOW_TASKS:
        return SourcePlan(num_frames=num_src_frames)
    start = _seconds_to_frame(start_s)
    end = _seconds_to_frame(end_s) if end_s >= 0 else None
    pad_left = max(0, -start)
    pad_right = max(0, end - num_src_frames) if end is not None else 0
    total = num_src_frames + pad_left + pad_right
    start = min(max(start + pad_left, 0), total - 1)
    end = total if end is None else min(max(end + pad_left, start + 1), total)
    return SourcePlan(num_frames=total, pad_left_frames=pad_left, pad_right_frames=pad_right, window=(start, end))


def plan_extend(num_src_frames: int, left_s: float, right_s: float) -> SourcePlan:
    """An extend item: ``round(left_s * 25)`` new frames before the source and ``round(right_s * 25)``
    after it, both generated (two repaint spans); the source in between is kept."""
    if num_src_frames < 1:
        raise InvalidArgument("src_audio is shorter than one latent frame (40 ms)", field="src_audio")
    left, right = studio.seconds_to_frames(left_s), studio.seconds_to_frames(right_s)
    if left + right < 1:
        raise InvalidArgument(f"extend_left_seconds + extend_right_seconds must add at least one latent frame "
                              f"(40 ms), got {left_s} + {right_s}", field="extend_right_seconds")
    total = num_src_frames + left + right
    if total > DURATION_MAX_S * LATENT_FRAMES_PER_SECOND:
        raise InvalidArgument(f"the extended song must be at most {DURATION_MAX_S:g} s, got "
                              f"{frames_to_seconds(num_src_frames):g} s of source + {left_s:g} s + {right_s:g} s",
                              field="extend_right_seconds")
    return SourcePlan(num_frames=total, pad_left_frames=left, pad_right_frames=right,
                      windows=studio.extend_spans(num_src_frames, left, right))


def silence_frames(silence_latent: Tensor, start: int, stop: int) -> Tensor:
    """Frames ``[start, stop)`` of the silence latent ``[1, T_sil, 64]``, tiled past its end -> ``[n, 64]``."""
    length = silence_latent.shape[1]
    if stop <= length:
        return silence_latent[0, start:stop]
    repeats = math.ceil(stop / length)
    return silence_latent[0].repeat(repeats, 1)[start:stop]  # [n, 64]


def pad_source(latents: Tensor, plan: SourcePlan, silence_latent: Tensor) -> Tensor:
    """Source latents ``[T_src, 64]`` with the plan's outpaint padding (silence frames) -> ``[T, 64]``."""
    parts = []
    if plan.pad_left_frames:
        parts.append(silence_frames(silence_latent, 0, plan.pad_left_frames).to(latents))
    parts.append(latents)
    if plan.pad_right_frames:
        end = plan.pad_left_frames + latents.shape[0]
        parts.append(silence_frames(silence_latent, end, end + plan.pad_right_frames).to(latents))
    return torch.cat(parts, dim=0) if len(parts) > 1 else latents


def reference_clip(audio: np.ndarray, seed: int) -> np.ndarray:
    """The 30 s timbre clip of a reference ``[2, S]`` at 48 kHz (reference ``process_reference_audio``).

    Audio shorter than 30 s is tiled until it is long enough; then one 10 s segment is taken from
    each third at an offset drawn from ``random.Random(seed)`` (the reference draws unseeded) and
    the three are concatenated -> ``[2, 1_440_000]``.
    """
    clip_samples = int(REFERENCE_CLIP_S * SAMPLE_RATE_HZ)
    segment = clip_samples // REFERENCE_SEGMENTS
    if audio.shape[-1] < clip_samples:
        audio = np.tile(audio, (1, math.ceil(clip_samples / audio.shape[-1])))
    third = audio.shape[-1] // REFERENCE_SEGMENTS
    rng = random.Random(seed)
    pieces = []
    for index in range(REFERENCE_SEGMENTS):
        offset = index * third + rng.randint(0, max(0, third - segment))
        pieces.append(audio[:, offset : offset + segment])
    return np.concatenate(pieces, axis=-1)  # [2, 1_440_000]


def _row_src(row: RowInputs, frames: int, silence: Tensor) -> Tensor:
    """Source latents of a row over the batch length ``frames`` -> ``[frames, 64]``."""
    base = silence_frames(silence, 0, frames).clone()  # [T, 64]
    own = row.hints if (row.is_cover and row.hints is not None) else row.src_latents
    if own is not None:
        length = min(row.num_frames, own.shape[0])
        base[:length] = own[:length].to(base)
    if row.silence_window:
        for start, end in row.spans:
            base[start:end] = silence_frames(silence, start, end).to(base)
    return base


def _row_mask(row: RowInputs, frames: int) -> Tensor:
    """Chunk mask of a row: 1 where new audio is generated -> ``[frames]`` float."""
    if not row.spans:
        return torch.full((frames,), FULL_SPAN_MASK_VALUE)
    return studio.spans_mask(row.spans, frames).float()


def _row_hints(row: RowInputs, frames: int, silence: Tensor) -> Tensor:
    """LM hints of a cover row padded with silence; silence for other rows -> ``[frames, 64]``."""
    base = silence_frames(silence, 0, frames).clone()
    if row.is_cover and row.hints is not None:
        length = min(frames, row.hints.shape[0])
        base[:length] = row.hints[:length].to(base)
    return base


def assemble(
    rows: Sequence[RowInputs], silence_latent: Tensor, dtype: torch.dtype, device: torch.device
) -> BatchInputs:
    """Stack per-row inputs over ``T = max(max frames, 128)`` in ``dtype`` on ``device``."""
    if not rows:
        raise InvalidArgument("a batch needs at least one row", field="items")
    silence = silence_latent.to(device=device, dtype=dtype)
    frames = max(MIN_LATENT_FRAMES, max(row.num_frames for row in rows))
    src = torch.stack([_row_src(row, frames, silence) for row in rows])  # [B, T, 64]
    mask_1d = torch.stack([_row_mask(row, frames) for row in rows]).to(device=device, dtype=dtype)  # [B, T]
    chunk_masks = mask_1d.unsqueeze(-1).expand(-1, -1, src.shape[-1]).contiguous()  # [B, T, 64]
    is_covers = torch.tensor([row.is_cover for row in rows], dtype=torch.bool, device=device)  # [B]
    hints = None
    if bool(is_covers.any()):
        hints = torch.stack([_row_hints(row, frames, silence) for row in rows])  # [B, T, 64]
    refer = [silence_frames(silence, 0, TIMBRE_FRAMES) if row.refer_latents is None else row.refer_latents.to(silence)
             for row in rows]
    silence_rows = silence_frames(silence, 0, frames).unsqueeze(0).expand_as(src)  # [B, T, 64]
    non_cover_src = torch.where(is_covers[:, None, None], silence_rows, src)  # [B, T, 64]
    return BatchInputs(
        src_latents=src,
        chunk_masks=chunk_masks,
        is_covers=is_covers,
        hints=hints,
        refer_packed=torch.stack(refer),  # [B, 750, 64]
        refer_order=torch.arange(len(rows), device=device),
        non_cover_src=non_cover_src,
        repaint=_repaint_plan(rows, mask_1d, src),
        num_frames=tuple(row.num_frames for row in rows),
    )


def _repaint_plan(rows: Sequence[RowInputs], mask_1d: Tensor, src: Tensor) -> Optional[RepaintPlan]:
    """Repaint injection/crossfade for the repaint rows; other rows get an all-True mask (untouched)."""
    if not any(row.silence_window and row.spans for row in rows):
        return None
    is_repaint = torch.tensor([row.silence_window for row in rows], device=mask_1d.device)[:, None]  # [B, 1]
    mask = torch.where(is_repaint, mask_1d > 0, torch.ones_like(mask_1d, dtype=torch.bool))  # [B, T]
    clean = torch.stack([
        _unsilenced(row, src[i]) for i, row in enumerate(rows)
    ])  # [B, T, 64]
    return RepaintPlan(mask=mask, clean_latents=clean)


def _unsilenced(row: RowInputs, src_row: Tensor) -> Tensor:
    """The row's source before the repaint window was silenced (the injection target) ``[T, 64]``."""
    if row.src_latents is None:
        return src_row
    clean = src_row.clone()
    length = min(row.num_frames, row.src_latents.shape[0])
    clean[:length] = row.src_latents[:length].to(clean)
    return clean


def source_rows(rows: Sequence[RowInputs], silence_latent: Tensor, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """Each row's source latents over the batch length (``T`` as in ``assemble``), silence after
    the row's end -> ``[B, T, 64]`` (the clean source an edit starts from)."""
    silence = silence_latent.to(device=device, dtype=dtype)
    frames = max(MIN_LATENT_FRAMES, max(row.num_frames for row in rows))
    return torch.stack([_row_src(row, frames, silence) for row in rows])


def frames_to_seconds(frames: int) -> float:
    return frames / LATENT_FRAMES_PER_SECOND
