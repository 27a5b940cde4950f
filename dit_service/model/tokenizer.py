"""Audio tokenizer (25 Hz latents -> 5 Hz FSQ codes) and detokenizer (5 Hz -> 25 Hz latents).

The quantizer is ``vector_quantize_pytorch.ResidualFSQ``, as in the reference, so its
``project_in`` / ``project_out`` keys and its code <-> index mapping are the published ones. The
FSQ rounding itself always runs in float32; when the quantizer's weights are float32 (the loader
keeps them so) the whole quantizer does, whatever the rest of the model's dtype.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn
from vector_quantize_pytorch import ResidualFSQ

from dit_service.model.config import DiTConfig
from dit_service.model.layers import EncoderLayer, RMSNorm, run_encoder_layers


def build_quantizer(config: DiTConfig) -> ResidualFSQ:
    """``ResidualFSQ(dim=fsq_dim, levels=fsq_input_levels, num_quantizers=fsq_input_num_quantizers)``.

    FSQ computes its implicit codebook eagerly, which a meta tensor cannot do; under a meta
    default device the quantizer is built on the CPU (its buffers are small and not in the file).
    """
    on_meta = torch.get_default_device().type == "meta"
    with torch.device("cpu") if on_meta else nullcontext():
        return ResidualFSQ(
            dim=config.fsq_dim,
            levels=list(config.fsq_input_levels),
            num_quantizers=config.fsq_input_num_quantizers,
        )


class AttentionPooler(nn.Module):
    """Pools each window ``[P, H]`` to one vector: prepend ``special_token``, encode, take position 0."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.special_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.layers = nn.ModuleList(
            EncoderLayer(config, i) for i in range(config.num_attention_pooler_hidden_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T5, P, H]`` -> ``[B, T5, H]``; each window is encoded on its own (positions 0..P)."""
        batch, num_windows, window, dim = x.shape
        x = self.embed_tokens(x)
        special = self.special_token.expand(batch, num_windows, 1, dim)  # [B, T5, 1, H]
        x = torch.cat([special, x], dim=2).reshape(batch * num_windows, window + 1, dim)  # [B*T5, P+1, H]
        x = self.norm(run_encoder_layers(self.layers, x, self.config))
        return x[:, 0, :].reshape(batch, num_windows, dim)


class AudioTokenizer(nn.Module):
    """25 Hz acoustic latents -> pooled 5 Hz vectors -> ResidualFSQ codes."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.pool_window_size = config.pool_window_size
        self.audio_acoustic_proj = nn.Linear(config.audio_acoustic_hidden_dim, config.hidden_size)
        self.attention_pooler = AttentionPooler(config)
        self.quantizer = build_quantizer(config)

    def pool(self, windows: Tensor) -> Tensor:
        """``[B, T5, P, acoustic]`` -> attention-pooled ``[B, T5, H]`` (the vector before FSQ)."""
        return self.attention_pooler(self.audio_acoustic_proj(windows))

    def quantize(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, T5, H]`` -> ``(quantized [B, T5, fsq_dim] in pooled's dtype, indices [B, T5, Q] int32)``."""
        quantized, indices = self.quantizer(pooled.to(self.quantizer.project_in.weight.dtype))
        return quantized.to(pooled.dtype), indices

    def forward(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, T5, P, acoustic]`` -> ``(quantized, indices)``."""
        return self.quantize(self.pool(windows))

    def tokenize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, T, acoustic]`` with ``T`` a multiple of ``pool_window_size`` -> ``(quantized, indices)``."""
        batch, frames, channels = x.shape
        windows = x.reshape(batch, frames // self.pool_window_size, self.pool_window_size, channels)
        return self.forward(windows)

    def codes_to_quantized(self, indices: Tensor) -> Tensor:
        """FSQ indices ``[B, T5, Q]`` (or ``[B, T5]``) -> ``project_out`` of their code values ``[B, T5, fsq_dim]``."""
        if indices.dim() == 2:
            indices = indices.unsqueeze(-1)
        return self.quantizer.get_output_from_indices(indices.long())


class AudioDetokenizer(nn.Module):
    """5 Hz vectors ``[B, T5, H]`` -> 25 Hz latents ``[B, T5 * P, acoustic]``, window by window."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.special_tokens = nn.Parameter(torch.zeros(1, config.pool_window_size, config.hidden_size))
        self.layers = nn.ModuleList(
            EncoderLayer(config, i) for i in range(config.num_attention_pooler_hidden_layers)
        )
        self.proj_out = nn.Linear(config.hidden_size, config.audio_acoustic_hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Each token is repeated ``P`` times, offset by ``special_tokens``, encoded (positions 0..P-1)."""
        batch, num_tokens, dim = x.shape
        window = self.config.pool_window_size
        x = self.embed_tokens(x).unsqueeze(2).expand(batch, num_tokens, window, dim)  # [B, T5, P, H]
        x = (x + self.special_tokens.unsqueeze(0)).reshape(batch * num_tokens, window, dim)  # [B*T5, P, H]
        x = self.proj_out(self.norm(run_encoder_layers(self.layers, x, self.config)))  # [B*T5, P, acoustic]
        return x.reshape(batch, num_tokens * window, -1)


def codes_to_latents(tokenizer: AudioTokenizer, detokenizer: AudioDetokenizer, indices: Tensor) -> Tensor:
    """5 Hz FSQ indices ``[B, T5, Q]`` -> 25 Hz LM-hint latents ``[B, 5 * T5, acoustic]``.

    ``quantizer.get_output_from_indices`` then the detokenizer, in the detokenizer's dtype.
    """
    quantized = tokenizer.codes_to_quantized(indices)  # [B, T5, fsq_dim]
    return detokenizer(quantized.to(detokenizer.proj_out.weight.dtype))
