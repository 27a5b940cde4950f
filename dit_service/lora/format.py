"""The adapter format: a PEFT LoRA of the DiT decoder, as the reference trainer saves it.

A folder holds ``adapter_config.json`` (PEFT's ``LoraConfig``) and ``adapter_model.safetensors``
with keys ``base_model.model.<decoder module>.lora_A.weight [r, in]`` and ``.lora_B.weight
[out, r]`` (``get_peft_model(model.decoder, ...)``; the module path may also start with
``decoder.`` when the whole model was wrapped). Loading is strict: every key must name a Linear
layer of the loaded decoder, come in an A/B pair and match the layer's shape and the rank the
config gives it (``r``, or ``rank_pattern``); the scaling is ``alpha / r`` (``alpha_pattern``
may override alpha; ``use_rslora``: ``alpha / sqrt(r)``), as PEFT computes it. Whatever is not a
plain low-rank delta (DoRA, LoRA biases, modules_to_save, LoKr) is refused with a message saying
so. The reference's LoKr output (LyCORIS ``lokr_weights.safetensors``) is not PEFT-loadable.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from shared.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LYCORIS_FILE = "lokr_weights.safetensors"
KEY_PREFIX = "base_model.model."
DECODER_PREFIX = "decoder."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
_MAX_PATTERN_CHARS = 256
_MAX_PATTERNS = 1024

LinearShapes = dict[str, tuple[int, int]]
"""Decoder Linear layers by module path (``layers.0.self_attn.q_proj``) -> ``(out_features, in_features)``."""


@dataclass(frozen=True)
class AdapterConfig:
    """What ``adapter_config.json`` says about the delta's rank and scaling."""

    rank: int
    alpha: float
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def rank_for(self, module_key: str) -> int:
        return _pattern_value(self.rank_pattern, module_key, self.rank)

    def scaling_for(self, module_key: str) -> float:
        """PEFT's scaling of one module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        rank = self.rank_for(module_key)
        alpha = _pattern_value(self.alpha_pattern, module_key, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


@dataclass(frozen=True)
class ModuleHeader:
    """One adapted decoder layer as the file declares it (shapes only, no tensor data)."""

    name: str          # decoder module path
    key_a: str         # safetensors keys of the pair
    key_b: str
    rank: int
    scaling: float


@dataclass(frozen=True)
class AdapterHeader:
    """An adapter checked against the decoder without reading its tensors."""

    config: AdapterConfig
    modules: tuple[ModuleHeader, ...]
    size_bytes: int    # of adapter_model.safetensors

    @property
    def targets(self) -> tuple[str, ...]:
        """Module kinds adapted (the last path component), sorted."""
        return tuple(sorted({module.name.rsplit(".", 1)[-1] for module in self.modules}))


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer, ready for the grouped matmuls: ``delta = scaling * x @ a_t @ b_t``."""

    name: str
    a_t: Tensor        # [in, r]  (lora_A transposed, contiguous)
    b_t: Tensor        # [r, out] (lora_B transposed, contiguous)
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a_t.shape[1])


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A loaded adapter: its layers' factors on the serving device and dtype."""

    lora_id: str
    modules: dict[str, LoraModule]
    num_bytes: int     # device memory of the factors


def parse_config(text: str, source: str = CONFIG_FILE) -> AdapterConfig:
    """Strictly read ``adapter_config.json``; anything but a plain LoRA delta is refused."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"{source} is not valid JSON: {error}", field="adapter_config") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{source} must hold a JSON object", field="adapter_config")
    peft_type = str(data.get("peft_type", "LORA")).upper()
    if peft_type == "LOKR":
        raise InvalidArgument(f"{source}: PEFT LoKr adapters are not supported (a Kronecker delta is not low-rank); "
                              "train a LoRA (peft_type LORA)", field="adapter_config")
    if peft_type != "LORA":
        raise InvalidArgument(f"{source}: peft_type must be LORA, got {data.get('peft_type')!r}",
                              field="adapter_config")
    _refuse_unsupported(data, source)
    rank = _positive_int(data.get("r"), "r", source)
    alpha = _number(data.get("lora_alpha", rank), "lora_alpha", source)
    ranks = tuple((key, _positive_int(value, f"rank_pattern[{key!r}]", source))
                  for key, value in _patterns(data, "rank_pattern", source))
    alphas = tuple((key, _number(value, f"alpha_pattern[{key!r}]", source))
                   for key, value in _patterns(data, "alpha_pattern", source))
    return AdapterConfig(rank=rank, alpha=alpha, use_rslora=bool(data.get("use_rslora", False)),
                         rank_pattern=ranks, alpha_pattern=alphas)


def read_header(folder: Path, targets: LinearShapes) -> AdapterHeader:
    """Check an adapter folder against the decoder's Linear layers (shapes and ranks; no tensor data)."""
    weights, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if (folder / LYCORIS_FILE).is_file() and not config_path.is_file():
        raise InvalidArgument(f"{folder.name}: LyCORIS LoKr adapters ({LYCORIS_FILE}, the reference trainer's LoKr "
                              f"output) are not supported; use a PEFT LoRA ({CONFIG_FILE} + {WEIGHTS_FILE})",
                              field="adapter")
    for path in (config_path, weights):
        if not path.is_file():
            raise InvalidArgument(f"{folder.name}: {path.name} is missing", field="adapter")
    config = parse_config(config_path.read_text(encoding="utf-8", errors="replace"))
    shapes = _file_shapes(weights)
    return AdapterHeader(config=config, modules=check_keys(config, shapes, targets),
                         size_bytes=weights.stat().st_size)


def check_keys(config: AdapterConfig, shapes: dict[str, tuple[tuple[int, ...], str]],
               targets: LinearShapes) -> tuple[ModuleHeader, ...]:
    """Map every ``key -> (shape, dtype)`` of the weights file onto a decoder Linear; errors name the key."""
    if not shapes:
        raise InvalidArgument(f"{WEIGHTS_FILE} holds no tensors", field="adapter")
    pairs: dict[str, dict[str, str]] = {}
    for key, (shape, dtype) in shapes.items():
        module_key, part = _split_key(key)
        name = module_key[len(DECODER_PREFIX):] if module_key.startswith(DECODER_PREFIX) else module_key
        if name not in targets:
            raise InvalidArgument(f"adapter key {key!r}: {name!r} is not a Linear layer of the DiT decoder",
                                  field="adapter")
        if dtype not in _FLOAT_DTYPES:
            raise InvalidArgument(f"adapter key {key!r}: dtype {dtype} is not a float type", field="adapter")
        pairs.setdefault(module_key, {})[part] = key
    modules = []
    for module_key, parts in pairs.items():
        for part, other in (("A", "B"), ("B", "A")):
            if part not in parts:
                raise InvalidArgument(f"adapter key {parts[other]!r} has no lora_{part}.weight partner",
                                      field="adapter")
        name = module_key[len(DECODER_PREFIX):] if module_key.startswith(DECODER_PREFIX) else module_key
        out_features, in_features = targets[name]
        rank = config.rank_for(module_key)
        for part, expected in (("A", (rank, in_features)), ("B", (out_features, rank))):
            found = tuple(shapes[parts[part]][0])
            if found != expected:
                raise InvalidArgument(f"adapter key {parts[part]!r} has shape {list(found)}, expected "
                                      f"{list(expected)} (rank {rank} of {name} [{out_features}, {in_features}])",
                                      field="adapter")
        modules.append(ModuleHeader(name, parts["A"], parts["B"], rank, config.scaling_for(module_key)))
    return tuple(sorted(modules, key=lambda module: module.name))


def load_adapter(folder: Path, lora_id: str, targets: LinearShapes, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> LoraAdapter:
    """Read and check an adapter folder; the factors land on ``device`` in ``dtype``."""
    header = read_header(folder, targets)
    modules: dict[str, LoraModule] = {}
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as handle:
        for module in header.modules:
            factors = []
            for key in (module.key_a, module.key_b):
                tensor = handle.get_tensor(key)
                if not bool(torch.isfinite(tensor).all()):
                    raise InvalidArgument(f"adapter key {key!r} holds NaN or infinite values", field="adapter")
                factors.append(tensor.t().to(device=device, dtype=dtype).contiguous())
            modules[module.name] = LoraModule(module.name, factors[0], factors[1], module.scaling)
    num_bytes = sum(t.numel() * t.element_size() for m in modules.values() for t in (m.a_t, m.b_t))
    return LoraAdapter(lora_id=lora_id, modules=modules, num_bytes=num_bytes)


def device_bytes(header: AdapterHeader, targets: LinearShapes, dtype: torch.dtype) -> int:
    """Memory the adapter's factors take once loaded in ``dtype``."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(m.rank * sum(targets[m.name]) * element for m in header.modules)


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (``<module>``, ``"A"``)."""
    if not key.startswith(KEY_PREFIX):
        raise InvalidArgument(f"adapter key {key!r} does not start with {KEY_PREFIX!r} (PEFT's key layout)",
                              field="adapter")
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[len(KEY_PREFIX):-len(suffix)], part
    raise InvalidArgument(f"adapter key {key!r}: only lora_A.weight and lora_B.weight tensors are supported "
                          "(no DoRA magnitudes, LoRA biases or embedding adapters)", field="adapter")


def _file_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                    for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidArgument(f"{path.name} is not a readable safetensors file: {error}", field="adapter") from None


def _refuse_unsupported(data: dict[str, Any], source: str) -> None:
    refusals = (
        ("use_dora", lambda v: bool(v), "DoRA adapters are not supported (not a pure low-rank delta)"),
        ("bias", lambda v: v not in (None, "none"), "bias must be 'none' (trained biases change the base layer)"),
        ("lora_bias", lambda v: bool(v), "lora_bias adapters are not supported"),
        ("modules_to_save", lambda v: bool(v), "modules_to_save is not supported (whole replaced modules)"),
        ("fan_in_fan_out", lambda v: bool(v), "fan_in_fan_out must be false (the decoder uses nn.Linear)"),
        ("layer_replication", lambda v: bool(v), "layer_replication is not supported"),
        ("target_parameters", lambda v: bool(v), "target_parameters is not supported"),
    )
    for name, refused, reason in refusals:
        if refused(data.get(name)):
            raise InvalidArgument(f"{source}: {name}={data.get(name)!r}: {reason}", field="adapter_config")


def _patterns(data: dict[str, Any], name: str, source: str) -> list[tuple[str, Any]]:
    patterns = data.get(name) or {}
    if not isinstance(patterns, dict):
        raise InvalidArgument(f"{source}: {name} must be an object", field="adapter_config")
    if len(patterns) > _MAX_PATTERNS:
        raise InvalidArgument(f"{source}: {name} holds {len(patterns)} entries, at most {_MAX_PATTERNS}",
                              field="adapter_config")
    for key in patterns:
        if len(key) > _MAX_PATTERN_CHARS:
            raise InvalidArgument(f"{source}: {name} key longer than {_MAX_PATTERN_CHARS} characters",
                                  field="adapter_config")
        try:
            re.compile(key)
        except re.error as error:
            raise InvalidArgument(f"{source}: {name} key {key!r} is not a valid pattern: {error}",
                                  field="adapter_config") from None
    return list(patterns.items())


def _pattern_value(patterns: tuple[tuple[str, Any], ...], module_key: str, default: Any) -> Any:
    """PEFT's rule: the first pattern (in file order) that matches the end of the module's path."""
    for pattern, value in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{source}: {name} must be a positive integer, got {value!r}", field="adapter_config")
    return value


def _number(value: Any, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{source}: {name} must be a finite number, got {value!r}", field="adapter_config")
    return float(value)
