"""Load a published-layout DiT checkpoint folder, strictly; write random-weight ones.

A checkpoint folder holds ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and, in real checkpoints, ``silence_latent.pt`` (a
``[1, 64, T_sil]`` tensor, loaded in safe mode and transposed to ``[1, T_sil, 64]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from dit_service.model.acestep import AceStepConditionGenerationModel
from dit_service.model.config import DiTConfig
from dit_service.model.layers import RMSNorm
from shared.errors import Internal, InvalidArgument

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SILENCE_FILE = "silence_latent.pt"
QUANTIZER_PREFIX = "tokenizer.quantizer."
INIT_STD = 0.05
_MAX_LISTED = 20


@dataclass(frozen=True)
class LoadedDiT:
    """A loaded checkpoint: the model (eval mode, no grad), its config and the silence latent.

    ``silence_latent`` is ``[1, T_sil, 64]`` in the model dtype, or None when the folder has none.
    """

    model: AceStepConditionGenerationModel
    config: DiTConfig
    silence_latent: Tensor | None


def build_meta_model(config: DiTConfig) -> AceStepConditionGenerationModel:
    """The module tree with parameters on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return AceStepConditionGenerationModel(config)


def expected_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key the config implies, with its shape, in registration order."""
    return {name: tuple(t.shape) for name, t in build_meta_model(config).state_dict().items()}


def load_dit(
    checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LoadedDiT:
    """Read ``config.json``, build the tree and load the weights strictly.

    Missing or unexpected keys and shape mismatches raise ``InvalidArgument`` naming them.
    Weights are cast to ``dtype`` (fp32, bf16 or fp16) except the FSQ quantizer's projections,
    which stay float32 so codes do not depend on the serving dtype.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise InvalidArgument(f"dtype must be one of float32, bfloat16, float16, got {dtype}", field="dtype")
    checkpoint_dir = Path(checkpoint_dir)
    config = DiTConfig.from_json(checkpoint_dir / "config.json")
    model = build_meta_model(config)
    files = _tensor_files(checkpoint_dir)
    check_state_shapes(expected_shapes(config), _file_shapes(files))
    state = _read_tensors(files, dtype, torch.device(device))
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)
    leftovers = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftovers:
        raise Internal(f"tensors left uninitialised after loading: {leftovers}")
    model.eval().requires_grad_(False)
    silence = load_silence_latent(checkpoint_dir, config, dtype, torch.device(device))
    return LoadedDiT(model=model, config=config, silence_latent=silence)


def check_state_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    """Raise ``InvalidArgument`` naming every missing key, unexpected key and shape mismatch."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    mismatched = [
        f"{name}: file {list(found[name])} vs model {list(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != shape
    ]
    groups = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{' ...' if len(items) > _MAX_LISTED else ''}"
        for label, items in groups
        if items
    ]
    if problems:
        raise InvalidArgument("checkpoint does not match config.json: " + "; ".join(problems), field="checkpoint")


def load_silence_latent(
    checkpoint_dir: Path, config: DiTConfig, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """``silence_latent.pt`` ``[1, C, T]`` -> ``[1, T, C]`` in ``dtype``; None when the file is absent."""
    path = checkpoint_dir / SILENCE_FILE
    if not path.is_file():
        return None
    latent = torch.load(path, map_location="cpu", weights_only=True)
    channels = config.audio_acoustic_hidden_dim
    if not isinstance(latent, Tensor) or latent.dim() != 3 or latent.shape[0] != 1 or latent.shape[1] != channels:
        shape = list(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
        raise InvalidArgument(f"{path} must hold a [1, {channels}, T] tensor, got {shape}", field="silence_latent")
    return latent.transpose(1, 2).contiguous().to(device=device, dtype=dtype)  # [1, T, C]


def _tensor_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file first, then the index)."""
    single = checkpoint_dir / WEIGHTS_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return {name: single for name in handle.keys()}
    index = checkpoint_dir / INDEX_FILE
    if not index.is_file():
        raise InvalidArgument(f"{checkpoint_dir} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}", field="checkpoint")
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidArgument(f"{index} has no weight_map", field="checkpoint")
    files = {name: checkpoint_dir / shard for name, shard in weight_map.items()}
    absent = sorted({str(path) for path in files.values() if not path.is_file()})
    if absent:
        raise InvalidArgument(f"shards listed in {index} are missing: {absent}", field="checkpoint")
    return files


def _file_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        wanted = [name for name, owner in files.items() if owner == path]
        with safe_open(path, framework="pt") as handle:
            present = set(handle.keys())
            for name in wanted:
                if name not in present:
                    raise InvalidArgument(f"{name} is listed for {path.name} but not stored there", field="checkpoint")
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _read_tensors(files: dict[str, Path], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as handle:
            for name in (n for n, owner in files.items() if owner == path):
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point():
                    tensor = tensor.to(torch.float32 if name.startswith(QUANTIZER_PREFIX) else dtype)
                state[name] = tensor.to(device)
    return state


def random_state_dict(config: DiTConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random weights in parameter-registration order from ``torch.Generator().manual_seed(seed)``.

    Every tensor is ``N(0, 0.05)``; RMSNorm gains are ``1 + N(0, 0.05)`` so attention is not flat.
    """
    model = build_meta_model(config)
    norm_gains = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        values = torch.randn(param.shape, generator=generator) * INIT_STD
        if name in norm_gains:
            values = values + 1.0
        state[name] = values.to(dtype)
    return state


def write_random_dit(
    out_dir: str | Path,
    config_dict: dict[str, Any],
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    silence_frames: int = 15000,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a random-weight checkpoint folder in the published layout and return its path.

    ``config.json`` is ``config_dict`` (plus ``model_type``/``architectures`` when absent),
    ``model.safetensors`` the ``random_state_dict`` (split into shards with an index when it
    exceeds ``max_shard_bytes``), ``silence_latent.pt`` a random ``[1, 64, silence_frames]`` fp32
    tensor standing in for the VAE latent of silence.
    """
    config = DiTConfig.from_dict(config_dict)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    published = {"architectures": ["AceStepConditionGenerationModel"], "model_type": "acestep", **config_dict}
    (out_dir / "config.json").write_text(json.dumps(published, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = random_state_dict(config, seed, dtype)
    _save_state(out_dir, state, max_shard_bytes)
    generator = torch.Generator().manual_seed(seed + 1)
    silence = torch.randn(1, config.audio_acoustic_hidden_dim, silence_frames, generator=generator)  # [1, 64, T]
    torch.save(silence, out_dir / SILENCE_FILE)
    return out_dir


def _save_state(out_dir: Path, state: dict[str, Tensor], max_shard_bytes: int | None) -> None:
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
