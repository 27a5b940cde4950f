"""Audio bytes in and out: decode, normalization to 48 kHz stereo, post-processing, encoding, chunking."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from shared import audio
from shared.constants import AUDIO_FORMATS
from shared.errors import InvalidArgument

RATE = 48_000


def _tone(freq_hz: float, duration_s: float, rate: int = RATE, channels: int = 2, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(duration_s * rate)) / rate
    rows = [amplitude * np.sin(2 * np.pi * freq_hz * (c + 1) * t) for c in range(channels)]
    return np.stack(rows).astype(np.float32)  # [C, S]


def _file(waveform: np.ndarray, rate: int, container: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform.T, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def _dominant_hz(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal))
    return float(np.fft.rfftfreq(signal.size, 1 / rate)[np.argmax(spectrum)])


def test_every_service_format_has_an_encoding() -> None:
    for audio_format in AUDIO_FORMATS:
        assert audio.encode_audio(_tone(440, 0.1), audio_format)


@pytest.mark.parametrize(
    ("audio_format", "tolerance_s"), [("wav", 0.0), ("flac", 0.0), ("mp3", 0.06), ("ogg", 0.06)]
)
def test_round_trip_keeps_duration_channels_and_content(audio_format: str, tolerance_s: float) -> None:
    original = _tone(440, 2.0)
    decoded, rate = audio.decode_audio(audio.encode_audio(original, audio_format), field="audio")
    assert rate == RATE
    assert decoded.dtype == np.float32
    assert decoded.shape[0] == 2
    assert abs(decoded.shape[1] - original.shape[1]) / RATE <= tolerance_s
    for channel in range(2):
        assert _dominant_hz(decoded[channel], rate) == pytest.approx(440.0 * (channel + 1), abs=1.0)
    if audio_format in ("wav", "flac"):
        np.testing.assert_allclose(decoded, original, atol=1.0 / 32767 + 1e-6)


def test_mp3_is_128_kbit_constant_bitrate() -> None:
    data = audio.encode_audio(_tone(440, 4.0), "mp3")
    assert len(data) * 8 / 4.0 / 1000 == pytest.approx(128, rel=0.05)


def test_encode_clamps_out_of_range_samples() -> None:
    loud = np.array([[2.0, -3.0, 0.25], [0.0, 1.5, -0.25]], dtype=np.float32)
    decoded, _ = audio.decode_audio(audio.encode_audio(loud, "wav"), field="audio")
    np.testing.assert_allclose(decoded, np.clip(loud, -1, 1), atol=1.0 / 32767)


def test_encode_refuses_unknown_format() -> None:
    with pytest.raises(InvalidArgument, match="audio_format must be one of flac, wav, mp3, ogg, got 'aac'"):
        audio.encode_audio(_tone(440, 0.1), "aac")


def test_mono_44k1_becomes_stereo_48k() -> None:
    mono = _tone(1000, 1.0, rate=44_100, channels=1)
    stereo = audio.decode_to_stereo_48k(_file(mono, 44_100), field="src_audio")
    assert stereo.shape == (2, RATE)
    assert stereo.dtype == np.float32
    np.testing.assert_array_equal(stereo[0], stereo[1])
    assert _dominant_hz(stereo[0], RATE) == pytest.approx(1000.0, abs=1.0)
    assert np.max(np.abs(stereo[0, 1000:-1000])) == pytest.approx(0.5, abs=0.01)


def test_resampled_length_is_ceil_of_the_rate_ratio() -> None:
    waveform = _tone(300, 1.1, rate=44_100, channels=2)[:, :44_101]  # 48001.09 samples at 48 kHz
    out = audio.normalize_to_stereo_48k(waveform, 44_100)
    assert out.shape == (2, 48_002)


def test_extra_channels_dropped_and_samples_clamped() -> None:
    four = np.stack([np.full(480, v, dtype=np.float32) for v in (1.5, -0.25, 0.75, 0.1)])
    data = _file(four, RATE, subtype="FLOAT")
    out = audio.decode_to_stereo_48k(data, field="src_audio")
    assert out.shape == (2, 480)
    np.testing.assert_array_equal(out[0], 1.0)
    np.testing.assert_array_equal(out[1], -0.25)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "src_audio is empty"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 12, "src_audio could not be decoded"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "src_audio could not be decoded"),
        (b"\x00\x00\x00\x20ftypM4A " + bytes(512), "src_audio could not be decoded"),
    ],
    ids=["empty", "corrupt-wav", "png", "m4a"],
)
def test_undecodable_bytes_are_invalid_argument(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment) as caught:
        audio.decode_audio(data, field="src_audio")
    assert caught.value.field == "src_audio"
    assert "BytesIO" not in caught.value.message


def test_file_without_samples_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="reference_audio holds no audio samples"):
        audio.decode_audio(_file(np.zeros((2, 0), np.float32), RATE), field="reference_audio")


def test_non_finite_samples_are_invalid_argument() -> None:
    waveform = _tone(440, 0.01)
    waveform[0, 3] = np.nan
    with pytest.raises(InvalidArgument, match="NaN or infinite"):
        audio.decode_audio(_file(waveform, RATE, subtype="FLOAT"), field="src_audio")


def test_max_duration_is_checked_before_decoding() -> None:
    data = _file(_tone(440, 2.0), RATE)
    assert audio.decode_audio(data, field="src_audio", max_duration_s=2.0)[0].shape == (2, 2 * RATE)
    with pytest.raises(InvalidArgument, match="src_audio duration must be at most 1.5 seconds, got 2.00"):
        audio.decode_audio(data, field="src_audio", max_duration_s=1.5)


def test_silence_checks() -> None:
    quiet = np.full((2, 100), 5e-7, dtype=np.float32)
    assert audio.is_silent(quiet)
    assert not audio.is_silent(_tone(440, 0.01))
    assert audio.is_output_silent(np.full((2, 100), 1e-5, dtype=np.float32))
    assert not audio.is_output_silent(np.full((2, 100), 2e-5, dtype=np.float32))


def test_postprocess_anti_clip_is_per_item() -> None:
    batch = np.stack([_tone(440, 0.1, amplitude=2.0), _tone(440, 0.1, amplitude=0.5)])  # [2, 2, S]
    out = audio.postprocess_output(batch)
    assert out.shape == batch.shape
    assert np.max(np.abs(out[0])) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(out[1], batch[1])
    np.testing.assert_allclose(out[0], batch[0] / np.max(np.abs(batch[0])), rtol=1e-6)


def test_postprocess_peak_normalization() -> None:
    batch = np.stack([_tone(440, 0.1, amplitude=0.2), np.zeros((2, 4800), np.float32)])
    out = audio.postprocess_output(batch, normalize=True, normalization_db=-1.0)
    assert np.max(np.abs(out[0])) == pytest.approx(10 ** (-1 / 20), rel=1e-5)
    np.testing.assert_array_equal(out[1], 0.0)
    single = audio.postprocess_output(_tone(440, 0.1, amplitude=0.2), normalize=True, normalization_db=-6.0)
    assert np.max(np.abs(single)) == pytest.approx(10 ** (-6 / 20), rel=1e-5)


def test_pcm16_is_interleaved_little_endian_and_clamped() -> None:
    waveform = np.array([[1.0, 0.5, 3.0], [-1.0, -0.5, 0.0]], dtype=np.float32)
    samples = np.frombuffer(audio.to_pcm16(waveform), dtype="<i2")
    assert samples.tolist() == [32767, -32767, 16384, -16384, 32767, 0]


def test_pcm16_chunks_hold_whole_frames() -> None:
    waveform = _tone(440, 0.01)[:, :10]  # [2, 10]
    chunks = list(audio.pcm16_chunks(waveform, chunk_samples=4))
    assert [len(c) for c in chunks] == [16, 16, 8]
    assert b"".join(chunks) == audio.to_pcm16(waveform)


def test_split_bytes_under_limit() -> None:
    data = bytes(range(256)) * (10 * 1024)  # 2.5 MiB
    pieces = audio.split_bytes(data)
    assert [len(p) for p in pieces] == [1024 * 1024, 1024 * 1024, 512 * 1024]
    assert b"".join(pieces) == data
    assert audio.split_bytes(b"abcde", max_chunk_bytes=2) == [b"ab", b"cd", b"e"]
    assert audio.split_bytes(b"") == []


@pytest.mark.parametrize("limit", [0, 4 * 1024 * 1024])
def test_split_bytes_refuses_limits_outside_grpc_message_size(limit: int) -> None:
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        audio.split_bytes(b"abc", max_chunk_bytes=limit)
