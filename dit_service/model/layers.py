"""Building blocks shared by the DiT decoder and the encoder-side stacks.

Reproduces the reference math (Qwen3-style RMSNorm, SwiGLU MLP, QK-normed GQA attention with
half-split RoPE, AdaLN DiT layer, sinusoidal timestep embedding). Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` with additive masks that use
``torch.finfo(dtype).min`` for blocked keys: a query row whose keys are all blocked then attends
uniformly to every key of the row, as the reference does (not zero, not NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit_service.model.config import DiTConfig, LayerMask

Rope = tuple[Tensor, Tensor]
"""RoPE tables ``(cos, sin)``, each ``[L, head_dim]`` in the activation dtype."""

KeyValue = tuple[Tensor, Tensor]
"""Projected keys and values ``([B, Hkv, L, head_dim], [B, Hkv, L, head_dim])``."""

TIMESTEP_CHANNELS = 256
TIMESTEP_SCALE = 1000.0
TIMESTEP_MAX_PERIOD = 10000.0


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32 and cast back before the gain."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> Rope:
    """Default RoPE for positions ``0..seq_len-1``: angles in float32, ``cat(angles, angles)``.

    The inverse frequencies are computed on the CPU and then moved, as the reference's buffer is.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = (1.0 / (theta**exponents)).to(device)  # [head_dim / 2]
    positions = torch.arange(seq_len, device=device).float()
    angles = positions[:, None] * inv_freq[None, :]  # [L, head_dim / 2]
    emb = torch.cat([angles, angles], dim=-1)  # [L, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate ``x [B, H, L, head_dim]`` with the half-split convention ``x*cos + rotate_half(x)*sin``."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def additive_mask(
    seq_len: int, spec: LayerMask, key_mask: Tensor | None, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """Additive self-attention mask ``[B or 1, 1, L, L]``: 0 where visible, ``finfo(dtype).min`` where not.

    ``key_mask [B, L]`` marks valid keys (nonzero = valid) and is honoured only when
    ``spec.key_padding``. Returns None when nothing is blocked.
    """
    use_keys = key_mask is not None and spec.key_padding
    window = spec.window if spec.window is not None and spec.window < seq_len - 1 else None
    if window is None and not use_keys:
        return None
    visible = torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device)
    if window is not None:
        pos = torch.arange(seq_len, device=device)
        visible = ((pos[:, None] - pos[None, :]).abs() <= window)[None, None]  # [1, 1, L, L]
    if use_keys:
        visible = visible & key_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # [B, 1, L, L]
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)


class Attention(nn.Module):
    """QK-normed multi-head attention with grouped K/V heads (self or cross).

    Self-attention applies RoPE to q and k after their norms; cross-attention takes K/V projected
    from the (condition-embedded) encoder states, with ``k_norm`` and without RoPE. Never causal.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, head_dim, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.scaling = head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def project_kv(self, states: Tensor) -> KeyValue:
        """Normed keys and values of ``states [B, L, dim]``, no RoPE: ``[B, Hkv, L, head_dim]`` each."""
        shape = (*states.shape[:-1], self.num_kv_heads, self.head_dim)
        keys = self.k_norm(self.k_proj(states).view(shape)).transpose(1, 2)
        values = self.v_proj(states).view(shape).transpose(1, 2)
        return keys, values

    def forward(
        self, x: Tensor, rope: Rope | None = None, mask: Tensor | None = None, kv: KeyValue | None = None
    ) -> Tensor:
        """Attend from ``x [B, L, dim]``: self-attention when ``kv`` is None, else cross-attention to ``kv``."""
        batch, seq_len, _ = x.shape
        query = self.q_norm(self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim))
        query = query.transpose(1, 2)  # [B, H, L, head_dim]
        if kv is None:
            keys, values = self.project_kv(x)
            if rope is not None:
                query, keys = apply_rope(query, rope), apply_rope(keys, rope)
        else:
            keys, values = kv
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)  # [B, H, Lk, head_dim]
            values = values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scaling)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)  # [B, L, H*head_dim]
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, dim: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, intermediate, bias=False)
        self.up_proj = nn.Linear(dim, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    """Pre-norm bidirectional transformer layer of the lyric/timbre encoders, pooler and detokenizer."""

    def __init__(self, config: DiTConfig, layer_idx: int) -> None:
        super().__init__()
        self.mask_spec = config.layer_mask(layer_idx)
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope=rope, mask=mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_encoder_layers(
    layers: list[EncoderLayer] | nn.ModuleList, x: Tensor, config: DiTConfig, key_mask: Tensor | None = None
) -> Tensor:
    """Run ``layers`` over ``x [B, L, dim]`` with RoPE positions ``0..L-1`` and each layer's mask.

    ``key_mask [B, L]`` (nonzero = valid key) is the stack's padding mask, or None for none.
    """
    seq_len = x.shape[1]
    rope = rope_tables(seq_len, config.head_dim, config.rope_theta, x.device, x.dtype)
    masks: dict[LayerMask, Tensor | None] = {}
    for layer in layers:
        spec = layer.mask_spec
        if spec not in masks:
            masks[spec] = additive_mask(seq_len, spec, key_mask, x.dtype, x.device)
        x = layer(x, rope, masks[spec])
    return x


class DiTLayer(nn.Module):
    """DiT block: AdaLN-modulated, gated self-attention and MLP around an un-gated cross-attention."""

    def __init__(self, config: DiTConfig, layer_idx: int) -> None:
        super().__init__()
        dim = config.hidden_size
        self.window = config.layer_mask(layer_idx).window
        self.self_attn_norm = RMSNorm(dim, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.cross_attn_norm = RMSNorm(dim, config.rms_norm_eps)
        self.cross_attn = Attention(config)
        self.mlp_norm = RMSNorm(dim, config.rms_norm_eps)
        self.mlp = MLP(dim, config.intermediate_size)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x: Tensor, rope: Rope, temb6: Tensor, self_mask: Tensor | None, cross_kv: KeyValue) -> Tensor:
        """``x [B, L, D]``, ``temb6 [B, 6, D]``, ``cross_kv`` from ``cross_attn.project_kv``."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + temb6).chunk(6, dim=1)  # [B, 1, D]
        h = (self.self_attn_norm(x) * (1 + scale) + shift).type_as(x)
        x = (x + self.self_attn(h, rope=rope, mask=self_mask) * gate).type_as(x)
        x = x + self.cross_attn(self.cross_attn_norm(x).type_as(x), kv=cross_kv)
        h = (self.mlp_norm(x) * (1 + c_scale) + c_shift).type_as(x)
        return (x + self.mlp(h) * c_gate).type_as(x)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of ``t * 1000`` (cos half first) through an MLP.

    Returns ``temb [B, D]`` (the ``linear_2`` output) and ``proj [B, 6, D]`` (``time_proj(silu(temb))``).
    The product ``t * 1000`` is formed in ``t``'s dtype and the angles in float32, as the reference does.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.time_proj = nn.Linear(dim, dim * 6)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        half = TIMESTEP_CHANNELS // 2
        freqs = torch.exp(-math.log(TIMESTEP_MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
        args = (t * TIMESTEP_SCALE)[:, None].float() * freqs.to(t.device)[None]  # [B, 128]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)  # [B, 256]
        temb = self.linear_2(F.silu(self.linear_1(emb)))  # [B, D]
        proj = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))  # [B, 6, D]
        return temb, proj
