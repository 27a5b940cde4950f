"""Random-weight checkpoints at the PUBLISHED sizes, in the published folder layout.

``python -m devtools.published_checkpoints DIR [--device cuda] [--seed N]`` writes::

    DIR/acestep-v15-turbo/       the 2B DiT (config.json, bf16 model.safetensors, silence_latent.pt)
    DIR/vae/                     AutoencoderOobleck at the published widths (bf16)
    DIR/Qwen3-Embedding-0.6B/    Qwen3Model at the published size (bf16) + the tiny text tokenizer
    DIR/acestep-5Hz-lm-1.7B/     Qwen3ForCausalLM at the published 1.7B size (bf16) + the tiny LM tokenizer

Every size comes from the published ``config.json`` values recorded in ``../shared/docs``:
``reference-dit.md`` §1.3 (DiT), §4.4 (Qwen3-Embedding-0.6B), §6.1 (VAE) and ``reference-lm.md``
§1.1 (LM 1.7B). The tokenizers are the tiny ones of :mod:`shared.tiny_tokenizers` (the real files
are not public here); their ids all lie below the published vocabulary sizes, so the embedding and
output tables have the real widths. The weights are drawn on ``device`` (a GPU writes the ~10 GB
in seconds) and stored as bf16 safetensors, as the published files are. A folder written before
with the same seed and configs is kept (``.published.json`` records them).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3Model
from transformers.utils import logging as transformers_logging

from devtools import tiny_checkpoints as tiny
from shared.tiny_tokenizers import EOS_TOKEN, PAD_TOKEN, build_lm_tokenizer, build_text_encoder_tokenizer

__all__ = ["PUBLISHED_DIT_CONFIG", "PUBLISHED_VAE_CONFIG", "PUBLISHED_TEXT_ENCODER_CONFIG", "PUBLISHED_LM_CONFIG",
           "LM_DIR", "published_dit_config", "write_published", "main"]

LM_DIR = "acestep-5Hz-lm-1.7B"
MARKER_FILE = ".published.json"
WEIGHT_DTYPE = torch.bfloat16

# reference-dit.md §1.3: the published 2B config (the acestep-v15-base extract, the turbo fixture and
# the converters agree). ``auto_map``, ``model_version`` and ``is_turbo`` are added per variant.
PUBLISHED_DIT_CONFIG: dict[str, Any] = {
    "architectures": ["AceStepConditionGenerationModel"],
    "model_type": "acestep",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "max_position_embeddings": 32768,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": True,
    "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "in_channels": 192,
    "audio_acoustic_hidden_dim": 64,
    "patch_size": 2,
    "text_hidden_dim": 1024,
    "num_lyric_encoder_hidden_layers": 8,
    "timbre_hidden_dim": 64,
    "num_timbre_encoder_hidden_layers": 4,
    "timbre_fix_frame": 750,
    "num_attention_pooler_hidden_layers": 2,
    "pool_window_size": 5,
    "fsq_dim": 2048,
    "fsq_input_levels": [8, 8, 8, 5, 5, 5],
    "fsq_input_num_quantizers": 1,
    "num_audio_decoder_hidden_layers": 24,
    "vocab_size": 64003,
    "timestep_mu": -0.4,
    "timestep_sigma": 1.0,
    "data_proportion": 0.5,
    "dtype": "bfloat16",
    "initializer_range": 0.02,
    "use_cache": True,
}

# reference-dit.md §6.1: vae/config.json.
PUBLISHED_VAE_CONFIG: dict[str, Any] = {
    "audio_channels": 2,
    "channel_multiples": [1, 2, 4, 8, 16],
    "decoder_channels": 128,
    "decoder_input_channels": 64,
    "downsampling_ratios": [2, 4, 4, 6, 10],
    "encoder_hidden_size": 128,
    "sampling_rate": 48000,
}

# reference-dit.md §4.4: Qwen3-Embedding-0.6B is hidden 1024, 28 layers, 16 heads / 8 kv heads, head_dim 128,
# vocab 151669, theta 1e6. Its MLP width (3072), context (32768), eps and tied embeddings are the Qwen3-0.6B
# family's published values, which §4.4 does not repeat.
PUBLISHED_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 151669,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}

# reference-lm.md §1.1: acestep-5Hz-lm-1.7B is a Qwen3ForCausalLM, hidden 2048, 28 layers, 16 heads, 8 KV heads,
# head_dim 128, intermediate 6144, max_position_embeddings 40960, tied embeddings, vocab 217204, theta 1e6, eps 1e-6.
PUBLISHED_LM_CONFIG: dict[str, Any] = {
    "vocab_size": 217204,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}


def published_dit_config(variant: str = "turbo") -> dict[str, Any]:
    """The published 2B DiT ``config.json`` content for ``variant`` ``"turbo"`` or ``"base"``."""
    variant_fields = {key: value for key, value in tiny.tiny_dit_config(variant).items()
                      if key in ("auto_map", "model_version", "is_turbo")}
    return {**PUBLISHED_DIT_CONFIG, **variant_fields}


def _qwen3_config(fields: dict[str, Any], tokenizer: Any) -> Qwen3Config:
    values = dict(fields)
    rope = {"rope_type": "default", "rope_theta": values.pop("rope_theta")}
    return Qwen3Config(**values, rope_parameters=rope, dtype="bfloat16",
                       bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
                       eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN))


def _built_on(device: str, seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` with its parameters created and initialised on ``device`` (seeded), cast to bf16."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = build()
    return model.to(WEIGHT_DTYPE).eval()


def write_text_encoder(out_dir: Path, seed: int, device: str) -> None:
    """Qwen3-Embedding-0.6B at the published size (random weights) and the tiny text tokenizer."""
    tokenizer = build_text_encoder_tokenizer(out_dir)
    config = _qwen3_config(PUBLISHED_TEXT_ENCODER_CONFIG, tokenizer)
    _built_on(device, seed, lambda: Qwen3Model(config)).save_pretrained(str(out_dir))


def _filler_token(index: int) -> str:
    """A byte-level BPE entry no merge produces: two NUL-byte symbols, then the index in letters."""
    letters = ""
    while True:
        index, digit = divmod(index, 26)
        letters = chr(ord("a") + digit) + letters
        if index == 0:
            return "\u0100\u0100" + letters


def pad_tokenizer_vocab(folder: Path, num_tokens: int) -> None:
    """Grow the tokenizer in ``folder`` to exactly ``num_tokens`` ids with unreachable BPE entries.

    The published LM tokenizer has as many ids as the model's vocabulary, and the reference sizes its
    constraint masks by the tokenizer while its logits have the model's width; the fillers go to the
    end of the BPE vocabulary, so the special and audio-code tokens keep their order, shifted up.
    """
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab, added = data["model"]["vocab"], data["added_tokens"]
    missing = num_tokens - len(vocab) - len(added)
    if missing < 0:
        raise ValueError(f"the tokenizer in {folder} already has {len(vocab) + len(added)} ids, more than {num_tokens}")
    base = len(vocab)
    if any(token["id"] < base for token in added):
        raise ValueError(f"the tokenizer in {folder} has added tokens inside its BPE id range")
    fillers = {_filler_token(index): base + index for index in range(missing)}
    if fillers.keys() & vocab.keys():
        raise ValueError(f"filler tokens collide with the vocabulary of {folder}")
    vocab.update(fillers)
    for token in added:
        token["id"] += missing
    for special in (data.get("post_processor") or {}).get("special_tokens", {}).values():
        special["ids"] = [token_id + missing for token_id in special["ids"]]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def retarget_special_ids(folder: Path) -> None:
    """Point the LM's ``config.json`` and ``generation_config.json`` at the tokenizer's current pad and eos
    ids (after :func:`pad_tokenizer_vocab` moved them), as the LM writers set them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pad_id, eos_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN), tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    for name, ids in (("config.json", {"bos_token_id": pad_id, "eos_token_id": eos_id}),
                      ("generation_config.json", {"bos_token_id": pad_id, "eos_token_id": [eos_id, pad_id],
                                                  "pad_token_id": pad_id})):
        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **ids}, indent=2) + "\n",
                        encoding="utf-8")


def write_lm(out_dir: Path, seed: int, device: str) -> None:
    """The 5 Hz LM at the published 1.7B size (random weights) and the tiny LM tokenizer, grown to the
    published vocabulary (217204 ids, as many as the output layer: see :func:`pad_tokenizer_vocab`)."""
    from transformers import AutoTokenizer

    build_lm_tokenizer(out_dir)
    pad_tokenizer_vocab(out_dir, PUBLISHED_LM_CONFIG["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    config = _qwen3_config(PUBLISHED_LM_CONFIG, tokenizer)
    model = _built_on(device, seed, lambda: Qwen3ForCausalLM(config))
    pad_id, eos_id = config.bos_token_id, config.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    model.save_pretrained(str(out_dir))


def write_vae(out_dir: Path, seed: int, device: str) -> None:
    """AutoencoderOobleck at the published widths (random weights)."""
    from diffusers import AutoencoderOobleck  # heavy import, only when a VAE is written

    _built_on(device, seed, lambda: AutoencoderOobleck(**PUBLISHED_VAE_CONFIG)).save_pretrained(str(out_dir))


def write_dit(out_dir: Path, seed: int, device: str, variant: str = "turbo") -> None:
    """The 2B DiT: every tensor ``N(0, INIT_STD)``, RMSNorm gains ``1 + N(0, INIT_STD)`` (the convention of
    ``dit_service.model.weights.random_state_dict``), drawn on ``device`` and stored as bf16."""
    from dit_service.model.config import DiTConfig
    from dit_service.model.layers import RMSNorm
    from dit_service.model.weights import INIT_STD, SILENCE_FILE, WEIGHTS_FILE, build_meta_model

    config_dict = published_dit_config(variant)
    model = build_meta_model(DiTConfig.from_dict(config_dict))
    gains = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    generator = torch.Generator(device=device).manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        values = torch.randn(param.shape, generator=generator, device=device) * INIT_STD
        state[name] = (values + 1.0 if name in gains else values).to(WEIGHT_DTYPE).cpu()
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    silence = torch.randn(1, config_dict["audio_acoustic_hidden_dim"], 15000, generator=generator, device=device)
    torch.save(silence.cpu(), out_dir / SILENCE_FILE)  # [1, 64, 15000] fp32, as published (§1.4)


WRITERS: dict[str, Callable[[Path, int, str], None]] = {
    tiny.TURBO_DIR: write_dit,
    tiny.VAE_DIR: write_vae,
    tiny.TEXT_ENCODER_DIR: write_text_encoder,
    LM_DIR: write_lm,
}


def _marker(seed: int) -> dict[str, Any]:
    return {"seed": seed, "dit": published_dit_config(), "vae": PUBLISHED_VAE_CONFIG,
            "text_encoder": PUBLISHED_TEXT_ENCODER_CONFIG, "lm": PUBLISHED_LM_CONFIG}


def write_published(root: Path | str, seed: int = 0, device: str = "cpu",
                    folders: Sequence[str] = tuple(WRITERS)) -> dict[str, str]:
    """Write each of ``folders`` under ``root``; returns ``{folder: "written" | "kept"}``.

    A folder is kept when its ``.published.json`` records this seed and these configs.
    """
    root = Path(root)
    marker = _marker(seed)
    results: dict[str, str] = {}
    for folder in folders:
        out_dir = root / folder
        marker_path = out_dir / MARKER_FILE
        if marker_path.is_file() and json.loads(marker_path.read_text(encoding="utf-8")) == marker:
            results[folder] = "kept"
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        WRITERS[folder](out_dir, seed, device)
        marker_path.write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")
        results[folder] = "written"
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m devtools.published_checkpoints DIR [--device cuda] [--seed N]``."""
    parser = argparse.ArgumentParser(prog="python -m devtools.published_checkpoints", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="checkpoint root folder to write into")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random weights are drawn (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(WRITERS), default=list(WRITERS))
    args = parser.parse_args(argv)
    transformers_logging.disable_progress_bar()
    for folder, state in write_published(args.root, args.seed, args.device, args.only).items():
        print(f"{args.root / folder}: {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
