"""The DiT decoder: predicts the flow-matching velocity of noisy 25 Hz latents.

Reproduces the reference ``AceStepDiTModel`` with its published key layout (``proj_in.1.*``,
``proj_out.1.*`` inside three-step Sequentials). It ignores attention and encoder masks, as the
reference does: self-attention is limited only by each layer's sliding window and
cross-attention sees every encoder position, padding included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit_service.model.config import DiTConfig, LayerMask
from dit_service.model.layers import (
    DiTLayer,
    KeyValue,
    RMSNorm,
    TimestepEmbedding,
    additive_mask,
    rope_tables,
)
from shared.errors import InvalidArgument

CrossKV = tuple[KeyValue, ...]
"""Per-layer cross-attention ``(keys, values)`` for one set of encoder states (see ``precompute_cross_kv``)."""


class _SwapTimeChannels(nn.Module):
    """``[B, T, C] <-> [B, C, T]``; a parameter-free step that keeps the published ``.1.`` key index."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class DiTDecoder(nn.Module):
    """``(x_t, t, r, encoder states, context) -> velocity``, all latents ``[B, T, 64]`` at 25 Hz."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        self.config = config
        self.patch_size = patch
        self.layers = nn.ModuleList(DiTLayer(config, i) for i in range(config.num_hidden_layers))
        self.proj_in = nn.Sequential(
            _SwapTimeChannels(), nn.Conv1d(config.in_channels, dim, patch, stride=patch), _SwapTimeChannels()
        )
        self.time_embed = TimestepEmbedding(dim)
        self.time_embed_r = TimestepEmbedding(dim)
        self.condition_embedder = nn.Linear(config.condition_dim, dim)
        self.norm_out = RMSNorm(dim, config.rms_norm_eps)
        self.proj_out = nn.Sequential(
            _SwapTimeChannels(),
            nn.ConvTranspose1d(dim, config.audio_acoustic_hidden_dim, patch, stride=patch),
            _SwapTimeChannels(),
        )
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, dim))

    def precompute_cross_kv(self, encoder_hidden_states: Tensor) -> CrossKV:
        """Cross-attention K/V of every layer for ``encoder_hidden_states [B, Lenc, enc_H]``.

        They depend only on the encoder states, so a sampler computes them once per condition set
        and passes them to every step (the reference's cross-attention cache).
        """
        embedded = self.condition_embedder(encoder_hidden_states)  # [B, Lenc, D]
        return tuple(layer.cross_attn.project_kv(embedded) for layer in self.layers)

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        timestep_r: Tensor,
        encoder_hidden_states: Tensor | None,
        context_latents: Tensor,
        cross_kv: CrossKV | None = None,
    ) -> Tensor:
        """Velocity ``[B, T, 64]`` for noisy latents ``hidden_states [B, T, 64]``.

        ``timestep``/``timestep_r [B]`` are cast to the latents' dtype (the reference's model-dtype
        timesteps); ``context_latents [B, T, 128]`` (source latents, then chunk mask) come first in
        the channel concat. ``encoder_hidden_states`` may be None when ``cross_kv`` is given.
        """
        dtype, frames = hidden_states.dtype, hidden_states.shape[1]
        t, r = timestep.to(dtype), timestep_r.to(dtype)
        temb_t, proj_t = self.time_embed(t)
        temb_r, proj_r = self.time_embed_r(t - r)
        temb, temb6 = temb_t + temb_r, proj_t + proj_r  # [B, D], [B, 6, D]
        x = torch.cat([context_latents.to(dtype), hidden_states], dim=-1)  # [B, T, 192]
        pad = -frames % self.patch_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad))  # [B, T + pad, 192]
        x = self.proj_in(x)  # [B, T', D]
        if cross_kv is None:
            if encoder_hidden_states is None:
                raise InvalidArgument("encoder_hidden_states or cross_kv is required", field="encoder_hidden_states")
            cross_kv = self.precompute_cross_kv(encoder_hidden_states)
        if len(cross_kv) != len(self.layers):
            raise InvalidArgument(
                f"cross_kv must hold {len(self.layers)} layers, got {len(cross_kv)}", field="cross_kv"
            )
        x = self._run_layers(x, temb6, cross_kv)
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # [B, 1, D] each
        x = (self.norm_out(x) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)[:, :frames]  # [B, T, 64]

    def _run_layers(self, x: Tensor, temb6: Tensor, cross_kv: CrossKV) -> Tensor:
        seq_len = x.shape[1]
        rope = rope_tables(seq_len, self.config.head_dim, self.config.rope_theta, x.device, x.dtype)
        masks: dict[int | None, Tensor | None] = {}
        for layer, kv in zip(self.layers, cross_kv):
            if layer.window not in masks:
                spec = LayerMask(window=layer.window, key_padding=False)
                masks[layer.window] = additive_mask(seq_len, spec, None, x.dtype, x.device)
            x = layer(x, rope, temb6, masks[layer.window], kv)
        return x
