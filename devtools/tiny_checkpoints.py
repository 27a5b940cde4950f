"""Tiny random-weight checkpoints in the published ACE-Step 1.5 folder layout.

``acestep-make-tiny-checkpoints DIR [--seed N]`` writes, deterministically from the seed::

    DIR/acestep-5Hz-lm-0.6B/     Qwen3ForCausalLM (hidden 128, 2 layers, head_dim 64) + LM tokenizer
    DIR/Qwen3-Embedding-0.6B/    Qwen3Model (hidden 32, 2 layers) + text-encoder tokenizer
    DIR/vae/                     AutoencoderOobleck, tiny widths, real 48 kHz / 1920-hop geometry
    DIR/acestep-v15-turbo/       DiT, when ``dit_service.model.weights.write_random_dit`` exists
    DIR/acestep-v15-base/        idem
    DIR/loras/<id>/              PEFT LoRA adapters of the tiny decoder (adapter_config.json +
                                 adapter_model.safetensors), made with peft with random non-zero B

The same seed gives byte-identical weight files. The widths are tiny so that every service and test
runs on a CPU in seconds; the structure (config classes, key names, tokenizer ids layout, VAE hop)
is the published one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3Model
from transformers.utils import logging as transformers_logging

from shared.tiny_tokenizers import (
    EOS_TOKEN,
    PAD_TOKEN,
    build_lm_tokenizer,
    build_text_encoder_tokenizer,
)

__all__ = [
    "LM_DIR",
    "TEXT_ENCODER_DIR",
    "VAE_DIR",
    "TURBO_DIR",
    "BASE_DIR",
    "WriterStep",
    "WRITER_STEPS",
    "build_lm_tokenizer",
    "build_text_encoder_tokenizer",
    "write_lm",
    "write_text_encoder",
    "write_vae",
    "write_dit",
    "tiny_dit_config",
    "LORA_DIR",
    "TINY_LORAS",
    "write_lora",
    "write_loras",
    "write_all",
    "main",
]

LM_DIR = "acestep-5Hz-lm-0.6B"
TEXT_ENCODER_DIR = "Qwen3-Embedding-0.6B"
VAE_DIR = "vae"
# The tiny random LM rarely writes EOS, so its text phases run to the reference's 3500-token budget,
# and the durations it plans are random up to the limit: stacks on the tiny checkpoints cap both
# (audio codes are never capped, and a user's duration is never cut).
TINY_LM_ENV = {"ACESTEP_LM_MAX_TEXT_TOKENS": "384", "ACESTEP_LM_MAX_DURATION_S": "60"}

TURBO_DIR = "acestep-v15-turbo"
BASE_DIR = "acestep-v15-base"
LORA_DIR = "loras"
LORA_B_STD = 1.0  # PEFT starts B at zero (no effect); the tiny adapters get random B, large enough to hear

# The tiny adapters: the reference trainer's default (attention projections), one on the MLPs and
# embeddings with per-module ranks and alphas, and an rsLoRA one. LoraConfig keyword arguments.
TINY_LORAS: dict[str, dict[str, Any]] = {
    "tiny-attn": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "tiny-mlp": {"r": 2, "lora_alpha": 4, "target_modules": ["gate_proj", "up_proj", "down_proj", "condition_embedder",
                                                             "linear_1"],
                 "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"layers.1.mlp.up_proj": 1}},
    "tiny-rslora": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "o_proj", "time_proj"]},
}

TEXT_HIDDEN_DIM = 32            # must equal the tiny DiT's text_hidden_dim
_VOCAB_MULTIPLE = 64
_ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0}

# Tiny VAE with the published 48 kHz geometry (hop 2*4*4*6*10 = 1920 samples). The encoder's output
# width is encoder_hidden_size = 2 * 64 latent channels (mean and scale), so the encoder cannot be
# narrower than 128; flat channel multiples keep it at 128 (the published ones are [1, 2, 4, 8, 16]).
TINY_VAE_CONFIG: dict[str, Any] = {
    "encoder_hidden_size": 128,
    "downsampling_ratios": [2, 4, 4, 6, 10],
    "channel_multiples": [1, 1, 1, 1, 1],
    "decoder_channels": 8,
    "decoder_input_channels": 64,
    "audio_channels": 2,
    "sampling_rate": 48_000,
}

# The tiny DiT configuration of the shared conformance vectors (golden/checkpoint/config.json).
_TINY_DIT_BASE_CONFIG: dict[str, Any] = {
    "architectures": ["AceStepConditionGenerationModel"],
    "model_type": "acestep",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "audio_acoustic_hidden_dim": 64,
    "data_proportion": 0.5,
    "dtype": "float32",
    "fsq_dim": 64,
    "fsq_input_levels": [8, 8, 8, 5, 5, 5],
    "fsq_input_num_quantizers": 1,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "in_channels": 192,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_types": ["sliding_attention", "full_attention"],
    "max_position_embeddings": 32768,
    "num_attention_heads": 4,
    "num_attention_pooler_hidden_layers": 1,
    "num_audio_decoder_hidden_layers": 2,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "num_lyric_encoder_hidden_layers": 2,
    "num_timbre_encoder_hidden_layers": 2,
    "patch_size": 2,
    "pool_window_size": 5,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 4,
    "text_hidden_dim": TEXT_HIDDEN_DIM,
    "timbre_fix_frame": 750,
    "timbre_hidden_dim": 64,
    "timestep_mu": -0.4,
    "timestep_sigma": 1.0,
    "use_cache": True,
    "use_sliding_window": True,
    "vocab_size": 64003,
}

_DIT_WRITER_MODULE = "dit_service.model.weights"
_DIT_WRITER_NAME = "write_random_dit"


@dataclass(frozen=True)
class WriterStep:
    """One checkpoint folder: its name under the root and the function that fills it.

    ``write(folder, seed)`` returns ``None`` on success or a note saying why it skipped.
    """

    folder: str
    write: Callable[[Path, int], str | None]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block, restoring the caller's generator state after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _padded_vocab(num_tokens: int) -> int:
    return -(-num_tokens // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE


def write_lm(out_dir: Path, seed: int) -> None:
    """Write the tiny 5 Hz LM: Qwen3ForCausalLM, tokenizer (with chat template), generation config.

    head_dim is 64 because the CPU attention of vLLM rejects smaller heads.
    """
    tokenizer = build_lm_tokenizer(out_dir)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen3Config(
        vocab_size=_padded_vocab(len(tokenizer)),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters=dict(_ROPE),
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        dtype="float32",
    )
    with _seeded(seed):
        model = Qwen3ForCausalLM(config).eval()
    # Qwen3 lists both ids as stop tokens; the planner's own stop token is <|im_end|>.
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    model.save_pretrained(str(out_dir))


def write_text_encoder(out_dir: Path, seed: int) -> None:
    """Write the tiny Qwen3-Embedding text encoder (Qwen3Model, hidden 32) and its tokenizer."""
    tokenizer = build_text_encoder_tokenizer(out_dir)
    config = Qwen3Config(
        vocab_size=_padded_vocab(len(tokenizer)),
        hidden_size=TEXT_HIDDEN_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters=dict(_ROPE),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        dtype="float32",
    )
    with _seeded(seed):
        model = Qwen3Model(config).eval()
    model.save_pretrained(str(out_dir))


def write_vae(out_dir: Path, seed: int) -> None:
    """Write the tiny AutoencoderOobleck (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""
    from diffusers import AutoencoderOobleck  # heavy import, only when a VAE is written

    with _seeded(seed):
        vae = AutoencoderOobleck(**TINY_VAE_CONFIG).eval()
    vae.save_pretrained(str(out_dir))


def tiny_dit_config(variant: str) -> dict[str, Any]:
    """The tiny DiT ``config.json`` content for ``variant`` ``"turbo"`` or ``"base"``."""
    if variant not in ("turbo", "base"):
        raise ValueError(f"variant must be 'turbo' or 'base', got {variant!r}")
    config = dict(_TINY_DIT_BASE_CONFIG)
    config["auto_map"] = {
        "AutoConfig": "configuration_acestep_v15.AceStepConfig",
        "AutoModel": f"modeling_acestep_v15_{variant}.AceStepConditionGenerationModel",
    }
    config["model_version"] = variant
    config["is_turbo"] = variant == "turbo"
    return config


def write_dit(variant: str) -> Callable[[Path, int], str | None]:
    """A writer for the DiT folder of ``variant``, delegating to the DiT service's weight writer."""

    def write(out_dir: Path, seed: int) -> str | None:
        try:
            module = importlib.import_module(_DIT_WRITER_MODULE)
        except ModuleNotFoundError as error:
            if error.name not in (_DIT_WRITER_MODULE, "dit_service", "dit_service.model"):
                raise
            return f"skipped: {_DIT_WRITER_MODULE} is not available"
        writer = getattr(module, _DIT_WRITER_NAME, None)
        if writer is None:
            return f"skipped: {_DIT_WRITER_MODULE}.{_DIT_WRITER_NAME} is not available"
        writer(out_dir, tiny_dit_config(variant), seed)
        return None

    return write


def write_lora(out_dir: Path, decoder: torch.nn.Module, lora_kwargs: dict[str, Any], seed: int) -> Path:
    """A PEFT LoRA of ``decoder`` (``get_peft_model`` + ``save_pretrained``), B drawn from ``N(0, LORA_B_STD)``.

    The decoder itself is left as it was (PEFT's wrappers are removed again).
    """
    from peft import LoraConfig, get_peft_model  # heavy import, only when adapters are written

    with _seeded(seed):
        model = get_peft_model(decoder, LoraConfig(**lora_kwargs))
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                with torch.no_grad():
                    param.normal_(0.0, LORA_B_STD)
    model.save_pretrained(str(out_dir))
    model.unload()
    (Path(out_dir) / "README.md").unlink(missing_ok=True)
    return Path(out_dir)


def write_loras(out_dir: Path, seed: int) -> str | None:
    """The ``TINY_LORAS`` adapters of the tiny decoder (turbo and base share its shapes)."""
    try:
        from dit_service.model.config import DiTConfig
        from dit_service.model.dit import DiTDecoder
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("dit_service"):
            raise
        return "skipped: dit_service is not available"
    with torch.device("meta"):
        decoder = DiTDecoder(DiTConfig.from_dict(tiny_dit_config("turbo")))
    decoder.to_empty(device="cpu")  # shapes are all PEFT needs; its factors are drawn on the CPU
    for index, (lora_id, kwargs) in enumerate(TINY_LORAS.items()):
        write_lora(out_dir / lora_id, decoder, kwargs, seed + index)
    return None


WRITER_STEPS: tuple[WriterStep, ...] = (
    WriterStep(LM_DIR, write_lm),
    WriterStep(TEXT_ENCODER_DIR, write_text_encoder),
    WriterStep(VAE_DIR, write_vae),
    WriterStep(TURBO_DIR, write_dit("turbo")),
    WriterStep(BASE_DIR, write_dit("base")),
    WriterStep(LORA_DIR, write_loras),
)


def write_all(
    root: Path | str, seed: int = 0, steps: Sequence[WriterStep] = WRITER_STEPS
) -> dict[str, str | None]:
    """Run every writer step into ``root/<folder>``.

    Returns:
        ``{folder: None}`` for each folder written, ``{folder: note}`` for each one skipped.
    """
    root = Path(root)
    results: dict[str, str | None] = {}
    for step in steps:
        folder = root / step.folder
        folder.mkdir(parents=True, exist_ok=True)
        note = step.write(folder, seed)
        if note is not None and not any(folder.iterdir()):
            folder.rmdir()
        results[step.folder] = note
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``acestep-make-tiny-checkpoints DIR [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="acestep-make-tiny-checkpoints",
        description="Write tiny random-weight ACE-Step 1.5 checkpoints in the published layout.",
    )
    parser.add_argument("root", type=Path, help="checkpoint root folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    transformers_logging.disable_progress_bar()
    for folder, note in write_all(args.root, args.seed).items():
        print(f"{args.root / folder}: {note or 'written'}")
    return 0
