"""Generate through the gateway: LM planning then DiT synthesis, files a client can play."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from gateway import sdk
from shared.audio_codes import format_codes
from shared.constants import KEYSCALES, MAX_AUDIO_CODE, NUM_CHANNELS, SAMPLE_RATE_HZ, VALID_TIME_SIGNATURES
from shared.types import GenerationConfig, GenerationParams
from tests.e2e.conftest import SOURCE_SECONDS
from tests.e2e.helpers import decode_file, quick_params

LYRICS = "[Verse]\nCity lights are fading slow\n\n[Chorus]\nHold on, hold on\n"
CODES_FOR_10_S = 50


def _kinds(events) -> list[str]:
    return [event.WhichOneof("event") for event in events]


def _run(client, params: GenerationParams, config: GenerationConfig, save_dir: Path):
    """The SDK result plus every raw event of the stream."""
    events = []
    result = sdk.generate_music(client, params, config, save_dir=str(save_dir), on_event=events.append)
    assert result.success, result.error
    return result, events


def _assert_plays(path: str, container: str, duration_s: float) -> np.ndarray:
    waveform, rate, found = decode_file(Path(path).read_bytes())
    assert found == container
    assert rate == SAMPLE_RATE_HZ
    assert waveform.shape == (NUM_CHANNELS, round(duration_s * SAMPLE_RATE_HZ))
    assert np.abs(waveform).max() > 0  # not silence
    return waveform


def test_text2music_with_thinking_plans_then_synthesizes(client, tmp_path: Path) -> None:
    params = GenerationParams(caption="dreamy synth-pop with a bright female vocal", lyrics=LYRICS, duration=10.0,
                              thinking=True, vocal_language="en")
    result, events = _run(client, params, GenerationConfig(batch_size=1, seeds=[42], audio_format="flac"), tmp_path)

    kinds = _kinds(events)
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    assert kinds.index("lm_result") < kinds.index("file")
    lm = next(event.lm_result for event in events if event.HasField("lm_result"))
    assert not lm.skipped
    # The CoT always starts with bpm; later fields can be jumped over by the reference's decoder (free
    # text after the caption may name a later field), but what it writes is valid.
    assert lm.metadata.HasField("bpm") and 30 <= lm.metadata.bpm <= 300
    planned = yaml.safe_load(lm.cot_text.removeprefix("<think>").removesuffix("</think>")) or {}
    assert set(planned) <= {"bpm", "caption", "duration", "keyscale", "language", "timesignature"}
    assert lm.metadata.keyscale in KEYSCALES or (lm.metadata.keyscale == "" and "keyscale" not in planned)
    assert [item.item_index for item in lm.codes] == [0]
    codes = list(lm.codes[0].codes)
    assert len(codes) == CODES_FOR_10_S and all(0 <= code <= MAX_AUDIO_CODE for code in codes)

    resolved = result.extra_outputs["params"]
    assert resolved["cot_bpm"] == lm.metadata.bpm and 30 <= resolved["cot_bpm"] <= 300
    assert resolved["cot_keyscale"] == lm.metadata.keyscale
    assert resolved["cot_timesignature"] == lm.metadata.timesignature
    assert lm.metadata.timesignature in VALID_TIME_SIGNATURES or "timesignature" not in planned
    assert resolved["cot_duration"] == 10.0  # the user's duration wins over the plan
    assert resolved["bpm"] == resolved["cot_bpm"]  # left open by the user, filled by the LM

    [audio] = result.audios
    assert audio.params["seed"] == 42 and audio.params["audio_codes"] == format_codes(codes)
    assert audio.path.endswith(".flac") and Path(audio.path).name.startswith(audio.key)
    _assert_plays(audio.path, "FLAC", 10.0)
    costs = result.extra_outputs["time_costs"]
    for key in ("lm_phase1_time", "lm_phase2_time", "dit_total_time_cost", "pipeline_total_time"):
        assert costs[key] > 0, key
    assert costs["pipeline_total_time"] >= costs["lm_phase2_time"] + costs["dit_total_time_cost"]


def test_text2music_without_thinking_skips_the_lm(client, tmp_path: Path) -> None:
    result, events = _run(client, quick_params(), GenerationConfig(batch_size=1, audio_format="ogg"), tmp_path)

    lm = next(event.lm_result for event in events if event.HasField("lm_result"))
    assert lm.skipped and not lm.codes
    costs = result.extra_outputs["time_costs"]
    assert not [key for key in costs if key.startswith("lm_")]
    assert costs["dit_total_time_cost"] > 0 and costs["pipeline_total_time"] > 0
    [audio] = result.audios
    assert audio.params["audio_codes"] == "" and audio.params["cot_bpm"] is None
    _assert_plays(audio.path, "OGG", 10.0)


def test_cover_of_an_uploaded_file_keeps_its_length(client, source_wav: bytes, tmp_path: Path) -> None:
    params = GenerationParams(task_type="cover", src_audio=source_wav, caption="jazz trio", audio_cover_strength=0.5)
    result, events = _run(client, params, GenerationConfig(batch_size=1, seeds=[3], audio_format="wav"), tmp_path)

    # The seed's "Style Cover with LM Reasoning": the LM plans metadata (thinking is on by default),
    # the structure comes from the source (no codes)
    lm = next(event.lm_result for event in events if event.HasField("lm_result"))
    assert not lm.skipped and not lm.codes and lm.metadata.HasField("bpm")
    assert result.extra_outputs["lm_metadata"]["bpm"] == lm.metadata.bpm
    [audio] = result.audios
    assert audio.params["task_type"] == "cover" and audio.params["src_audio"] is None  # bytes not echoed
    _assert_plays(audio.path, "WAV", SOURCE_SECONDS)


def test_repaint_past_the_end_outpaints(client, source_wav: bytes, tmp_path: Path) -> None:
    params = GenerationParams(task_type="repaint", src_audio=source_wav, caption="jazz trio",
                              repainting_start=1.0, repainting_end=SOURCE_SECONDS + 1.0)
    result, _ = _run(client, params, GenerationConfig(batch_size=1, seeds=[4], audio_format="wav"), tmp_path)

    [audio] = result.audios
    _assert_plays(audio.path, "WAV", SOURCE_SECONDS + 1.0)  # the window reaches one second past the source


def test_batch_with_given_seeds_is_reproducible(client, tmp_path: Path) -> None:
    params = GenerationParams(caption="warm acoustic folk", duration=10.0, thinking=True, instrumental=True)
    config = GenerationConfig(batch_size=3, seeds=[11, 22, 33], use_random_seed=False, audio_format="wav")
    runs = [_run(client, params, config, tmp_path / f"run{index}")[0] for index in range(2)]

    first, second = runs
    assert [a.params["seed"] for a in first.audios] == [11, 22, 33]
    assert len({a.key for a in first.audios}) == 3
    assert len({a.params["audio_codes"] for a in first.audios}) == 3  # one code sequence per item
    for one, two in zip(first.audios, second.audios):
        assert one.key == two.key  # same parameters, seed and codes: same key
        assert one.params["audio_codes"] == two.params["audio_codes"]
        wave_one = _assert_plays(one.path, "WAV", 10.0)
        wave_two = _assert_plays(two.path, "WAV", 10.0)
        assert np.array_equal(wave_one, wave_two)
