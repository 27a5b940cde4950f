"""The checkpoint view that lets vLLM's Qwen3 loader read published LM tensor names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lm_service.engine.weights import needs_tie_flag, needs_view, prepare_model_dir, read_tensor_names


def test_unprefixed_names_get_a_prefixed_view_with_identical_tensors(lm_dir: Path, tmp_path: Path) -> None:
    assert all(not name.startswith("model.") for name in read_tensor_names(lm_dir / "model.safetensors"))
    assert needs_view(lm_dir) and not needs_tie_flag(lm_dir)  # the test checkpoint ties embeddings
    view = prepare_model_dir(lm_dir, tmp_path)
    assert view != lm_dir
    original = load_file(str(lm_dir / "model.safetensors"))
    renamed = load_file(str(view / "model.safetensors"))
    assert sorted(renamed) == sorted("model." + name for name in original)
    for name, tensor in original.items():
        assert torch.equal(renamed["model." + name], tensor)
    assert (view / "tokenizer.json").resolve() == (lm_dir / "tokenizer.json").resolve()
    assert not needs_view(view)
    assert prepare_model_dir(lm_dir, tmp_path) == view  # built once, then reused
    assert prepare_model_dir(view, tmp_path) == view


def test_sharded_checkpoint_without_head_gets_a_renamed_index_and_the_tie_flag(lm_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "sharded"
    source.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(lm_dir / name, source / name)
    config = json.loads((source / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (source / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(lm_dir / "model.safetensors"))
    names = sorted(tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(source / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    assert needs_tie_flag(source)
    view = prepare_model_dir(source, tmp_path / "views")
    assert json.loads((view / "config.json").read_text())["tie_word_embeddings"] is True
    weight_map = json.loads((view / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == {"model." + n for n in names}
    for file in shards:
        assert all(n.startswith("model.") for n in read_tensor_names(view / file))
