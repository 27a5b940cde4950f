"""The tiny random-weight checkpoints load with the stock libraries, in the published layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from devtools import tiny_checkpoints as tc
from shared import tiny_tokenizers as tt
from shared.constants import NUM_AUDIO_CODES

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "golden"
REPO = Path(__file__).resolve().parents[3]
SEED = 7


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One full write through the CLI entry point, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("checkpoints")
    assert tc.main([str(out), "--seed", str(SEED)]) == 0
    return out


@pytest.fixture(scope="module")
def lm_tokenizer(root: Path) -> Any:
    return AutoTokenizer.from_pretrained(root / tc.LM_DIR)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def test_published_folder_layout(root: Path) -> None:
    assert sorted(p.name for p in (root / tc.LM_DIR).iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (root / tc.TEXT_ENCODER_DIR).iterdir()}
    assert {p.name for p in (root / tc.VAE_DIR).iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_lm_tokenizer_special_and_audio_code_ids(lm_tokenizer: Any) -> None:
    tokenizer = lm_tokenizer
    base = tokenizer.convert_tokens_to_ids(tt.PAD_TOKEN)
    ordered = [tt.PAD_TOKEN, tt.IM_START_TOKEN, tt.EOS_TOKEN, tt.THINK_TOKEN, tt.END_THINK_TOKEN]
    assert tokenizer.convert_tokens_to_ids(ordered) == list(range(base, base + 5))
    code_ids = tokenizer.convert_tokens_to_ids(tt.audio_code_tokens())
    assert code_ids == list(range(base + 5, base + 5 + NUM_AUDIO_CODES))
    assert len(tokenizer) == base + 5 + NUM_AUDIO_CODES
    assert tokenizer.eos_token == tt.EOS_TOKEN
    assert tokenizer.pad_token == tt.PAD_TOKEN
    assert tokenizer.bos_token is None


def test_lm_tokenizer_splits_digits_and_keeps_special_tokens_whole(lm_tokenizer: Any) -> None:
    tokenizer = lm_tokenizer
    text = "<think>\nbpm: 1204\n</think><|audio_code_42|><|audio_code_63999|><|im_end|>"
    ids = tokenizer(text).input_ids
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[0] == "<think>"
    assert pieces[pieces.index(" ") + 1 : pieces.index(" ") + 5] == ["1", "2", "0", "4"]
    assert pieces[-3:] == ["<|audio_code_42|>", "<|audio_code_63999|>", "<|im_end|>"]
    assert tokenizer.decode(ids) == text


def test_lm_tokenizer_renders_the_golden_prompts(lm_tokenizer: Any) -> None:
    tokenizer = lm_tokenizer
    assert tokenizer.chat_template == (REPO / "lm_service" / "chat_template.jinja").read_text(encoding="utf-8")
    prompts = json.loads((GOLDEN / "prompts.json").read_text(encoding="utf-8"))
    entries = [e for e in prompts["lm"] if "messages" in e and "rendered" in e]
    assert entries
    for entry in entries:
        rendered = tokenizer.apply_chat_template(
            entry["messages"], tokenize=False, add_generation_prompt=entry["add_generation_prompt"]
        )
        assert rendered == entry["rendered"], entry["function"]


def test_lm_model_loads_with_vllm_compatible_shape(root: Path, lm_tokenizer: Any) -> None:
    folder = root / tc.LM_DIR
    tokenizer = lm_tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert config.head_dim == 64
    assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tokenizer)
    assert config.tie_word_embeddings
    assert config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    assert "lm_head.weight" not in _weights(folder)
    ids = tokenizer("<|im_start|>user\nhello<|im_end|>", return_tensors="pt").input_ids  # [1, L]
    with torch.no_grad():
        logits = model(ids).logits  # [1, L, V]
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_text_encoder_appends_endoftext_and_is_32_wide(root: Path) -> None:
    folder = root / tc.TEXT_ENCODER_DIR
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("# Caption\nslow piano", truncation=True, max_length=256).input_ids
    assert ids[-1] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(tt.PAD_TOKEN)
    assert tokenizer("x<|endoftext|>").input_ids[-2:] == [tokenizer.pad_token_id] * 2
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == "Qwen3Model"
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state  # [1, L, 32]
    assert hidden.shape == (1, len(ids), tc.TEXT_HIDDEN_DIM)
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert all(not key.startswith("model.") for key in _weights(folder))


def test_vae_has_the_published_geometry(root: Path) -> None:
    from diffusers import AutoencoderOobleck

    vae = AutoencoderOobleck.from_pretrained(root / tc.VAE_DIR).eval()
    assert vae.config.sampling_rate == 48_000
    assert list(vae.config.downsampling_ratios) == [2, 4, 4, 6, 10]
    with torch.no_grad():
        wav = vae.decode(torch.randn(1, 64, 25)).sample  # [1, 2, 48000]
        latent = vae.encode(wav[:, :, : 5 * 1920]).latent_dist.mean  # [1, 64, 5]
    assert wav.shape == (1, 2, 48_000)
    assert latent.shape == (1, 64, 5)


def test_dit_configs_match_the_golden_tiny_checkpoint(root: Path) -> None:
    golden = json.loads((GOLDEN / "checkpoint" / "config.json").read_text(encoding="utf-8"))
    variant_keys = {"model_version", "is_turbo", "auto_map", "transformers_version"}
    for variant, is_turbo in (("turbo", True), ("base", False)):
        config = tc.tiny_dit_config(variant)
        assert config["is_turbo"] is is_turbo and config["model_version"] == variant
        assert config["text_hidden_dim"] == AutoConfig.from_pretrained(root / tc.TEXT_ENCODER_DIR).hidden_size
        assert {k: v for k, v in config.items() if k not in variant_keys} == {
            k: v for k, v in golden.items() if k not in variant_keys
        }


def test_dit_folders_are_written(root: Path) -> None:
    for folder, variant in ((tc.TURBO_DIR, "turbo"), (tc.BASE_DIR, "base")):
        written = json.loads((root / folder / "config.json").read_text(encoding="utf-8"))
        assert written["model_version"] == variant
        assert _weights(root / folder)


def test_dit_step_skips_with_a_note_when_the_writer_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tc, "_DIT_WRITER_MODULE", "dit_service.model.no_such_writer")
    step = tc.WriterStep(tc.TURBO_DIR, tc.write_dit("turbo"))
    results = tc.write_all(tmp_path, SEED, steps=[step])
    assert results[tc.TURBO_DIR].startswith("skipped: dit_service.model.no_such_writer")
    assert not (tmp_path / tc.TURBO_DIR).exists()


def test_same_seed_gives_identical_files_and_another_seed_differs(root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    tc.write_all(again, SEED)
    for file in sorted(root.rglob("*")):
        if file.is_file():
            assert file.read_bytes() == (again / file.relative_to(root)).read_bytes(), file
    other = tmp_path / "other"
    steps = [tc.WriterStep(tc.TEXT_ENCODER_DIR, tc.write_text_encoder), tc.WriterStep(tc.VAE_DIR, tc.write_vae)]
    caller_rng = torch.get_rng_state()
    tc.write_all(other, SEED + 1, steps=steps)
    assert torch.equal(torch.get_rng_state(), caller_rng)
    for folder in (tc.TEXT_ENCODER_DIR, tc.VAE_DIR):
        first, second = _weights(root / folder), _weights(other / folder)
        assert first.keys() == second.keys()
        assert any(not torch.equal(first[key], second[key]) for key in first)


def test_missing_chat_template_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tt, "CHAT_TEMPLATE_FILE", "no_such_template.jinja")
    with pytest.raises(FileNotFoundError, match="lm_service/no_such_template.jinja is missing"):
        tt.build_lm_tokenizer(tmp_path)
