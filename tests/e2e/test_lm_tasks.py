"""Understand, create_sample and format_sample through the gateway (LM, and DiT for uploaded audio)."""

from __future__ import annotations

import random

from gateway import sdk
from shared.audio_codes import format_codes
from shared.constants import BPM_MAX, BPM_MIN, DURATION_MAX_S, DURATION_MIN_S, KEYSCALES, VALID_TIME_SIGNATURES
from tests.e2e.helpers import dits, rpc_count


def _assert_valid_metadata(result) -> None:
    """The constrained CoT always writes bpm (its first field) and only valid values. By the
    reference's rules EOS may end the output inside the caption that follows, which the tiny
    random-weight LM does, so a later field may be missing (None/empty) but never invalid."""
    assert result.success, result.error
    assert result.bpm is not None and BPM_MIN <= result.bpm <= BPM_MAX, result
    assert result.duration is None or DURATION_MIN_S <= result.duration <= DURATION_MAX_S, result
    assert result.keyscale == "" or result.keyscale in KEYSCALES, result
    assert result.timesignature == "" or result.timesignature in VALID_TIME_SIGNATURES, result


def test_understand_audio_codes(client) -> None:
    codes = [random.Random(5).randrange(64_000) for _ in range(50)]
    result = sdk.understand_music(client, audio_codes=format_codes(codes), temperature=0.7)
    _assert_valid_metadata(result)
    assert result.status_message.startswith("understood in")


def test_understand_uploaded_audio_goes_through_the_dit(client, stack, source_wav: bytes) -> None:
    encoded_before = rpc_count(dits(stack), "EncodeAudio", "OK")
    result = sdk.understand_music(client, audio=source_wav)
    _assert_valid_metadata(result)
    assert rpc_count(dits(stack), "EncodeAudio", "OK") == encoded_before + 1


def test_create_sample_respects_language_and_instrumental(client) -> None:
    result = sdk.create_sample(client, "a calm piano piece for a rainy evening", instrumental=True,
                               vocal_language="en")
    _assert_valid_metadata(result)
    assert result.instrumental is True
    assert result.language == "en"


def test_format_sample_keeps_user_metadata(client) -> None:
    user = {"bpm": 96, "keyscale": "A minor", "timesignature": "3", "duration": 42.0}
    result = sdk.format_sample(client, "slow waltz with strings", "[Verse]\nOne two three\n", user_metadata=user)
    _assert_valid_metadata(result)
    assert (result.bpm, result.keyscale, result.timesignature, result.duration) == (96, "A minor", "3", 42.0)
