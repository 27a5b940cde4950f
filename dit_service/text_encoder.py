"""The Qwen3-Embedding text encoder of the DiT: caption hidden states and lyric token embeddings.

Reproduces the reference's text branch (reference-dit §4.4):

* every prompt is tokenized on its own (``padding="longest"``, ``truncation=True``, 256 tokens for
  captions, 2048 for lyrics, default special tokens, so the shipped tokenizer appends its
  ``<|endoftext|>``), then the batch is right-padded with ``pad_token_id`` (mask 0);
* captions: the full model called with ``input_ids`` only (no attention mask; attention is causal,
  so right padding leaves the valid positions untouched), ``last_hidden_state``;
* lyrics: only the token-embedding table, no transformer layers.

Identical prompts in a batch are encoded once and shared; the padded positions are still computed
at the batch's full length, because the DiT attends to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dit_service.prompts import LYRICS_TOKENIZER_KWARGS, TEXT_TOKENIZER_KWARGS
from shared.errors import InvalidArgument


@dataclass(frozen=True)
class EncodedText:
    """Right-padded encoder inputs of a batch: ``hidden [B, L, H]`` and bool ``mask [B, L]``."""

    hidden: Tensor
    mask: Tensor


class TextEncoder:
    """Tokenizer plus Qwen3 model on one device and dtype."""

    def __init__(self, tokenizer, model: torch.nn.Module) -> None:
        if tokenizer.pad_token_id is None:
            raise InvalidArgument("the text-encoder tokenizer has no pad token", field="checkpoints")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype, device: str | torch.device) -> TextEncoder:
        """``AutoTokenizer`` + ``AutoModel`` from a ``Qwen3-Embedding-0.6B`` folder."""
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise InvalidArgument(f"text-encoder folder {folder} has no config.json", field="checkpoints")
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModel.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
        return cls(tokenizer, model.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def token_ids(self, prompt: str, kwargs: Mapping[str, object]) -> list[int]:
        """Token ids of one prompt, tokenized alone with the reference's keyword arguments."""
        return list(self.tokenizer(prompt, **kwargs)["input_ids"])

    @torch.no_grad()
    def encode_captions(self, prompts: Sequence[str]) -> EncodedText:
        """Caption prompts -> ``last_hidden_state [B, Lt, H]`` of the full model and their mask."""
        ids, mask, unique, inverse = self._padded_ids(prompts, TEXT_TOKENIZER_KWARGS)
        hidden = self.model(input_ids=ids[unique]).last_hidden_state  # [U, Lt, H]
        return EncodedText(hidden=hidden[inverse], mask=mask)

    @torch.no_grad()
    def embed_lyrics(self, prompts: Sequence[str]) -> EncodedText:
        """Lyric prompts -> token embeddings ``[B, Ll, H]`` (embedding table only) and their mask."""
        ids, mask, _, _ = self._padded_ids(prompts, LYRICS_TOKENIZER_KWARGS)
        return EncodedText(hidden=self.model.get_input_embeddings()(ids), mask=mask)

    def _padded_ids(
        self, prompts: Sequence[str], kwargs: Mapping[str, object]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(ids [B, L], bool mask [B, L], first row of each distinct prompt [U], row -> distinct [B])``."""
        if not prompts:
            raise InvalidArgument("at least one prompt is required", field="prompts")
        distinct = list(dict.fromkeys(prompts))
        token_lists = {prompt: self.token_ids(prompt, kwargs) for prompt in distinct}
        length = max(len(tokens) for tokens in token_lists.values())
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)  # [B, L]
        for row, prompt in enumerate(prompts):
            tokens = token_lists[prompt]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = True
        first_row = [prompts.index(prompt) for prompt in distinct]
        inverse = [distinct.index(prompt) for prompt in prompts]
        device = self.device
        first = torch.tensor(first_row, device=device)
        return ids.to(device), mask.to(device), first, torch.tensor(inverse, device=device)
