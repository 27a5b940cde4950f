"""Structural configuration of the ACE-Step 1.5 DiT checkpoint, read from its ``config.json``.

Every structural field comes from the file. The class defaults of the published configuration
class are wrong for the published models (``in_channels=256``, no ``intermediate_size``), so a
required field that the file lacks is an error naming that field, never a silent default.

Optional fields and the value used when the file lacks them (the reference behaves the same):

* ``layer_types``: ``sliding_attention`` at even indices, ``full_attention`` at odd ones, one entry
  per DiT layer;
* ``attention_bias``: false; ``hidden_act``: ``"silu"`` (the only activation supported);
* ``encoder_hidden_size`` & co. (XL split): absent or null means the encoder side shares the
  decoder's widths;
* ``is_turbo``: true when the file says so or when ``model_version == "turbo"`` (the published
  turbo config carries both; the conformance checkpoint only the latter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared.errors import InvalidArgument

SLIDING = "sliding_attention"
FULL = "full_attention"

_REQUIRED_INT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "in_channels",
    "audio_acoustic_hidden_dim",
    "patch_size",
    "text_hidden_dim",
    "num_lyric_encoder_hidden_layers",
    "timbre_hidden_dim",
    "num_timbre_encoder_hidden_layers",
    "num_attention_pooler_hidden_layers",
    "pool_window_size",
    "fsq_dim",
    "fsq_input_num_quantizers",
)
_ENCODER_SPLIT_FIELDS = (
    "encoder_hidden_size",
    "encoder_intermediate_size",
    "encoder_num_attention_heads",
    "encoder_num_key_value_heads",
)


@dataclass(frozen=True)
class DiTConfig:
    """The fields of ``config.json`` that shape the module tree and its math."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    use_sliding_window: bool
    sliding_window: int | None
    layer_types: tuple[str, ...]
    in_channels: int
    audio_acoustic_hidden_dim: int
    patch_size: int
    text_hidden_dim: int
    num_lyric_encoder_hidden_layers: int
    timbre_hidden_dim: int
    num_timbre_encoder_hidden_layers: int
    num_attention_pooler_hidden_layers: int
    pool_window_size: int
    fsq_dim: int
    fsq_input_levels: tuple[int, ...]
    fsq_input_num_quantizers: int
    attention_bias: bool = False
    is_turbo: bool = False
    model_version: str | None = None
    encoder_hidden_size: int | None = None
    encoder_intermediate_size: int | None = None
    encoder_num_attention_heads: int | None = None
    encoder_num_key_value_heads: int | None = None

    @classmethod
    def from_json(cls, path: str | Path) -> DiTConfig:
        """Read ``config.json`` (a file, or a checkpoint folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise InvalidArgument(f"config.json not found at {path}", field="config")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{path} is not valid JSON: {exc}", field="config") from exc
        if not isinstance(data, dict):
            raise InvalidArgument(f"{path} must hold a JSON object", field="config")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        """Build from a parsed ``config.json``; unknown keys are ignored, missing required ones raise."""
        values: dict[str, Any] = {name: _int_field(data, name) for name in _REQUIRED_INT_FIELDS}
        values["rms_norm_eps"] = _float_field(data, "rms_norm_eps")
        values["rope_theta"] = _float_field(data, "rope_theta")
        values["use_sliding_window"] = _bool_field(data, "use_sliding_window")
        values["sliding_window"] = _sliding_window(data, values["use_sliding_window"])
        values["layer_types"] = _layer_types(data, values["num_hidden_layers"])
        values["fsq_input_levels"] = _levels(data)
        values["attention_bias"] = _bool_field(data, "attention_bias", default=False)
        values["model_version"] = data.get("model_version")
        values["is_turbo"] = bool(data.get("is_turbo", False)) or data.get("model_version") == "turbo"
        for name in _ENCODER_SPLIT_FIELDS:
            values[name] = _int_field(data, name) if data.get(name) is not None else None
        _check_unsupported(data)
        return cls(**values)

    def __post_init__(self) -> None:
        """Cross-field checks on every instance (``replace`` included); raise ``InvalidArgument``."""
        for name in _REQUIRED_INT_FIELDS:
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        self._check_attention()
        self._check_io_widths()

    def _check_attention(self) -> None:
        encoder = self.encoder_view()
        for config, prefix in ((self, ""), (encoder, "encoder_")):
            if config.num_attention_heads % config.num_key_value_heads:
                raise InvalidArgument(
                    f"{prefix}num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                    f"{prefix}num_key_value_heads ({config.num_key_value_heads})",
                    field=f"{prefix}num_key_value_heads",
                )
        if self.use_sliding_window and self.sliding_window is None:
            raise InvalidArgument("sliding_window is required when use_sliding_window is true", field="sliding_window")
        deepest = max(
            self.num_hidden_layers,
            self.num_lyric_encoder_hidden_layers,
            self.num_timbre_encoder_hidden_layers,
            self.num_attention_pooler_hidden_layers,
        )
        if len(self.layer_types) < deepest:
            raise InvalidArgument(
                f"layer_types needs at least {deepest} entries (every stack reads its layer i's type "
                f"from layer_types[i]), got {len(self.layer_types)}",
                field="layer_types",
            )

    def _check_io_widths(self) -> None:
        if self.in_channels != 3 * self.audio_acoustic_hidden_dim:
            raise InvalidArgument(
                f"in_channels must be 3 * audio_acoustic_hidden_dim = {3 * self.audio_acoustic_hidden_dim} "
                f"(source latents, chunk mask, noisy latents), got {self.in_channels}",
                field="in_channels",
            )
        encoder_width = self.encoder_view().hidden_size
        if self.fsq_dim != encoder_width:
            raise InvalidArgument(
                f"fsq_dim must equal the encoder hidden size {encoder_width}, got {self.fsq_dim}", field="fsq_dim"
            )

    @property
    def condition_dim(self) -> int:
        """Width of the packed encoder states the decoder's ``condition_embedder`` consumes."""
        return self.encoder_hidden_size or self.hidden_size

    def encoder_view(self) -> DiTConfig:
        """The config the encoder, tokenizer, detokenizer and ``null_condition_emb`` are built with.

        Reproduces the reference XL split: only when ``encoder_hidden_size`` is set and differs from
        ``hidden_size`` are the width, MLP width and head counts replaced by the ``encoder_*`` values
        (each falling back to the decoder's value when null). Otherwise the config itself.
        """
        if not self.encoder_hidden_size or self.encoder_hidden_size == self.hidden_size:
            return self
        return replace(
            self,
            hidden_size=self.encoder_hidden_size,
            intermediate_size=self.encoder_intermediate_size or self.intermediate_size,
            num_attention_heads=self.encoder_num_attention_heads or self.num_attention_heads,
            num_key_value_heads=self.encoder_num_key_value_heads or self.num_key_value_heads,
        )

    def layer_mask(self, layer_idx: int) -> LayerMask:
        """How layer ``layer_idx`` of any stack masks its self-attention.

        Full layers: key padding only. Sliding layers: the bidirectional window plus key padding.
        With ``use_sliding_window`` false the sliding layers get no mask at all, not even key
        padding (the reference hands them ``None``).
        """
        if self.layer_types[layer_idx] != SLIDING:
            return LayerMask(window=None, key_padding=True)
        if not self.use_sliding_window:
            return LayerMask(window=None, key_padding=False)
        return LayerMask(window=self.sliding_window, key_padding=True)


@dataclass(frozen=True)
class LayerMask:
    """Self-attention masking of one layer: key j is visible from query i iff ``|i - j| <= window``
    (no restriction when ``window`` is None) and, when ``key_padding``, key j is a valid token."""

    window: int | None
    key_padding: bool


def _missing(name: str) -> InvalidArgument:
    return InvalidArgument(f"config.json is missing the required field {name!r}", field=name)


def _int_field(data: dict[str, Any], name: str) -> int:
    if name not in data or data[name] is None:
        raise _missing(name)
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {value!r}", field=name)
    return value


def _float_field(data: dict[str, Any], name: str) -> float:
    if name not in data or data[name] is None:
        raise _missing(name)
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive number, got {value!r}", field=name)
    return float(value)


def _bool_field(data: dict[str, Any], name: str, default: bool | None = None) -> bool:
    if name not in data or data[name] is None:
        if default is None:
            raise _missing(name)
        return default
    value = data[name]
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {value!r}", field=name)
    return value


def _sliding_window(data: dict[str, Any], use_sliding_window: bool) -> int | None:
    if not use_sliding_window:
        return None
    value = _int_field(data, "sliding_window")
    if value < 0:
        raise InvalidArgument(f"sliding_window must be >= 0, got {value}", field="sliding_window")
    return value


def _layer_types(data: dict[str, Any], num_hidden_layers: int) -> tuple[str, ...]:
    value = data.get("layer_types")
    if value is None:
        return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_hidden_layers))
    if not isinstance(value, list) or any(item not in (SLIDING, FULL) for item in value):
        raise InvalidArgument(
            f"layer_types must be a list of {SLIDING!r} / {FULL!r}, got {value!r}", field="layer_types"
        )
    return tuple(value)


def _levels(data: dict[str, Any]) -> tuple[int, ...]:
    value = data.get("fsq_input_levels")
    if value is None:
        raise _missing("fsq_input_levels")
    if not isinstance(value, list) or not value or any(
        isinstance(level, bool) or not isinstance(level, int) or level < 2 for level in value
    ):
        raise InvalidArgument(
            f"fsq_input_levels must be a non-empty list of integers >= 2, got {value!r}", field="fsq_input_levels"
        )
    return tuple(value)


def _check_unsupported(data: dict[str, Any]) -> None:
    rope_scaling = data.get("rope_scaling")
    is_default = isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default"
    if rope_scaling is not None and not is_default:
        raise InvalidArgument(
            f"rope_scaling {rope_scaling!r} is not supported (only the default RoPE)", field="rope_scaling"
        )
    hidden_act = data.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise InvalidArgument(f"hidden_act must be 'silu', got {hidden_act!r}", field="hidden_act")
