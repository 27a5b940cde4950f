"""Makes an LM checkpoint folder loadable by vLLM's ``Qwen3ForCausalLM`` (reference §1.1, §7.8).

Published LM checkpoints may store tensor names without the ``model.`` prefix
(``embed_tokens.weight``, ``layers.0...``) and may leave out ``lm_head.weight`` because the
embeddings are tied. transformers copes with both; vLLM's Qwen3 loader needs the prefixed names
and a config that says the embeddings are tied. ``prepare_model_dir`` returns the folder itself
when it already fits, else a view folder: every file linked, except the safetensors files
(rewritten with renamed tensors: only the JSON header changes, the tensor bytes are copied as they
are), their index, and ``config.json`` when the tie flag must be set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_PREFIXES = ("model.", "lm_head.")
_INDEX_NAME = "model.safetensors.index.json"
_DONE_MARKER = ".view-complete"


def read_tensor_names(path: Path) -> list[str]:
    """Tensor names in a safetensors file (reads the header only)."""
    header, _ = _read_header(path)
    return [name for name in header if name != "__metadata__"]


def needs_view(model_dir: Path) -> bool:
    """True when vLLM cannot load ``model_dir`` as it is."""
    names = _all_tensor_names(model_dir)
    return any(not name.startswith(_PREFIXES) for name in names) or _needs_tie_flag(model_dir, names)


def prepare_model_dir(model_dir: Path | str, views_root: Path | str) -> Path:
    """``model_dir`` when vLLM can load it, else a view under ``views_root`` (built once, reused)."""
    model_dir = Path(model_dir).resolve()
    if not needs_view(model_dir):
        return model_dir
    view = Path(views_root) / f"{model_dir.name}-{_fingerprint(model_dir)}"
    if (view / _DONE_MARKER).exists():
        return view
    staging = view.with_name(view.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _fill_view(model_dir, staging)
    (staging / _DONE_MARKER).touch()
    try:
        staging.rename(view)  # atomic: a view folder is complete or absent
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished the same view first
    if not (view / _DONE_MARKER).exists():
        raise RuntimeError(f"could not build the vLLM view of {model_dir} in {view}")
    return view


def _fill_view(model_dir: Path, target_dir: Path) -> None:
    names = _all_tensor_names(model_dir)
    for source in sorted(model_dir.iterdir()):
        target = target_dir / source.name
        if source.suffix == ".safetensors":
            _write_renamed(source, target)
        elif source.name == _INDEX_NAME:
            _write_renamed_index(source, target)
        elif source.name == "config.json" and _needs_tie_flag(model_dir, names):
            _write_tied_config(source, target)
        else:
            target.symlink_to(source)


def vllm_tensor_name(name: str) -> str:
    """``layers.0.mlp...`` -> ``model.layers.0.mlp...``; prefixed names stay."""
    return name if name.startswith(_PREFIXES) else "model." + name


def needs_tie_flag(model_dir: Path | str) -> bool:
    """True when the checkpoint has no ``lm_head.weight`` and its config does not tie embeddings."""
    model_dir = Path(model_dir)
    return _needs_tie_flag(model_dir, _all_tensor_names(model_dir))


def _all_tensor_names(model_dir: Path) -> list[str]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return [name for path in files for name in read_tensor_names(path)]


def _needs_tie_flag(model_dir: Path, names: Iterable[str]) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    has_head = any(vllm_tensor_name(name) == "lm_head.weight" for name in names)
    return not has_head and not config.get("tie_word_embeddings", False)


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset where tensor data starts)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return header, 8 + length


def _write_renamed(source: Path, target: Path) -> None:
    header, data_start = _read_header(source)
    renamed = {name if name == "__metadata__" else vllm_tensor_name(name): value for name, value in header.items()}
    encoded = json.dumps(renamed, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # keep the tensor data 8-byte aligned
    with source.open("rb") as src, target.open("wb") as dst:
        dst.write(struct.pack("<Q", len(encoded)))
        dst.write(encoded)
        src.seek(data_start)
        shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)


def _write_renamed_index(source: Path, target: Path) -> None:
    index = json.loads(source.read_text())
    index["weight_map"] = {vllm_tensor_name(name): file for name, file in index.get("weight_map", {}).items()}
    target.write_text(json.dumps(index, indent=2))


def _write_tied_config(source: Path, target: Path) -> None:
    config = json.loads(source.read_text())
    config["tie_word_embeddings"] = True
    target.write_text(json.dumps(config, indent=2))


def _fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256(str(model_dir).encode())
    for path in sorted(model_dir.iterdir()):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
