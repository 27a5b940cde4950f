"""The published-size checkpoint writer: sizes from the published config, tokenizer grown to the vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from devtools.published_checkpoints import (
    PUBLISHED_LM_CONFIG, PUBLISHED_TEXT_ENCODER_CONFIG, pad_tokenizer_vocab, published_dit_config, retarget_special_ids,
)
from dit_service.model.config import DiTConfig
from dit_service.model.weights import build_meta_model
from shared.tiny_tokenizers import EOS_TOKEN, PAD_TOKEN, build_lm_tokenizer


def test_published_dit_config_gives_the_published_2b_tensor_layout() -> None:
    """reference-dit.md §1.5: 677 tensors, 2,393,872,518 parameters in the turbo model.safetensors."""
    model = build_meta_model(DiTConfig.from_dict(published_dit_config("turbo")))
    state = model.state_dict()
    assert len(state) == 677
    assert sum(tensor.numel() for tensor in state.values()) == 2_393_872_518
    assert published_dit_config("turbo")["text_hidden_dim"] == PUBLISHED_TEXT_ENCODER_CONFIG["hidden_size"]
    assert published_dit_config("turbo")["is_turbo"] and not published_dit_config("base")["is_turbo"]


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm")
    build_lm_tokenizer(folder)
    (folder / "config.json").write_text('{"model_type": "qwen3", "bos_token_id": 0, "eos_token_id": 1}')
    (folder / "generation_config.json").write_text('{"bos_token_id": 0, "eos_token_id": [1, 0]}')
    return folder


def test_padded_tokenizer_has_the_published_vocabulary_and_keeps_its_tokens(lm_folder: Path) -> None:
    before = AutoTokenizer.from_pretrained(str(lm_folder))
    text = "bpm: 120\nkeyscale: A minor<|im_end|><|audio_code_7|>"
    pad_tokenizer_vocab(lm_folder, PUBLISHED_LM_CONFIG["vocab_size"])
    after = AutoTokenizer.from_pretrained(str(lm_folder))
    assert len(after) == PUBLISHED_LM_CONFIG["vocab_size"] == 217_204
    shift = len(after) - len(before)
    first_code = after.convert_tokens_to_ids("<|audio_code_0|>")
    assert after.convert_tokens_to_ids("<|audio_code_63999|>") == first_code + 63_999 == len(after) - 1
    assert first_code == before.convert_tokens_to_ids("<|audio_code_0|>") + shift
    assert after.decode(after(text)["input_ids"]) == text
    assert [t if t < before.convert_tokens_to_ids(PAD_TOKEN) else t + shift for t in before(text)["input_ids"]] \
        == after(text)["input_ids"]
    with pytest.raises(ValueError, match="already has 217204 ids"):
        pad_tokenizer_vocab(lm_folder, 1000)


def test_special_ids_follow_the_padded_tokenizer(lm_folder: Path) -> None:
    retarget_special_ids(lm_folder)
    tokenizer = AutoTokenizer.from_pretrained(str(lm_folder))
    config = json.loads((lm_folder / "config.json").read_text())
    generation = json.loads((lm_folder / "generation_config.json").read_text())
    eos, pad = tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    assert (config["eos_token_id"], config["bos_token_id"], config["model_type"]) == (eos, pad, "qwen3")
    assert generation["eos_token_id"] == [eos, pad] and generation["pad_token_id"] == pad
    assert tokenizer.eos_token_id == eos and tokenizer.pad_token_id == pad
