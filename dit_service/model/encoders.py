"""Condition encoder: text projection, lyric encoder, timbre encoder and sequence packing.

Output per batch row: ``[valid lyric tokens, valid timbre vectors, valid text tokens, padding...]``
(``pack(pack(lyrics, timbre), text)``), with a bool mask marking the leading valid part. The DiT
attends to the padding positions too, so their values are part of the contract.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dit_service.model.config import DiTConfig
from dit_service.model.layers import EncoderLayer, RMSNorm, run_encoder_layers
from shared.errors import InvalidArgument


def pack_sequences(hidden1: Tensor, hidden2: Tensor, mask1: Tensor, mask2: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate ``[B, L1, D]`` and ``[B, L2, D]`` along time, valid tokens first.

    Rows are reordered by a stable descending sort of the concatenated mask, so valid tokens keep
    their order and so does the padding after them. Returns the packed states ``[B, L1+L2, D]`` and
    the bool mask ``arange(L1+L2) < number of valid tokens`` ``[B, L1+L2]``.
    """
    hidden = torch.cat([hidden1, hidden2], dim=1)  # [B, L, D]
    masks = [m.to(torch.int32) if m.dtype == torch.bool else m for m in (mask1, mask2)]
    mask = torch.cat(masks, dim=1)  # [B, L]
    order = mask.argsort(dim=1, descending=True, stable=True)  # [B, L]
    packed = torch.gather(hidden, 1, order.unsqueeze(-1).expand_as(hidden))  # [B, L, D]
    lengths = mask.sum(dim=1)  # [B]
    new_mask = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]  # [B, L]
    return packed, new_mask


def unpack_by_order(embeddings: Tensor, order: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Scatter packed per-reference vectors ``[N, D]`` into ``[batch_size, max_refs, D]``.

    ``order [N]`` holds the batch index of each packed reference; references of one batch item
    keep their packed order. Empty slots are zero; the int64 mask ``[batch_size, max_refs]`` is 1
    where a reference sits.
    """
    if order.numel() == 0:
        raise InvalidArgument("refer_audio_order_mask must name at least one reference", field="refer_audio_order_mask")
    order = order.long()
    if int(order.min()) < 0 or int(order.max()) >= batch_size:
        raise InvalidArgument(
            f"refer_audio_order_mask values must be in [0, {batch_size - 1}], got {order.tolist()}",
            field="refer_audio_order_mask",
        )
    max_refs = int(torch.bincount(order, minlength=batch_size).max())
    same_item = order[:, None] == order[None, :]  # [N, N]
    slot = torch.tril(same_item, diagonal=-1).sum(dim=1)  # [N]: earlier references of the same item
    unpacked = embeddings.new_zeros(batch_size, max_refs, embeddings.shape[-1])  # [B, R, D]
    unpacked[order, slot] = embeddings
    mask = torch.zeros(batch_size, max_refs, dtype=torch.int64, device=embeddings.device)  # [B, R]
    mask[order, slot] = 1
    return unpacked, mask


class LyricEncoder(nn.Module):
    """Lyric token embeddings ``[B, L, text_hidden_dim]`` -> ``[B, L, H]`` (key-padding masked)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Linear(config.text_hidden_dim, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(
            EncoderLayer(config, i) for i in range(config.num_lyric_encoder_hidden_layers)
        )

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Runs ``layers[:num_hidden_layers]`` (the DiT depth), as the reference does."""
        hidden = self.embed_tokens(inputs_embeds)  # [B, L, H]
        layers = self.layers[: self.config.num_hidden_layers]
        return self.norm(run_encoder_layers(layers, hidden, self.config, attention_mask))


class TimbreEncoder(nn.Module):
    """Reference-audio latents ``[N, T, timbre_hidden_dim]`` -> one vector per reference.

    The vector is the final-normed hidden state at frame 0; ``special_token`` is a checkpoint
    tensor the reference never uses.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Linear(config.timbre_hidden_dim, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.special_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.layers = nn.ModuleList(
            EncoderLayer(config, i) for i in range(config.num_timbre_encoder_hidden_layers)
        )

    def forward(self, packed: Tensor, order: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``([B, max_refs, H], int64 mask [B, max_refs])``; B defaults to ``max(order) + 1``."""
        hidden = self.embed_tokens(packed)  # [N, T, H]
        layers = self.layers[: self.config.num_hidden_layers]
        hidden = self.norm(run_encoder_layers(layers, hidden, self.config))[:, 0, :]  # [N, H]
        if batch_size is None:
            batch_size = int(order.max()) + 1
        return unpack_by_order(hidden, order, batch_size)


class ConditionEncoder(nn.Module):
    """Text, lyrics and timbre references -> packed cross-attention states and their mask."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.text_projector = nn.Linear(config.text_hidden_dim, config.hidden_size, bias=False)
        self.lyric_encoder = LyricEncoder(config)
        self.timbre_encoder = TimbreEncoder(config)

    def forward(
        self,
        text_hidden_states: Tensor,
        text_attention_mask: Tensor,
        lyric_hidden_states: Tensor,
        lyric_attention_mask: Tensor,
        refer_audio_acoustic_hidden_states_packed: Tensor,
        refer_audio_order_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``encoder_hidden_states [B, Ll + R + Lt, H]`` and a bool mask ``[B, Ll + R + Lt]``."""
        text = self.text_projector(text_hidden_states)  # [B, Lt, H]
        lyrics = self.lyric_encoder(lyric_hidden_states, lyric_attention_mask)  # [B, Ll, H]
        timbre, timbre_mask = self.timbre_encoder(
            refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask, batch_size=text.shape[0]
        )  # [B, R, H], [B, R]
        hidden, mask = pack_sequences(lyrics, timbre, lyric_attention_mask, timbre_mask)
        return pack_sequences(hidden, text, mask, text_attention_mask)
