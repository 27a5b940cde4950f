"""Lossless round trips between the public data types and the protobufs, over every field."""

from __future__ import annotations

import dataclasses
import random

import pytest

from shared import convert
from shared.errors import InvalidArgument
from shared.pb.acestep.common.v1 import common_pb2
from shared.types import (
    CreateSampleParams,
    CreateSampleResult,
    FormatSampleParams,
    FormatSampleResult,
    GenerationConfig,
    GenerationParams,
    MusicMetadata,
    UnderstandParams,
    UnderstandResult,
)


def _distinct_value(field: dataclasses.Field, rng: random.Random):
    """A non-default value of the field's type, so a dropped field cannot go unnoticed."""
    name, kind = field.name, str(field.type)
    if name in ("reference_audio", "src_audio"):
        return bytes(rng.randrange(256) for _ in range(32))
    if name == "timesteps":
        return [0.9, 0.5, 0.25]
    if name == "track_classes" or name == "genres":
        return ["drums", "bass"]
    if name in ("seeds", "retake_seeds"):
        return [7, 2**32 - 1, -1]
    if name == "loras":
        return [("style-a", 0.5), ("style-b", 1.0)]
    if "bool" in kind:
        return not field.default
    if "int" in kind:
        return rng.randrange(31, 299)
    if "float" in kind:
        return rng.random() + 0.125
    if name == "audio_format":
        return "ogg"
    if name == "user_metadata":
        return MusicMetadata(bpm=99, keyscale="D minor", genres=["pop"], duration=42.5)
    return f"{name}-value-\u266d"


def _filled(cls):
    rng = random.Random(cls.__name__)
    values = {f.name: _distinct_value(f, rng) for f in dataclasses.fields(cls)}
    return cls(**values)


def test_generation_params_round_trip_every_field() -> None:
    params = _filled(GenerationParams)
    for field in dataclasses.fields(GenerationParams):
        assert getattr(params, field.name) != field.default or field.name in ("track_classes",), field.name
    back = convert.params_from_pb(convert.params_to_pb(params))
    assert back == params


def test_generation_params_defaults_and_none_round_trip() -> None:
    params = GenerationParams()
    assert params.bpm is None and params.timesteps is None
    back = convert.params_from_pb(common_pb2.GenerationParams.FromString(
        convert.params_to_pb(params).SerializeToString()))
    assert back == params


def test_generation_config_round_trip() -> None:
    for config in (_filled(GenerationConfig), GenerationConfig(), GenerationConfig(seeds=[], audio_format="mp3")):
        assert convert.config_from_pb(convert.config_to_pb(config)) == config
    assert convert.config_from_pb(convert.config_to_pb(GenerationConfig(seeds=5))).seeds == [5]


@pytest.mark.parametrize(
    "cls, message_cls",
    [
        (UnderstandParams, common_pb2.UnderstandParams),
        (CreateSampleParams, common_pb2.CreateSampleParams),
        (FormatSampleParams, common_pb2.FormatSampleParams),
        (UnderstandResult, common_pb2.UnderstandResult),
        (CreateSampleResult, common_pb2.CreateSampleResult),
        (FormatSampleResult, common_pb2.FormatSampleResult),
        (MusicMetadata, common_pb2.MusicMetadata),
    ],
)
def test_flat_messages_round_trip(cls, message_cls) -> None:
    value = _filled(cls)
    back = convert.simple_from_pb(convert.simple_to_pb(value, message_cls), cls)
    wire_fields = set(message_cls.DESCRIPTOR.fields_by_name)
    for field in dataclasses.fields(cls):
        if field.name in wire_fields:
            assert getattr(back, field.name) == getattr(value, field.name), field.name


def test_server_side_paths_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="src_audio must be uploaded as bytes"):
        convert.params_to_pb(GenerationParams(src_audio="/etc/passwd"))
