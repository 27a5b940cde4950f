"""The text branch: per-prompt tokenization, right padding, caption states and lyric embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dit_service.prompts import LYRICS_TOKENIZER_KWARGS, TEXT_TOKENIZER_KWARGS
from dit_service.text_encoder import TextEncoder
from devtools import tiny_checkpoints as tc

CAPTIONS = ["# Caption\nDreamy lo-fi hip hop with dusty drums<|endoftext|>\n", "# Caption\nrock<|endoftext|>\n"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> TextEncoder:
    folder: Path = tmp_path_factory.mktemp("text-encoder")
    tc.write_text_encoder(folder, seed=0)
    return TextEncoder.load(folder, torch.float32, "cpu")


def test_each_prompt_is_tokenized_alone_and_ends_with_the_automatic_endoftext(encoder):
    pad = encoder.tokenizer.pad_token_id
    ids = encoder.token_ids(CAPTIONS[1], TEXT_TOKENIZER_KWARGS)
    assert ids[-1] == pad and ids[-3] == pad  # "...<|endoftext|>", "\n", auto "<|endoftext|>"
    long_text = "la " * 3000
    assert len(encoder.token_ids(long_text, TEXT_TOKENIZER_KWARGS)) == 256
    assert len(encoder.token_ids(long_text, LYRICS_TOKENIZER_KWARGS)) == 2048


def test_caption_states_are_right_padded_and_match_the_unpadded_run(encoder):
    batch = encoder.encode_captions([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]])
    lengths = batch.mask.sum(dim=1).tolist()
    assert lengths[0] == lengths[2] > lengths[1] and batch.hidden.shape[:2] == batch.mask.shape
    assert batch.hidden.shape[-1] == encoder.hidden_size
    assert torch.equal(batch.hidden[0], batch.hidden[2])
    alone = encoder.encode_captions([CAPTIONS[1]])
    short = lengths[1]
    assert torch.allclose(batch.hidden[1, :short], alone.hidden[0], atol=1e-5)  # causal: padding does not leak
    ids = torch.tensor([encoder.token_ids(CAPTIONS[1], TEXT_TOKENIZER_KWARGS)
                        + [encoder.tokenizer.pad_token_id] * (lengths[0] - short)])
    padded_run = encoder.model(input_ids=ids).last_hidden_state  # the reference's padded batch row
    assert torch.allclose(batch.hidden[1], padded_run[0], atol=1e-5)
    assert not batch.mask[1, short:].any()


def test_lyrics_use_the_embedding_table_only(encoder):
    batch = encoder.embed_lyrics(["# Languages\nen\n\n# Lyric\nhello<|endoftext|>", "# Languages\nen\n\n# Lyric\n"])
    table = encoder.model.get_input_embeddings().weight
    ids = encoder.token_ids("# Languages\nen\n\n# Lyric\nhello<|endoftext|>", LYRICS_TOKENIZER_KWARGS)
    assert torch.equal(batch.hidden[0, : len(ids)], table[ids])
    assert torch.equal(batch.hidden[1, -1], table[encoder.tokenizer.pad_token_id])
