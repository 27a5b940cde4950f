"""Everything the constrained decoder needs to know about a tokenizer, computed once at load time.

The reference processor walks the whole vocabulary when it is created (decoding every id); this
class does that once per tokenizer and keeps the results as tensors and tables, so that a decoding
step never loops over the vocabulary in Python.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from lm_service.constraints.masking import block_padding, keep_only
from lm_service.constraints.spec import FIELD_ORDER
from lm_service.constraints.tables import (
    FixedStringTable,
    GenresTable,
    ReferenceGenres,
    SpellingTable,
    TokenMask,
    ValueTrie,
    id_tensor,
    load_genres,
)
from shared.constants import (
    BPM_MAX,
    BPM_MIN,
    DURATION_MAX_S,
    DURATION_MIN_S,
    KEYSCALES,
    NUM_AUDIO_CODES,
    VALID_LANGUAGES,
    VALID_TIME_SIGNATURES,
)
from shared.errors import Internal, out_of_range

BUILTIN_GENRES_PATH = Path(__file__).with_name("genres.txt")
THINK_TAG = "<think>"
THINK_END_TAG = "</think>"
_CODE_TOKEN = re.compile(r"^<\|audio_code_(\d+)\|>$")


def find_code_id_range(token_texts: Sequence[str], num_codes: int = NUM_AUDIO_CODES) -> int:
    """First id of the ``<|audio_code_N|>`` tokens with N in [0, num_codes).

    Raises ``Internal`` unless all ``num_codes`` of them exist and code N has id ``first + N``.
    """
    id_by_code: dict[int, int] = {}
    for token_id, text in enumerate(token_texts):
        match = _CODE_TOKEN.match(text)
        if match and int(match.group(1)) < num_codes:
            id_by_code[int(match.group(1))] = token_id
    if len(id_by_code) != num_codes:
        raise Internal(f"tokenizer has {len(id_by_code)} audio-code tokens in [0, {num_codes}), expected {num_codes}")
    first = id_by_code[0]
    if any(id_by_code[code] != first + code for code in range(num_codes)):
        raise Internal(f"audio-code token ids are not contiguous from id {first}")
    return first


def _decode_each(tokenizer: Any, num_tokens: int) -> tuple[str, ...]:
    """The text of every id on its own, as ``tokenizer.decode([id])`` gives it."""
    single_ids = [[i] for i in range(num_tokens)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return tuple(backend.decode_batch(single_ids, skip_special_tokens=False))
    return tuple(tokenizer.batch_decode(single_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))


def _num_model_tokens(tokenizer: Any) -> int:
    """Ids below this belong to the BPE model; added tokens come after them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.get_vocab_size(with_added_tokens=False)
    return len(tokenizer) - len(tokenizer.get_added_vocab())


class ConstraintVocab:
    """Token tables for one tokenizer (shared, read-only, by every constraint built from it).

    Ids ``>= num_tokens`` (a padded logits width) are never allowed. Tensors are CPU tensors;
    ``on(tensor, device)`` returns a cached copy on another device. The tokenizer is kept to encode
    user-supplied values when a generation starts.
    """

    def __init__(self, tokenizer: Any, max_duration_s: int, genres: Sequence[str] | None) -> None:
        if not DURATION_MIN_S <= max_duration_s <= DURATION_MAX_S:
            raise out_of_range("max_duration_s", max_duration_s, int(DURATION_MIN_S), int(DURATION_MAX_S), "seconds")
        self.max_duration_s = int(max_duration_s)
        self.num_tokens = len(tokenizer)
        self.token_texts = _decode_each(tokenizer, self.num_tokens)
        self._tokenizer = tokenizer
        self._init_special_ids(tokenizer)
        self.code_start_id = find_code_id_range(self.token_texts)
        self.code_end_id = self.code_start_id + NUM_AUDIO_CODES
        self._init_tables(genres)
        self._init_caption_masks(tokenizer)
        self._device_copies: dict[tuple[int, torch.device], torch.Tensor] = {}

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, max_duration_s: int = 600, genres_path: Path | None = None
    ) -> "ConstraintVocab":
        """Build the tables for ``tokenizer``.

        ``max_duration_s`` caps the CoT ``duration`` value (the GPU tier's limit in the reference, at
        most 600). ``genres_path``: the genre vocabulary (one entry per line, ``#`` comments), read
        once (the reference hot-reloads it; build a new vocab to change it). None: no vocabulary,
        and the genres value is free text ended by the model (the reference without its file).
        """
        genres = None
        if genres_path is not None:
            genres = load_genres(Path(genres_path).read_text(encoding="utf-8").splitlines())
        return cls(tokenizer, max_duration_s, genres)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added (special-token text maps to its id)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def on(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` (owned by this vocab) on ``device``, copied once and cached."""
        if tensor.device == device:
            return tensor
        key = (id(tensor), device)
        copy = self._device_copies.get(key)
        if copy is None:
            copy = self._device_copies[key] = tensor.to(device)
        return copy

    def apply(self, mask: TokenMask, logits: torch.Tensor) -> torch.Tensor:
        """Disallow, in place, every id of ``logits`` ([V], V >= num_tokens) that ``mask`` blocks."""
        if mask.ceiling is None:
            return keep_only(logits, self.on(mask.allowed_ids, logits.device))
        logits[: self.num_tokens].clamp_(max=self.on(mask.ceiling, logits.device))
        block_padding(logits, self.num_tokens)
        return logits

    def _init_special_ids(self, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise Internal("tokenizer has no eos_token_id")
        self.eos_id: int = int(tokenizer.eos_token_id)
        self.pad_id: int | None = tokenizer.pad_token_id
        self.stop_ids = frozenset(i for i in (self.eos_id, self.pad_id) if i is not None)
        self.newline_id = self.encode("\n")[-1]
        self.backtick_id = self.encode("`")[-1]
        self.digit_ids = tuple(self.encode(str(d))[-1] for d in range(10))
        self.think_end_ids = tuple(self.encode(THINK_END_TAG))
        self.eos = id_tensor([self.eos_id])

    def _init_tables(self, genres: Sequence[str]) -> None:
        encode, newline_id = self.encode, self.newline_id
        names = [THINK_TAG, "\n", THINK_END_TAG] + [f"{name}:" for name in FIELD_ORDER]
        self.fixed = {text: FixedStringTable.build(text, encode, self.token_texts) for text in names}
        self.bpm = ValueTrie.build(encode, "bpm", [str(v) for v in range(BPM_MIN, BPM_MAX + 1)], newline_id)
        durations = [str(v) for v in range(int(DURATION_MIN_S), self.max_duration_s + 1)]
        self.duration = ValueTrie.build(encode, "duration", durations, newline_id)
        self.timesignature = ValueTrie.build(encode, "timesignature", list(VALID_TIME_SIGNATURES), newline_id)
        self.keyscale = ValueTrie.build(encode, "keyscale", list(KEYSCALES), newline_id, self._starts_with_note)
        self.language = ValueTrie.build(encode, "language", list(VALID_LANGUAGES), newline_id)
        self.value_tries = {"bpm": self.bpm, "duration": self.duration, "keyscale": self.keyscale,
                            "language": self.language, "timesignature": self.timesignature}
        ids_by_text: dict[str, list[int]] = defaultdict(list)
        ids_by_lower_text: dict[str, list[int]] = defaultdict(list)
        for token_id, text in enumerate(self.token_texts):
            if text and "\n" not in text and "\r" not in text:
                ids_by_text[text].append(token_id)
                ids_by_lower_text[text.lower()].append(token_id)
        self.spellings = {name: SpellingTable.build(f"{name}:", ids_by_text) for name in FIELD_ORDER}
        self.genres = GenresTable.build(genres, ids_by_lower_text, newline_id) if genres is not None else None
        self.genres_reference = ReferenceGenres(genres, self.token_texts, newline_id) if genres is not None else None

    def _starts_with_note(self, token_id: int) -> bool:
        text = self.token_texts[token_id].lstrip()
        return bool(text) and text[0].upper() in "ABCDEFG"

    def _init_caption_masks(self, tokenizer: Any) -> None:
        """Masks over the first ``num_tokens`` ids used while the caption is written."""
        blocked = torch.zeros(self.num_tokens, dtype=torch.bool)  # [N]
        blocked[self.code_start_id:self.code_end_id] = True
        blocked[self.backtick_id] = True
        blocked[_num_model_tokens(tokenizer):] = True  # added tokens: chat/think tags, codes, specials
        blocked[torch.tensor(list(tokenizer.all_special_ids), dtype=torch.long)] = True
        reference_blocked = torch.zeros(self.num_tokens, dtype=torch.bool)  # [N]
        reference_blocked[self.code_start_id:self.code_end_id] = True
        reference_blocked[self.backtick_id] = True
        self.caption_reference = TokenMask.from_blocked(reference_blocked)  # the reference: backtick + codes
        starts_indented = torch.tensor(
            [bool(text) and text[0] in " \t" for text in self.token_texts], dtype=torch.bool
        )  # [N]
        self.caption_text = TokenMask.from_blocked(blocked)  # anywhere in a caption line
        self.caption_indent = TokenMask.from_blocked(blocked | ~starts_indented)  # starting a continuation line
        # The reference ends the caption when the top token after a line break does not start with
        # a space or a tab (an unindented line is the next field's name).
        self.ends_caption = [bool(text) and text[0] not in " \t" for text in self.token_texts]

    def describe(self, token_ids: Sequence[int], limit: int = 8) -> str:
        """``id:'text'`` pairs for logging (first ``limit`` ids)."""
        texts = self.token_texts
        shown = [f"{i}:{texts[i]!r}" if 0 <= i < self.num_tokens else f"{i}:<pad>" for i in token_ids[:limit]]
        more = f" (+{len(token_ids) - limit} more)" if len(token_ids) > limit else ""
        return ", ".join(shown) + more
