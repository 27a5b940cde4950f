"""Lossless conversion between the public data types (``shared.types``) and the protobufs.

Edge module: only servicers, gRPC clients and the SDK import it.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional, TypeVar

from shared import types as t
from shared.errors import InvalidArgument
from shared.pb.acestep.common.v1 import common_pb2 as pb

T = TypeVar("T")

AUDIO_FORMAT_TO_PB = {
    "wav": pb.AUDIO_FORMAT_WAV,
    "flac": pb.AUDIO_FORMAT_FLAC,
    "mp3": pb.AUDIO_FORMAT_MP3,
    "ogg": pb.AUDIO_FORMAT_OGG,
}
AUDIO_FORMAT_FROM_PB = {v: k for k, v in AUDIO_FORMAT_TO_PB.items()}
_AUDIO_FIELDS = ("reference_audio", "src_audio")


def _has(message: Any, name: str) -> bool:
    return message.HasField(name)


def _copy_plain(obj: Any, message: Any, skip: tuple[str, ...]) -> None:
    """Copy every dataclass field not in ``skip``: scalars, strings, optionals, repeated scalars."""
    for f in fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if value is None:
            message.ClearField(f.name)
        elif isinstance(value, list):
            getattr(message, f.name)[:] = value
        else:
            setattr(message, f.name, value)


def _read_plain(message: Any, cls: type[T], skip: tuple[str, ...]) -> dict[str, Any]:
    """Field values of ``cls`` read from ``message``; unset optional fields become None."""
    values: dict[str, Any] = {}
    descriptor = message.DESCRIPTOR.fields_by_name
    for f in fields(cls):
        if f.name in skip:
            continue
        field_desc = descriptor[f.name]
        if field_desc.has_presence and not _has(message, f.name):
            values[f.name] = None
        elif field_desc.is_repeated:
            values[f.name] = list(getattr(message, f.name))
        else:
            values[f.name] = getattr(message, f.name)
    return values


def audio_to_pb(source: Optional[t.AudioSource], field: str) -> Optional[pb.AudioInput]:
    """Bytes → AudioInput. A path must be read by the client first (services never open paths)."""
    if source is None:
        return None
    if isinstance(source, str):
        raise InvalidArgument(f"{field} must be uploaded as bytes; read the file on the client side", field=field)
    return pb.AudioInput(data=bytes(source))


def params_to_pb(params: t.GenerationParams) -> pb.GenerationParams:
    message = pb.GenerationParams()
    _copy_plain(params, message, skip=(*_AUDIO_FIELDS, "timesteps", "loras"))
    message.loras.extend(_lora_weight(entry) for entry in params.loras)
    for name in _AUDIO_FIELDS:
        audio = audio_to_pb(getattr(params, name), name)
        if audio is not None:
            getattr(message, name).CopyFrom(audio)
    if params.timesteps is not None:
        message.timesteps.values[:] = params.timesteps
    return message


def params_from_pb(message: pb.GenerationParams) -> t.GenerationParams:
    values = _read_plain(message, t.GenerationParams, skip=(*_AUDIO_FIELDS, "timesteps", "loras"))
    values["loras"] = [(weight.lora_id, weight.scale) for weight in message.loras]
    for name in _AUDIO_FIELDS:
        values[name] = getattr(message, name).data if _has(message, name) else None
    values["timesteps"] = list(message.timesteps.values) if _has(message, "timesteps") else None
    values["lora_id"] = values["lora_id"] or None  # the SDK's None is the protobuf's ""
    return t.GenerationParams(**values)


def _lora_weight(entry: Any) -> pb.LoraWeight:
    """One blend entry, ``(lora_id, scale)`` (a JSON file gives it as a two-element list)."""
    if isinstance(entry, (str, bytes)) or not hasattr(entry, "__len__") or len(entry) != 2:
        raise InvalidArgument(f"loras entries must be (lora_id, scale) pairs, got {entry!r}", field="loras")
    lora_id, scale = entry
    if not isinstance(lora_id, str) or isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidArgument(f"loras entries must be (lora_id, scale) pairs, got {entry!r}", field="loras")
    return pb.LoraWeight(lora_id=lora_id, scale=float(scale))


def config_to_pb(config: t.GenerationConfig) -> pb.GenerationConfig:
    message = pb.GenerationConfig()
    _copy_plain(config, message, skip=("seeds", "audio_format"))
    if config.audio_format not in AUDIO_FORMAT_TO_PB:
        raise InvalidArgument(
            f"audio_format must be one of {', '.join(AUDIO_FORMAT_TO_PB)}; got {config.audio_format!r}",
            field="audio_format",
        )
    message.audio_format = AUDIO_FORMAT_TO_PB[config.audio_format]
    if config.seeds is not None:
        seeds = [config.seeds] if isinstance(config.seeds, int) else list(config.seeds)
        message.seeds.values[:] = seeds
    return message


def config_from_pb(message: pb.GenerationConfig) -> t.GenerationConfig:
    values = _read_plain(message, t.GenerationConfig, skip=("seeds", "audio_format"))
    values["seeds"] = list(message.seeds.values) if _has(message, "seeds") else None
    if message.audio_format not in AUDIO_FORMAT_FROM_PB and message.audio_format != pb.AUDIO_FORMAT_UNSPECIFIED:
        raise InvalidArgument(f"audio_format {message.audio_format} is not a known AudioFormat "
                              f"(use one of {', '.join(AUDIO_FORMAT_TO_PB)})", field="audio_format")
    values["audio_format"] = AUDIO_FORMAT_FROM_PB.get(message.audio_format, "flac")
    return t.GenerationConfig(**values)


def metadata_to_pb(meta: t.MusicMetadata) -> pb.MusicMetadata:
    message = pb.MusicMetadata()
    _copy_plain(meta, message, skip=())
    return message


def metadata_from_pb(message: pb.MusicMetadata) -> t.MusicMetadata:
    return t.MusicMetadata(**_read_plain(message, t.MusicMetadata, skip=()))


def simple_to_pb(obj: Any, message_cls: type[T]) -> T:
    """Dataclass → protobuf for the flat messages (understand/create/format params and results)."""
    message = message_cls()
    names = {f.name for f in fields(obj)} - set(message.DESCRIPTOR.fields_by_name)
    skip = tuple(names | {"user_metadata"})
    _copy_plain(obj, message, skip=skip)
    if hasattr(obj, "user_metadata"):
        message.user_metadata.CopyFrom(metadata_to_pb(obj.user_metadata))
    return message


def simple_from_pb(message: Any, cls: type[T]) -> T:
    """Protobuf → dataclass for the flat messages; fields the message lacks keep their defaults."""
    names = {f.name for f in fields(cls)} - set(message.DESCRIPTOR.fields_by_name)
    values = _read_plain(message, cls, skip=tuple(names | {"user_metadata"}))
    if "user_metadata" in message.DESCRIPTOR.fields_by_name:
        values["user_metadata"] = metadata_from_pb(message.user_metadata)
    return cls(**values)
