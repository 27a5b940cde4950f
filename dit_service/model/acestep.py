"""``AceStepConditionGenerationModel``: the module tree of a published ACE-Step 1.5 DiT checkpoint.

Attribute names equal the state-dict path components (``decoder``, ``encoder``, ``tokenizer``,
``detokenizer``, ``null_condition_emb``), so ``model.safetensors`` loads strictly. The decoder is
built with the checkpoint config; everything else with ``config.encoder_view()`` (the XL split).
Sampling lives elsewhere; this module only holds the networks and the condition preparation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit_service.model.config import DiTConfig
from dit_service.model.dit import DiTDecoder
from dit_service.model.encoders import ConditionEncoder
from dit_service.model.tokenizer import AudioDetokenizer, AudioTokenizer, codes_to_latents
from shared.errors import InvalidArgument


class AceStepConditionGenerationModel(nn.Module):
    """Condition encoder, DiT decoder, audio tokenizer/detokenizer and the CFG null embedding."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        encoder_config = config.encoder_view()
        self.config = config
        self.decoder = DiTDecoder(config)
        self.encoder = ConditionEncoder(encoder_config)
        self.tokenizer = AudioTokenizer(encoder_config)
        self.detokenizer = AudioDetokenizer(encoder_config)
        self.null_condition_emb = nn.Parameter(torch.zeros(1, 1, encoder_config.hidden_size))

    def tokenize(
        self, x: Tensor, silence_latent: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """25 Hz latents ``x [B, T, 64]`` -> ``(quantized [B, T5, fsq_dim], indices [B, T5, Q], mask_5hz [B, T5])``.

        When ``T`` is not a multiple of the pool window, the first missing frames of
        ``silence_latent [1, T_sil, 64]`` are appended to every item (mask 0 there). The 5 Hz mask
        is the window-wise max of ``attention_mask`` (ones when None), in ``x``'s dtype.
        """
        window = self.config.pool_window_size
        batch, frames, _ = x.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, frames, device=x.device)
        mask = attention_mask.to(device=x.device, dtype=x.dtype)  # [B, T]
        pad = -frames % window
        if pad:
            if silence_latent.shape[1] < pad:
                raise InvalidArgument(
                    f"silence_latent needs at least {pad} frames, got {silence_latent.shape[1]}", field="silence_latent"
                )
            filler = silence_latent[:1, :pad].to(device=x.device, dtype=x.dtype).expand(batch, -1, -1)  # [B, pad, 64]
            x = torch.cat([x, filler], dim=1)  # [B, T + pad, 64]
            mask = F.pad(mask, (0, pad), value=0.0)  # [B, T + pad]
        mask_5hz = F.max_pool1d(mask.unsqueeze(1), kernel_size=window, stride=window, ceil_mode=True).squeeze(1)
        quantized, indices = self.tokenizer.tokenize(x)
        return quantized, indices, mask_5hz

    def detokenize(self, quantized: Tensor) -> Tensor:
        """5 Hz vectors ``[B, T5, fsq_dim]`` -> 25 Hz latents ``[B, 5 * T5, 64]``."""
        return self.detokenizer(quantized)

    def codes_to_latents(self, indices: Tensor) -> Tensor:
        """5 Hz FSQ indices ``[B, T5, Q]`` -> 25 Hz LM-hint latents ``[B, 5 * T5, 64]``."""
        return codes_to_latents(self.tokenizer, self.detokenizer, indices)

    def prepare_condition(
        self,
        text_hidden_states: Tensor,
        text_attention_mask: Tensor,
        lyric_hidden_states: Tensor,
        lyric_attention_mask: Tensor,
        refer_audio_acoustic_hidden_states_packed: Tensor,
        refer_audio_order_mask: Tensor,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        silence_latent: Tensor | None,
        src_latents: Tensor,
        chunk_masks: Tensor,
        is_covers: Tensor,
        precomputed_lm_hints_25Hz: Tensor | None = None,  # noqa: N803 (the reference's keyword)
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encoder states, their mask and ``context_latents [B, T, 128] = cat(src, chunk_masks)``.

        For items with ``is_covers`` set, ``src`` is replaced by LM hints: the given
        ``precomputed_lm_hints_25Hz`` cropped to ``T``, or else ``detokenize(tokenize(hidden_states))``
        cropped to ``T``. The round trip runs only when some item is a cover and no hints are given
        (the reference always runs it and discards the result otherwise).
        """
        encoder_hidden_states, encoder_attention_mask = self.encoder(
            text_hidden_states,
            text_attention_mask,
            lyric_hidden_states,
            lyric_attention_mask,
            refer_audio_acoustic_hidden_states_packed,
            refer_audio_order_mask,
        )
        frames = src_latents.shape[1]
        covers = (is_covers > 0).to(src_latents.device)[:, None, None]  # [B, 1, 1]
        hints = precomputed_lm_hints_25Hz
        if hints is None and bool(covers.any()):
            if silence_latent is None:
                raise InvalidArgument("silence_latent is required to tokenize cover sources", field="silence_latent")
            quantized, _, _ = self.tokenize(hidden_states, silence_latent, attention_mask)
            hints = self.detokenize(quantized)  # [B, 5 * T5, 64]
        if hints is not None:
            if hints.shape[1] < frames:
                raise InvalidArgument(
                    f"LM hints cover {hints.shape[1]} frames, need {frames}", field="precomputed_lm_hints_25Hz"
                )
            src_latents = torch.where(covers, hints[:, :frames].to(src_latents.dtype), src_latents)
        context_latents = torch.cat([src_latents, chunk_masks.to(hidden_states.dtype)], dim=-1)  # [B, T, 128]
        return encoder_hidden_states, encoder_attention_mask, context_latents
