"""The ``acestep`` command line covers the inference API: a flag for every GenerationParams and
GenerationConfig field, the documents' defaults, JSON files with the SDK's dicts, grouped help."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from gateway import cli
from shared.types import GenerationConfig, GenerationParams


def _parse(*argv: str):
    args = cli.build_parser().parse_args(["generate", *argv])
    return cli._params(args), cli._config(args)


def test_every_field_has_a_flag() -> None:
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    inputs = [f.name for f in dataclasses.fields(GenerationParams) if not f.name.startswith("cot_")]
    for name in inputs + [f.name for f in dataclasses.fields(GenerationConfig)]:
        assert f"--{name.replace('_', '-')}" in help_text, name
    grouped = [name for _, names in cli.PARAM_GROUPS for name in names]
    assert sorted(grouped) == sorted(inputs)  # each input in exactly one documented group
    for title, _ in cli.PARAM_GROUPS:
        assert f"GenerationParams: {title}:" in help_text


def test_defaults_are_the_documents() -> None:
    params, config = _parse()
    assert params == GenerationParams()
    assert config == GenerationConfig()
    assert params.shift == 1.0 and config.batch_size == 2 and params.lora_id is None


def test_flags_and_json_files(tmp_path: Path) -> None:
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({"caption": "from file", "bpm": 90, "timesteps": [0.9, 0.4, 0.0],
                                       "use_adg": True}))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"batch_size": 4, "audio_format": "wav"}))
    params, config = _parse("--params", str(params_file), "--config", str(config_file), "--bpm", "120",
                            "--no-thinking", "--track-classes", "drums,bass", "--seeds", "1,2", "--shift", "3")
    assert (params.caption, params.bpm, params.timesteps, params.use_adg) == ("from file", 120, [0.9, 0.4, 0.0], True)
    assert params.thinking is False and params.track_classes == ["drums", "bass"] and params.shift == 3.0
    assert (config.batch_size, config.audio_format, config.seeds) == (4, "wav", [1, 2])


def test_single_seed_forms() -> None:
    _, config = _parse("--seeds", "7")
    assert config.seeds == 7
    params, config = _parse("--seed", "9")
    assert params.seed == 9 and config.use_random_seed is False
    params, config = _parse("--seed", "9", "--use-random-seed")
    assert config.use_random_seed is True


def test_old_spellings_still_work() -> None:
    params, config = _parse("--task", "cover", "--steps", "4", "--format", "ogg", "--language", "en",
                            "--repaint-start", "1", "--repaint-end", "5", "--track", "drums", "--guidance", "5")
    assert (params.task_type, params.inference_steps, config.audio_format, params.vocal_language) == \
        ("cover", 4, "ogg", "en")
    assert (params.repainting_start, params.repainting_end, params.track_name, params.guidance_scale) == \
        (1.0, 5.0, "drums", 5.0)


def test_unknown_fields_in_a_file_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"captoin": "typo"}))
    with pytest.raises(SystemExit, match="captoin"):
        _parse("--params", str(bad))


def test_lora_flags_blend_adapters() -> None:
    params, _ = _parse("--lora", "style-a", "--lora", "style-b:0.25", "--lora-id", "base-style", "--lora-scale", "0.5")
    assert params.loras == [("style-a", 1.0), ("style-b", 0.25)]
    assert (params.lora_id, params.lora_scale) == ("base-style", 0.5)
    with pytest.raises(SystemExit):
        _parse("--lora", "style-a:loud")
