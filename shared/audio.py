"""Audio bytes in and out: decode, normalize to 48 kHz stereo, post-process, encode, chunk.

Waveforms are float32 numpy arrays, channels first: ``[channels, samples]`` (or ``[batch, channels,
samples]`` where stated). Decoding and encoding run in memory through libsndfile (``soundfile``);
resampling uses soxr. Nothing here knows about gRPC or torch.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import soundfile
import soxr

from shared.constants import AUDIO_FORMATS, NUM_CHANNELS, SAMPLE_RATE_HZ
from shared.errors import InvalidArgument

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "GRPC_MAX_MESSAGE_BYTES",
    "decode_audio",
    "normalize_to_stereo_48k",
    "decode_to_stereo_48k",
    "is_silent",
    "is_output_silent",
    "postprocess_output",
    "encode_audio",
    "to_pcm16",
    "pcm16_chunks",
    "split_bytes",
]

GRPC_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 1024 * 1024
INPUT_SILENCE_PEAK = 1e-6            # reference: input is silent if every |x| < 1e-6
OUTPUT_SILENCE_LEVEL = 1e-5          # reference: output is silent if RMS and peak <= 1e-5
_NORMALIZE_MIN_PEAK = 1e-6
_PCM16_SCALE = 32767.0
_WRITE_BLOCK_FRAMES = 48_000         # libsndfile's Vorbis writer is safest fed in modest blocks
_RESAMPLE_QUALITY = "VHQ"

# soundfile (container, subtype, extra write options) per output format. Compression level 0.65
# with constant bitrate is libsndfile/LAME's 128 kbit/s, the reference's default MP3 bitrate.
_ENCODINGS: dict[str, tuple[str, str, dict[str, object]]] = {
    "wav": ("WAV", "PCM_16", {}),
    "flac": ("FLAC", "PCM_16", {}),
    "mp3": ("MP3", "MPEG_LAYER_III", {"bitrate_mode": "CONSTANT", "compression_level": 0.65}),
    "ogg": ("OGG", "VORBIS", {}),
}


def decode_audio(data: bytes, field: str, max_duration_s: float | None = None) -> tuple[np.ndarray, int]:
    """Decode a WAV, FLAC, MP3 or OGG/Vorbis file held in memory.

    Args:
        data: the encoded file.
        field: the request field the bytes came from, used in error messages.
        max_duration_s: refuse longer audio before decoding it (``None``: no limit).

    Returns:
        ``(waveform, sample_rate_hz)``; waveform is float32 ``[channels, samples]`` at the file's rate.

    Raises:
        InvalidArgument: empty, corrupt or unsupported bytes, no samples, non-finite samples, or
            longer than ``max_duration_s``.
    """
    if not data:
        raise InvalidArgument(f"{field} is empty; expected a wav, flac, mp3 or ogg file", field=field)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as audio_file:
            sample_rate_hz = int(audio_file.samplerate)
            _check_duration(field, audio_file.frames, sample_rate_hz, max_duration_s)
            frames = audio_file.read(dtype="float32", always_2d=True)  # [S, C]
    except soundfile.SoundFileError as error:
        raise InvalidArgument(
            f"{field} could not be decoded as wav, flac, mp3 or ogg audio ({len(data)} bytes): {_reason(error)}",
            field=field,
        ) from error
    if frames.shape[0] == 0 or frames.shape[1] == 0:
        raise InvalidArgument(f"{field} holds no audio samples", field=field)
    if not np.isfinite(frames).all():
        raise InvalidArgument(f"{field} holds NaN or infinite samples", field=field)
    return np.ascontiguousarray(frames.T), sample_rate_hz  # [C, S]


def _check_duration(field: str, num_frames: int, sample_rate_hz: int, max_duration_s: float | None) -> None:
    if max_duration_s is None or sample_rate_hz <= 0:
        return
    duration_s = num_frames / sample_rate_hz
    if duration_s > max_duration_s:
        raise InvalidArgument(
            f"{field} duration must be at most {max_duration_s:g} seconds, got {duration_s:.2f}", field=field
        )


def _reason(error: soundfile.SoundFileError) -> str:
    """libsndfile's own reason without the repr of our in-memory buffer."""
    text = str(error)
    return text.split(": ", 1)[1] if ": " in text else text


def normalize_to_stereo_48k(waveform: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    """Bring decoded audio to the model's input form (reference ``_normalize_audio_to_stereo_48k``).

    1. mono is duplicated to two channels; beyond two, only the first two are kept;
    2. other rates are resampled to 48 kHz (soxr, very high quality); the length is
       ``ceil(samples * 48000 / rate)``, the reference resampler's length rule;
    3. samples are clamped to [-1, 1].

    Args:
        waveform: float ``[channels, samples]``.
        sample_rate_hz: its rate.

    Returns:
        float32 ``[2, samples_48k]``, C-contiguous.
    """
    if waveform.ndim != 2 or waveform.shape[0] == 0:
        raise ValueError(f"waveform must be [channels, samples], got shape {waveform.shape}")
    if waveform.shape[0] == 1:
        waveform = np.repeat(waveform, NUM_CHANNELS, axis=0)  # [2, S]
    waveform = waveform[:NUM_CHANNELS].astype(np.float32, copy=False)  # [2, S]
    if sample_rate_hz != SAMPLE_RATE_HZ:
        waveform = _resample(waveform, sample_rate_hz, SAMPLE_RATE_HZ)  # [2, S']
    return np.ascontiguousarray(np.clip(waveform, -1.0, 1.0), dtype=np.float32)


def _resample(waveform: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Resample ``[channels, samples]`` to exactly ``ceil(samples * to_hz / from_hz)`` samples."""
    num_out = math.ceil(waveform.shape[1] * to_hz / from_hz)
    resampled = soxr.resample(np.ascontiguousarray(waveform.T), from_hz, to_hz, quality=_RESAMPLE_QUALITY)  # [S', C]
    resampled = resampled[:num_out]
    if resampled.shape[0] < num_out:
        resampled = np.pad(resampled, ((0, num_out - resampled.shape[0]), (0, 0)))
    return resampled.T  # [C, S']


def decode_to_stereo_48k(data: bytes, field: str, max_duration_s: float | None = None) -> np.ndarray:
    """``decode_audio`` then ``normalize_to_stereo_48k``: float32 ``[2, samples]`` at 48 kHz."""
    waveform, sample_rate_hz = decode_audio(data, field, max_duration_s)
    return normalize_to_stereo_48k(waveform, sample_rate_hz)


def is_silent(waveform: np.ndarray, peak_threshold: float = INPUT_SILENCE_PEAK) -> bool:
    """True when every sample's magnitude is below ``peak_threshold`` (the reference's input check)."""
    return bool(waveform.size == 0 or np.max(np.abs(waveform)) < peak_threshold)


def is_output_silent(waveform: np.ndarray, level: float = OUTPUT_SILENCE_LEVEL) -> bool:
    """True when both RMS and peak are at most ``level`` (the reference's generated-audio check)."""
    if waveform.size == 0:
        return True
    samples = waveform.astype(np.float64, copy=False)
    rms = math.sqrt(float(np.mean(samples * samples)))
    return rms <= level and float(np.max(np.abs(samples))) <= level


def postprocess_output(waveform: np.ndarray, normalize: bool = False, normalization_db: float = -1.0) -> np.ndarray:
    """Reference output post-processing, per item over all its channels and samples.

    1. anti-clip: an item whose peak |x| exceeds 1 is divided by its peak;
    2. if ``normalize``: scale each item so its peak is ``10 ** (normalization_db / 20)``
       (-1 dBFS is about 0.891); items quieter than 1e-6 are left alone.

    Args:
        waveform: float ``[channels, samples]`` or ``[batch, channels, samples]``.

    Returns:
        float32 array of the same shape.
    """
    if waveform.ndim not in (2, 3):
        raise ValueError(f"waveform must be [C, S] or [B, C, S], got shape {waveform.shape}")
    out = waveform.astype(np.float32)  # a copy: callers keep their array
    peak = np.max(np.abs(out), axis=(-2, -1), keepdims=True)  # [..., 1, 1]
    out /= np.maximum(peak, 1.0)
    if normalize:
        target = 10.0 ** (normalization_db / 20.0)
        peak = np.max(np.abs(out), axis=(-2, -1), keepdims=True)  # [..., 1, 1]
        gain = np.where(peak >= _NORMALIZE_MIN_PEAK, target / np.maximum(peak, _NORMALIZE_MIN_PEAK), 1.0)
        out *= gain.astype(np.float32)
    return out


def encode_audio(waveform: np.ndarray, audio_format: str, sample_rate_hz: int = SAMPLE_RATE_HZ) -> bytes:
    """Encode float ``[channels, samples]`` as a complete file of ``audio_format``.

    Formats: ``wav`` and ``flac`` (16-bit PCM), ``mp3`` (128 kbit/s CBR), ``ogg`` (Vorbis). Samples
    are clamped to [-1, 1] first.

    Raises:
        InvalidArgument: unknown ``audio_format`` (field ``audio_format``).
    """
    if audio_format not in _ENCODINGS:
        raise InvalidArgument(
            f"audio_format must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}", field="audio_format"
        )
    if waveform.ndim != 2 or waveform.shape[1] == 0:
        raise ValueError(f"waveform must be a non-empty [channels, samples], got shape {waveform.shape}")
    container, subtype, options = _ENCODINGS[audio_format]
    frames = np.ascontiguousarray(np.clip(waveform, -1.0, 1.0).T, dtype=np.float32)  # [S, C]
    buffer = io.BytesIO()
    with soundfile.SoundFile(
        buffer, "w", samplerate=sample_rate_hz, channels=frames.shape[1],
        format=container, subtype=subtype, **options,
    ) as audio_file:
        for start in range(0, frames.shape[0], _WRITE_BLOCK_FRAMES):
            audio_file.write(frames[start : start + _WRITE_BLOCK_FRAMES])
    return buffer.getvalue()


def to_pcm16(waveform: np.ndarray) -> bytes:
    """Float ``[channels, samples]`` -> interleaved little-endian signed 16-bit PCM.

    Samples are clamped to [-1, 1] and scaled by 32767 with rounding to nearest.
    """
    frames = np.clip(waveform, -1.0, 1.0).T  # [S, C]
    return np.rint(frames * _PCM16_SCALE).astype("<i2").tobytes()


def pcm16_chunks(waveform: np.ndarray, chunk_samples: int) -> Iterator[bytes]:
    """Stream ``to_pcm16(waveform)`` in pieces of ``chunk_samples`` frames (the last may be shorter).

    Every chunk holds whole frames (all channels of a sample), so each one plays on its own.
    """
    if chunk_samples <= 0:
        raise ValueError(f"chunk_samples must be positive, got {chunk_samples}")
    for start in range(0, waveform.shape[-1], chunk_samples):
        yield to_pcm16(waveform[:, start : start + chunk_samples])


def split_bytes(data: bytes, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Split an encoded file into pieces of at most ``max_chunk_bytes`` (the last may be shorter).

    ``max_chunk_bytes`` must stay below gRPC's default 4 MiB message limit. Empty data gives ``[]``.
    """
    if not 0 < max_chunk_bytes < GRPC_MAX_MESSAGE_BYTES:
        raise ValueError(f"max_chunk_bytes must be in [1, {GRPC_MAX_MESSAGE_BYTES - 1}], got {max_chunk_bytes}")
    return [data[start : start + max_chunk_bytes] for start in range(0, len(data), max_chunk_bytes)]
