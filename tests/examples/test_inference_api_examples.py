"""The code examples of the inference API document (``../shared/seeds/inference-api*.md``), run
through the SDK against a real stack on the tiny checkpoints.

Each test is the document's example with one change: ``client`` (a gateway connection) stands
where the document passes ``dit_handler, llm_handler`` / ``llm_handler``. Durations the tiny CPU
stack would take minutes over are the document's own where they are short, and the assertions
check the documented shape of the result: ``success``, files that exist, ``tensor`` of
``[2, samples]``, ``key``, ``params["seed"]``, the ``time_costs`` keys and the metadata fields.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.sdk import GenerationConfig, GenerationParams, create_sample, format_sample, generate_music
from gateway.sdk import understand_music
from shared.constants import SAMPLE_RATE_HZ


def check_generation(result, batch_size: int, duration_s: float | None = None) -> None:
    assert result.success, result.error
    assert len(result.audios) == batch_size
    for audio in result.audios:
        assert Path(audio["path"]).is_file()
        tensor = audio["tensor"]
        assert tensor.shape[0] == 2 and tensor.ndim == 2
        if duration_s is not None:
            assert tensor.shape[1] == round(duration_s * SAMPLE_RATE_HZ)
        assert audio["sample_rate"] == SAMPLE_RATE_HZ
        assert isinstance(audio["key"], str) and audio["key"]
        assert 0 <= audio["params"]["seed"] < 2**32
    assert {"dit_total_time_cost", "pipeline_total_time"} <= set(result.extra_outputs["time_costs"])


def test_quick_start(client, tmp_path: Path) -> None:
    params = GenerationParams(caption="upbeat electronic dance music with heavy bass", bpm=128, duration=30)
    config = GenerationConfig(batch_size=2, audio_format="flac")
    result = generate_music(client, params, config, save_dir=str(tmp_path))
    check_generation(result, 2, 30.0)
    for audio in result.audios:
        assert audio["path"].endswith(".flac") and audio["key"] in audio["path"]


def test_example_1_simple_text_to_music(client, tmp_path: Path) -> None:
    params = GenerationParams(task_type="text2music", caption="calm ambient music with soft piano and strings",
                              duration=60, bpm=80, keyscale="C Major")
    config = GenerationConfig(batch_size=2, audio_format="flac")
    result = generate_music(client, params, config, save_dir=str(tmp_path))
    check_generation(result, 2, 60.0)
    for audio in result.audios:
        assert audio["params"]["keyscale"] == "C Major" and audio["params"]["bpm"] == 80


def test_example_2_song_with_lyrics(client, tmp_path: Path) -> None:
    params = GenerationParams(
        task_type="text2music", caption="pop ballad with emotional vocals",
        lyrics="""Verse 1:
Walking down the street today
Thinking of the words you used to say
Everything feels different now
But I'll find my way somehow
Chorus:
I'm moving on, I'm staying strong
This is where I belong
""", vocal_language="en", bpm=72, duration=45)
    config = GenerationConfig(batch_size=1)
    result = generate_music(client, params, config, save_dir=str(tmp_path))
    check_generation(result, 1, 45.0)
    assert result.audios[0]["params"]["vocal_language"] == "en"


def test_example_custom_timesteps(client, tmp_path: Path) -> None:
    params = GenerationParams(task_type="text2music", caption="jazz fusion with complex harmonies",
                              timesteps=[0.97, 0.76, 0.615, 0.5, 0.395, 0.28, 0.18, 0.085, 0], thinking=True,
                              duration=10)
    result = generate_music(client, params, GenerationConfig(batch_size=1), save_dir=str(tmp_path))
    check_generation(result, 1, 10.0)
    assert result.extra_outputs["lm_metadata"]["bpm"] is not None


def test_example_shift_turbo(client, tmp_path: Path) -> None:
    params = GenerationParams(task_type="text2music", caption="upbeat electronic dance music", inference_steps=8,
                              shift=3.0, infer_method="ode", duration=10)
    result = generate_music(client, params, GenerationConfig(batch_size=2), save_dir=str(tmp_path))
    check_generation(result, 2, 10.0)


def test_example_batch_with_specific_seeds(client, tmp_path: Path) -> None:
    params = GenerationParams(task_type="text2music", caption="epic cinematic trailer music", duration=10)
    config = GenerationConfig(batch_size=4, seeds=[42, 123, 456], use_random_seed=False, lm_batch_chunk_size=2)
    result = generate_music(client, params, config, save_dir=str(tmp_path))
    check_generation(result, 4, 10.0)
    seeds = [audio["params"]["seed"] for audio in result.audios]
    assert seeds[:3] == [42, 123, 456]


def test_example_5_simple_mode_with_create_sample(client, tmp_path: Path) -> None:
    sample = create_sample(client, query="energetic K-pop dance track with a catchy hook", vocal_language="ko")
    assert sample.success, sample.error
    params = GenerationParams(caption=sample.caption, lyrics=sample.lyrics, bpm=sample.bpm,
                              duration=sample.duration, keyscale=sample.keyscale,
                              vocal_language=sample.language, thinking=True)
    result = generate_music(client, params, GenerationConfig(batch_size=2), save_dir=str(tmp_path))
    check_generation(result, 2)


def test_example_6_format_and_enhance_user_input(client, tmp_path: Path) -> None:
    formatted = format_sample(client, caption="rock ballad", lyrics="[Verse]\nIn the darkness I found my way...")
    assert formatted.success, formatted.error
    params = GenerationParams(caption=formatted.caption, lyrics=formatted.lyrics, bpm=formatted.bpm,
                              duration=formatted.duration, keyscale=formatted.keyscale, thinking=True,
                              use_cot_metas=False)
    result = generate_music(client, params, GenerationConfig(batch_size=2), save_dir=str(tmp_path))
    check_generation(result, 2)


def test_helper_understand_music(client) -> None:
    result = understand_music(client, audio_codes="<|audio_code_123|><|audio_code_456|>" * 25, temperature=0.85,
                              use_constrained_decoding=True)
    assert result.success, result.error
    for name in ("caption", "lyrics", "keyscale", "language"):
        assert isinstance(getattr(result, name), str)
    assert result.bpm is None or 30 <= result.bpm <= 300


def test_helper_create_sample_then_generate_params(client) -> None:
    result = create_sample(client, query="a soft Bengali love song for a quiet evening", instrumental=False,
                           vocal_language="bn", temperature=0.85)
    assert result.success, result.error
    assert result.instrumental is False
    GenerationParams(caption=result.caption, lyrics=result.lyrics, bpm=result.bpm, duration=result.duration,
                     keyscale=result.keyscale, vocal_language=result.language)


def test_helper_format_sample_with_user_metadata(client) -> None:
    result = format_sample(client, caption="Latin pop, reggaeton", lyrics="[Verse 1]\nBailando en la noche...",
                           user_metadata={"bpm": 95}, temperature=0.85)
    assert result.success, result.error
    assert result.bpm == 95  # the constrained value is written verbatim


def test_best_practice_error_handling(client, tmp_path: Path) -> None:
    params = GenerationParams(caption="x", duration=10, keyscale="C\nmajor")
    result = generate_music(client, params, GenerationConfig(batch_size=1), save_dir=str(tmp_path))
    assert not result.success
    assert "keyscale" in result.error and result.status_message


@pytest.mark.parametrize("keyscale", ["Am", "F# minor", "C Major"])
def test_documented_keyscale_spellings(client, tmp_path: Path, keyscale: str) -> None:
    params = GenerationParams(caption="lofi", duration=10, keyscale=keyscale, thinking=False)
    result = generate_music(client, params, GenerationConfig(batch_size=1), save_dir=str(tmp_path))
    check_generation(result, 1, 10.0)
    assert result.audios[0]["params"]["keyscale"] == keyscale
