"""Every documented range is enforced with a message naming the field, the value and the limit."""

from __future__ import annotations

import dataclasses

import pytest

from shared.errors import InvalidArgument
from shared.types import (
    CreateSampleParams,
    FormatSampleParams,
    GenerationConfig,
    GenerationParams,
    MusicMetadata,
    UnderstandParams,
)
from shared.validation import (
    normalize_keyscale,
    normalize_timesignature,
    validate_create_sample,
    validate_format_sample,
    validate_generation,
    validate_understand,
)

WAV_BYTES = b"RIFF-placeholder"  # presence is all the params-level check looks at


def _fails(params: GenerationParams, config: GenerationConfig | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        validate_generation(params, config or GenerationConfig())
    return info.value


@pytest.mark.parametrize("keyscale", ["Am", "F# minor", "C Major", "B\u266d minor", "Ab major", "c   MAJOR"])
def test_documented_keyscale_spellings_are_accepted(keyscale: str) -> None:
    validate_generation(GenerationParams(caption="x", keyscale=keyscale, timesignature="3/4"), GenerationConfig())


def test_defaults_with_a_caption_are_valid() -> None:
    validate_generation(GenerationParams(caption="lofi"), GenerationConfig())
    validate_generation(GenerationParams(lyrics="[Verse]\nla la"), GenerationConfig())


@pytest.mark.parametrize(
    "changes, field, fragment",
    [
        ({}, "caption", "needs a caption or lyrics"),
        ({"caption": "  "}, "caption", "needs a caption or lyrics"),
        ({"task_type": "cover", "src_audio": b"x"}, "caption", "needs a caption"),
        ({"task_type": "repaint", "src_audio": b"x"}, "caption", "needs a caption"),
        ({"task_type": "lego", "src_audio": b"x", "caption": "guitar"}, "track_name", "needs the track"),
        ({"task_type": "complete", "src_audio": b"x", "caption": "rock"}, "track_classes", "needs the track"),
        ({"task_type": "extract", "src_audio": b"x"}, "track_name", "needs the track"),
    ],
)
def test_task_requirements(changes: dict, field: str, fragment: str) -> None:
    error = _fails(GenerationParams(**changes))
    assert error.field == field and fragment in error.message


@pytest.mark.parametrize(
    "changes",
    [
        {"task_type": "lego", "src_audio": b"x", "caption": "funky guitar",
         "instruction": "Generate the guitar track based on the audio context:"},
        {"task_type": "lego", "src_audio": b"x", "caption": "funky guitar", "track_name": "guitar"},
        {"task_type": "extract", "src_audio": b"x", "instruction": "Extract the vocals track from the audio:"},
        {"task_type": "extract", "src_audio": b"x", "instruction": "Extract the backing vocals track:"},
        {"task_type": "complete", "src_audio": b"x", "caption": "rock",
         "instruction": "Complete the input track with drums, bass, guitar:"},
        {"task_type": "complete", "src_audio": b"x", "caption": "rock", "track_classes": ["drums"]},
        {"task_type": "cover", "src_audio": b"x", "caption": "jazz piano version"},
    ],
)
def test_documented_task_inputs_are_accepted(changes: dict) -> None:
    validate_generation(GenerationParams(**changes), GenerationConfig())


@pytest.mark.parametrize(
    "changes, field, fragment",
    [
        ({"caption": "x" * 513}, "caption", "at most 512 characters, got 513"),
        ({"lyrics": "x" * 4097}, "lyrics", "at most 4096 characters, got 4097"),
        ({"bpm": 29}, "bpm", "bpm must be in [30, 300], got 29"),
        ({"bpm": 301}, "bpm", "bpm must be in [30, 300], got 301"),
        ({"duration": 700.0}, "duration", "duration must be in [10, 600] seconds (or <= 0 for automatic), got 700.0"),
        ({"duration": 5.0}, "duration", "[10, 600] seconds"),
        ({"inference_steps": 0}, "inference_steps", "inference_steps must be in [1, 200] steps, got 0"),
        ({"guidance_scale": 16.0}, "guidance_scale", "guidance_scale must be in [1.0, 15.0], got 16.0"),
        ({"guidance_scale": 0.5}, "guidance_scale", "[1.0, 15.0]"),
        ({"shift": 6.0}, "shift", "shift must be in [1.0, 5.0]"),
        ({"cfg_interval_start": -0.1}, "cfg_interval_start", "[0.0, 1.0]"),
        ({"cfg_interval_start": 0.8, "cfg_interval_end": 0.2}, "cfg_interval_start", "must not exceed"),
        ({"audio_cover_strength": 1.5}, "audio_cover_strength", "[0.0, 1.0], got 1.5"),
        ({"lm_temperature": 2.5}, "lm_temperature", "[0.0, 2.0]"),
        ({"lm_cfg_scale": 0.5}, "lm_cfg_scale", "[1.0, 10.0]"),
        ({"lm_top_k": -1}, "lm_top_k", "[0, 1000]"),
        ({"lm_top_p": 1.5}, "lm_top_p", "[0.0, 1.0]"),
        ({"seed": -2}, "seed", "seed must be in [-1, 4294967295], got -2"),
        ({"task_type": "remix"}, "task_type", "task_type must be one of text2music, cover"),
        ({"infer_method": "heun"}, "infer_method", "infer_method must be one of ode, sde"),
        ({"vocal_language": "xx"}, "vocal_language", "got 'xx'"),
        ({"keyscale": "C\nmajor"}, "keyscale", "one line"),
        ({"keyscale": "C major" * 10}, "keyscale", "at most 32"),
        ({"timesignature": "4/4\n"}, "timesignature", "one line"),
        ({"timesteps": [0.5, 0.9]}, "timesteps", "strictly descending"),
        ({"timesteps": [1.2, 0.5]}, "timesteps", "timesteps must be in [0.0, 1.0], got 1.2"),
        ({"timesteps": []}, "timesteps", "1 to 64 values"),
        ({"task_type": "lego", "src_audio": WAV_BYTES, "track_name": "kazoo"}, "track_name", "got 'kazoo'"),
        ({"task_type": "complete", "src_audio": WAV_BYTES, "track_classes": ["drums", "theremin"]},
         "track_classes", "got 'theremin'"),
        ({"track_name": "drums"}, "track_name", "only used by task_type 'lego' or 'extract'"),
        ({"task_type": "repaint"}, "src_audio", "task_type 'repaint' requires src_audio"),
        ({"task_type": "cover"}, "src_audio", "task_type 'cover' requires src_audio"),
        ({"repainting_start": 10.0, "repainting_end": 5.0}, "repainting_end", "greater than repainting_start"),
        ({"audio_codes": "<|audio_code_64000|>"}, "audio_codes", "64000"),
        ({"audio_codes": "hello"}, "audio_codes", "audio_codes"),
        ({"duration": float("nan")}, "duration", "nan"),
        ({"lora_id": "x" * 200}, "lora_id", "at most 128 characters"),
    ],
)
def test_param_limits(changes: dict, field: str, fragment: str) -> None:
    error = _fails(dataclasses.replace(GenerationParams(caption="lofi"), **changes))
    assert error.field == field
    assert fragment in error.message


@pytest.mark.parametrize(
    "changes, field, fragment",
    [
        ({"batch_size": 0}, "batch_size", "batch_size must be in [1, 8], got 0"),
        ({"batch_size": 9}, "batch_size", "batch_size must be in [1, 8], got 9"),
        ({"audio_format": "aiff"}, "audio_format", "audio_format must be one of flac, wav, mp3, ogg"),
        ({"seeds": [1] * 9}, "seeds", "at most 8"),
        ({"seeds": [-5]}, "seeds", "[-1, 4294967295]"),
        ({"lm_batch_chunk_size": 0}, "lm_batch_chunk_size", "[1, 8]"),
    ],
)
def test_config_limits(changes: dict, field: str, fragment: str) -> None:
    error = _fails(GenerationParams(caption="lofi"), dataclasses.replace(GenerationConfig(), **changes))
    assert error.field == field
    assert fragment in error.message


def test_auto_duration_and_valid_edge_values_pass() -> None:
    for duration in (-1.0, 0.0, 10.0, 600.0):
        validate_generation(GenerationParams(caption="lofi", duration=duration), GenerationConfig())
    params = GenerationParams(caption="lofi", bpm=30, keyscale="f# MINOR", timesignature="6/8", timesteps=[0.9, 0.5, 0.0],
                              task_type="cover", audio_codes="<|audio_code_0|><|audio_code_63999|>")
    validate_generation(params, GenerationConfig(batch_size=8, seeds=[0, 4294967295, -1]))


def test_normalizers() -> None:
    assert normalize_keyscale("  c   MAJOR ") == "C major"
    assert normalize_keyscale("B\u266d minor") == "B\u266d minor"
    assert normalize_timesignature("4/4") == "4"
    assert normalize_timesignature("6/8") == "6"
    assert normalize_timesignature("") == ""


def test_lm_side_requests() -> None:
    with pytest.raises(InvalidArgument, match="temperature must be in"):
        validate_understand(UnderstandParams(temperature=3.0))
    with pytest.raises(InvalidArgument, match="query must be at most 512"):
        validate_create_sample(CreateSampleParams(query="q" * 600))
    with pytest.raises(InvalidArgument, match="user_metadata.bpm must be in"):
        validate_format_sample(FormatSampleParams(user_metadata=MusicMetadata(bpm=1000)))
    validate_understand(UnderstandParams(audio_codes="NO USER INPUT"))


@pytest.mark.parametrize("job_id", ["abc\ndef", "\x00", "id\x1a"])
def test_a_source_job_id_with_control_characters_is_refused(job_id: str) -> None:
    error = _fails(GenerationParams(task_type="retake", caption="x", source_request_id=job_id))
    assert error.field == "source_request_id" and "control characters" in error.message
