"""Token tables built once per tokenizer: value prefix trees, fixed-string steps, spellings, genres.

Every table maps a decoding position to a precomputed id tensor, so a decoding step is a dict
lookup plus one vectorised mask. Each builder reproduces how the reference processor derives its
table from the tokenizer (reference-lm.md sections 4.3.2, 4.3.3, 4.3.5-4.3.7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

Encode = Callable[[str], list[int]]

# The reference's fallback for fixed strings tries prefixes of at most this many characters.
_FALLBACK_MAX_PREFIX_CHARS = 19


def id_tensor(ids: Iterable[int]) -> torch.Tensor:
    """Sorted, de-duplicated int64 id tensor ([K])."""
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


@dataclass(frozen=True)
class TokenMask:
    """A fixed set of allowed ids among the first N, stored the way it is cheapest to apply.

    Small sets keep only their ids ([K] int64) and are applied by whitelisting; large sets also
    keep a ceiling ([N] float32: +inf where allowed, -inf where blocked), applied with one in-place
    clamp (no boolean-mask kernel, and a +inf logit cannot turn into NaN).
    """

    allowed_ids: torch.Tensor
    ceiling: torch.Tensor | None

    @classmethod
    def from_blocked(cls, blocked: torch.Tensor) -> "TokenMask":
        """Mask allowing the ids where ``blocked`` ([N] bool) is False."""
        allowed_ids = (~blocked).nonzero().flatten()  # [K]
        if 8 * allowed_ids.numel() < blocked.numel():
            return cls(allowed_ids=allowed_ids, ceiling=None)
        ceiling = torch.full((blocked.numel(),), float("inf")).masked_fill_(blocked, float("-inf"))  # [N]
        return cls(allowed_ids=allowed_ids, ceiling=ceiling)


@dataclass(frozen=True)
class TrieNode:
    """One prefix of a value's token sequence.

    ``allowed``: the next tokens of the values that continue this prefix, plus the newline when
    the prefix is itself a complete value ([K] int64).
    """

    allowed: torch.Tensor
    is_complete: bool


class ValueTrie:
    """Token-id prefix tree of every value a field may take, keyed by the value's token tuple.

    Built like the reference: tokenize ``f"{name}: {value}"``, drop the tokens of ``f"{name}:"``
    (values whose tokenization does not start with them are left out) and register every prefix.
    The space before the value belongs to the value's first token.
    """

    def __init__(self, nodes: Mapping[tuple[int, ...], TrieNode], values: Sequence[str]) -> None:
        self._nodes = dict(nodes)
        self.values = tuple(values)

    @classmethod
    def build(
        cls,
        encode: Encode,
        name: str,
        values: Sequence[str],
        newline_id: int,
        first_token_ok: Callable[[int], bool] | None = None,
    ) -> "ValueTrie":
        """Tree over ``values``; ``first_token_ok`` can reject a value by its first token."""
        context = encode(f"{name}:")
        children: dict[tuple[int, ...], set[int]] = {}
        complete: set[tuple[int, ...]] = set()
        kept = []
        for value in values:
            full = encode(f"{name}: {value}")
            value_ids = full[len(context):]
            if full[: len(context)] != context or not value_ids:
                continue
            if first_token_ok is not None and not first_token_ok(value_ids[0]):
                continue
            kept.append(value)
            for i in range(len(value_ids)):
                children.setdefault(tuple(value_ids[:i]), set()).add(value_ids[i])
            complete.add(tuple(value_ids))
        nodes = {}
        for prefix in set(children) | complete:
            allowed = set(children.get(prefix, ()))
            if prefix in complete:
                allowed.add(newline_id)
            nodes[prefix] = TrieNode(allowed=id_tensor(allowed), is_complete=prefix in complete)
        return cls(nodes, kept)

    def node(self, prefix: tuple[int, ...]) -> TrieNode | None:
        """The node of a token prefix, or None when no value starts with it."""
        return self._nodes.get(prefix)

    def __len__(self) -> int:
        return len(self._nodes)


class FixedStringTable:
    """The tokens the reference forces while writing a fixed string such as ``"keyscale:"``.

    At each character position: the single token of the longest remaining prefix that encodes to
    exactly one token; if no prefix does, the first tokens of the prefixes (up to 19 characters)
    whose text is compatible with it, longest first. The position then moves on by the length of
    the generated token's text.
    """

    def __init__(self, text: str, steps: Mapping[int, torch.Tensor]) -> None:
        self.text = text
        self._steps = dict(steps)

    @classmethod
    def build(cls, text: str, encode: Encode, token_texts: Sequence[str]) -> "FixedStringTable":
        steps = {pos: id_tensor(_fixed_string_step(text[pos:], encode, token_texts)) for pos in range(len(text))}
        return cls(text, steps)

    def allowed(self, position: int) -> torch.Tensor | None:
        """Ids allowed at character ``position`` ([K] int64); None once the string is complete."""
        return self._steps.get(position)


def _fixed_string_step(remaining: str, encode: Encode, token_texts: Sequence[str]) -> list[int]:
    for end in range(len(remaining), 0, -1):
        ids = encode(remaining[:end])
        if len(ids) == 1:
            return ids
    best_end: dict[int, int] = {}
    for end in range(1, min(len(remaining), _FALLBACK_MAX_PREFIX_CHARS) + 1):
        prefix = remaining[:end]
        ids = encode(prefix)
        if not ids:
            continue
        want, got = prefix.lstrip().lower(), token_texts[ids[0]].lstrip().lower()
        if got.startswith(want) or want.startswith(got):
            best_end[ids[0]] = max(end, best_end.get(ids[0], 0))
    return [token for token, _ in sorted(best_end.items(), key=lambda item: -item[1])]


class SpellingTable:
    """Every way to write ``text`` token by token: at position i, the tokens whose text is text[i:j]."""

    def __init__(self, text: str, steps: Mapping[int, torch.Tensor]) -> None:
        self.text = text
        self._steps = dict(steps)

    @classmethod
    def build(cls, text: str, ids_by_text: Mapping[str, Sequence[int]]) -> "SpellingTable":
        steps = {}
        for start in range(len(text)):
            ids = [i for end in range(start + 1, len(text) + 1) for i in ids_by_text.get(text[start:end], ())]
            steps[start] = id_tensor(ids)
        return cls(text, steps)

    def allowed(self, position: int) -> torch.Tensor | None:
        """Ids that continue the spelling at ``position`` ([K] int64); None past the end."""
        return self._steps.get(position)


class GenresTable:
    """Character trie over the genre vocabulary, resolved to token ids for every trie prefix.

    A token may follow the text written so far when the lower-cased concatenation is still a prefix
    of a vocabulary line; the newline is allowed when the text is a complete line; a prefix with no
    continuation allows only the newline. Tokens containing a line break are never allowed.
    """

    def __init__(self, genres: Sequence[str], steps: Mapping[str, torch.Tensor], newline: torch.Tensor) -> None:
        self.genres = tuple(genres)
        self._steps = dict(steps)
        self._newline = newline

    @classmethod
    def build(
        cls, genres: Sequence[str], ids_by_lower_text: Mapping[str, Sequence[int]], newline_id: int
    ) -> "GenresTable":
        complete = set(genres)
        pieces: dict[str, set[str]] = {}
        for genre in complete:
            for start in range(len(genre) + 1):
                following = pieces.setdefault(genre[:start], set())
                following.update(genre[start:end] for end in range(start + 1, len(genre) + 1))
        steps = {}
        for prefix, texts in pieces.items():
            ids = [i for text in texts for i in ids_by_lower_text.get(text, ())]
            if prefix in complete or not ids:
                ids.append(newline_id)
            steps[prefix] = id_tensor(ids)
        return cls(sorted(complete), steps, id_tensor([newline_id]))

    def allowed(self, written: str) -> torch.Tensor:
        """Ids allowed after the genre text ``written`` so far ([K] int64)."""
        return self._steps.get(written.lower(), self._newline)


def load_genres(lines: Iterable[str]) -> list[str]:
    """Genre vocabulary lines: stripped, lower-cased, blanks and ``#`` comments dropped."""
    genres = []
    for line in lines:
        text = line.strip()
        if text and not text.startswith("#"):
            genres.append(text.lower())
    return genres


class ReferenceGenres:
    """The reference's genre rule, evaluated on the text written so far.

    The written text is lower-cased and stripped (so trailing spaces are forgotten); a token may
    follow when that prefix plus the token's lower-cased, right-stripped text is still a prefix of a
    vocabulary line; a whitespace-only token may follow when a space or comma can come next; a
    complete line also allows the newline; a prefix outside the vocabulary allows only the newline.
    Candidates are the tokens whose first character, or first non-space character, can come next.
    Results are cached per prefix.
    """

    def __init__(self, genres: Sequence[str], token_texts: Sequence[str], newline_id: int) -> None:
        self._trie: dict = {}
        for genre in genres:
            node = self._trie
            for char in genre:
                node = node.setdefault(char, {})
            node[""] = True  # "" marks a complete line (no character is empty)
        self._newline = newline_id
        self._normalized: dict[int, str] = {}
        self._by_char: dict[str, list[int]] = {}
        for token_id, text in enumerate(token_texts):
            if not text:
                continue
            lower = text.lower()
            self._normalized[token_id] = lower.rstrip() if lower.strip() else " "
            self._by_char.setdefault(lower[0], []).append(token_id)
            stripped = text.lstrip()
            if stripped and stripped != text:
                self._by_char.setdefault(stripped[0].lower(), []).append(token_id)
        self._cache: dict[str, torch.Tensor] = {}

    def _node(self, prefix: str) -> dict | None:
        node = self._trie
        for char in prefix.lower():
            node = node.get(char)
            if node is None:
                return None
        return node

    def allowed(self, written: str) -> torch.Tensor:
        """Ids allowed after the genre text ``written`` so far ([K] int64; may be empty)."""
        prefix = written.lower().strip()
        cached = self._cache.get(prefix)
        if cached is None:
            cached = self._cache[prefix] = id_tensor(self._allowed(prefix))
        return cached

    def _allowed(self, prefix: str) -> list[int]:
        node = self._node(prefix)
        if node is None:
            return [self._newline]
        next_chars = [char for char in node if char]
        complete = bool(node.get(""))
        allowed = [self._newline] if complete else []
        spacer = " " in next_chars or "," in next_chars
        candidates = {token for char in next_chars for token in self._by_char.get(char, ())}
        for token in candidates:
            text = self._normalized[token]
            if not text.strip():
                if spacer:
                    allowed.append(token)
            elif self._node(prefix + text) is not None:
                allowed.append(token)
        return allowed
