"""The CoT metadata state machine of the 5 Hz LM (reference-lm.md section 4).

Reproduces the reference ``MetadataConstrainedLogitsProcessor`` for one sequence:
``<think>``, ``\\n``, then for every field not skipped its name (``bpm:``, ``caption:``, ...) and value,
then ``</think>``; after it the codes state, the free lyrics of the understand phase, or (with
``stop_at_reasoning``) EOS in place of ``</think>``. Fixed strings follow the reference's greedy
single-token segmentation; numeric, keyscale, language and time-signature values follow
token-id prefix trees; the language's first token is the top-scoring candidate (never sampled);
genres follow a character trie; user values are forced token by token; the caption is free text
whose end is detected from the top-scoring token after a line break.

By default the machine is the reference's, quirks included (``../golden/lm`` pins them): inside the
caption only the backtick and the audio codes are masked (EOS and the pad token can end the whole
output there); after a token containing a line break the top-scoring token decides whether the
caption goes on (it starts with a space or tab) or ends; once ended, tokens are free until one
contains ``:``, and the text before it names the next state (a known field jumps straight to its
value, anything else goes on with the next field's name); a genre value follows the reference's
character trie over the stripped, lower-cased text written so far; without a genre vocabulary the
value is free text that ends when the newline is the most likely token.

``ConstraintSpec.strict`` (``--lm-strict-cot``) switches on deliberate tightenings, which only
matter when a sampled token disagrees with what a trained model writes (the reference lets such
tokens corrupt the block):

* the caption never contains control tokens (EOS, pad, chat and think tags, any added token),
  besides the backtick and audio codes the reference already blocks;
* once the caption end is detected the next line is written as the successor field's name
  (``duration:``, in any tokenization), where the reference leaves those tokens unconstrained;
  when the caption continues, the next token must start with a space or tab (YAML continuation);
* a line break is a token that ends with ``\\n`` (for the Qwen tokenizer the same as containing one);
* after the 512-token limit's forced newline the caption ends instead of looping on newlines;
* a genre value is matched character-exactly (the reference strips trailing spaces of the
  written text, which lets whitespace-only tokens repeat), and never contains a line break.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

import torch

from lm_service.constraints.codes import LOG, CodesConstraint, log_allowed
from lm_service.constraints.masking import NEG_INF, TokenWindow, block_padding, keep_one, keep_only
from lm_service.constraints.spec import FIELD_ORDER, ConstraintSpec
from lm_service.constraints.vocab import THINK_END_TAG, THINK_TAG, ConstraintVocab
from shared.constants import CODES_PER_SECOND

CAPTION_TOKEN_LIMIT = 512
# Fields whose complete value may only be followed by the newline (bpm and duration may go on).
_CLOSED_FIELDS = frozenset({"keyscale", "language", "timesignature"})
_STATE_PREFIX = {"bpm": "BPM", "caption": "CAPTION", "duration": "DURATION", "genres": "GENRES",
                 "keyscale": "KEYSCALE", "language": "LANGUAGE", "timesignature": "TIMESIG"}


class Stage(Enum):
    THINK_TAG = "THINK_TAG"
    NEWLINE_AFTER_THINK = "NEWLINE_AFTER_THINK"
    FIELD_NAME = "NAME"
    FIELD_VALUE = "VALUE"
    THINK_END_TAG = "THINK_END_TAG"
    CODES = "CODES_GENERATION"
    COMPLETED = "COMPLETED"


class CaptionMode(Enum):
    TEXT = "text"              # inside a caption line
    LINE_START = "line_start"  # after a line break, end not decided yet
    INDENT = "indent"          # decided: a continuation line follows
    ENDING = "ending"          # decided: the successor field's name follows (strict: forced spelling;
                               # reference: free tokens until one holds ':')


# Where the reference jumps when the free text after a caption names a field.
_JUMP_FIELDS = frozenset({"duration", "genres", "keyscale", "language", "timesignature"})


class MetadataConstraint:
    """Per-sequence CoT state machine; see the module docstring for the rules."""

    def __init__(self, vocab: ConstraintVocab, spec: ConstraintSpec) -> None:
        self._vocab = vocab
        self._spec = spec
        self._debug = spec.debug
        self._fields = tuple(name for name in FIELD_ORDER if not spec.is_skipped(name))
        self._stage = Stage.THINK_TAG
        self._field: str | None = None
        self._position = 0                  # characters of the current fixed string or spelling written
        self._value_ids: list[int] = []     # tokens of the current value
        self._value_text = ""               # text of the current value
        self._injection: deque[int] = deque()
        self._caption_mode = CaptionMode.TEXT
        self._caption_tokens = 0
        self._pending_name = ""             # reference: free text after the caption, up to its ':'
        self._after_newline = False         # reference: the last caption token held a line break
        self._codes: CodesConstraint | None = None
        self._finished = False

    @property
    def is_finished(self) -> bool:
        return self._finished or (self._codes is not None and self._codes.is_finished)

    @property
    def state_name(self) -> str:
        """The reference's name of the current state (e.g. ``KEYSCALE_VALUE``)."""
        if self._stage in (Stage.FIELD_NAME, Stage.FIELD_VALUE):
            return f"{_STATE_PREFIX[self._field]}_{self._stage.value}"
        return self._stage.value

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask ``logits`` ([V] float32, CFG-combined) in place to what this step allows."""
        if self._codes is not None:
            return self._codes.mask_logits(logits)
        block_padding(logits, self._vocab.num_tokens)
        if self._finished:
            keep_one(logits, self._vocab.eos_id)
        elif self._injection:
            keep_one(logits, self._injection[0])
        elif self._stage is Stage.FIELD_VALUE:
            self._mask_value(logits)
        elif self._stage is Stage.COMPLETED:
            logits[self._vocab.code_start_id:self._vocab.code_end_id] = NEG_INF
        else:
            self._mask_fixed(logits)
        if self._debug:
            log_allowed(self._vocab, self.state_name, logits)
        return logits

    def allowed_window(self) -> TokenWindow | None:
        """In the codes state, the codes constraint's window; before it the mask needs the logits."""
        return self._codes.allowed_window() if self._codes is not None else None

    def advance(self, token_id: int) -> None:
        """Move the state machine past ``token_id``, the token sampled from the last mask."""
        if self._finished:
            return
        if self._codes is not None:
            self._codes.advance(token_id)
            return
        if self._debug:
            LOG.debug("generated %s in %s", self._vocab.describe([token_id]), self.state_name)
        if token_id in self._vocab.stop_ids:
            self._finished = True
            if self._debug:
                LOG.debug("stop token %d in %s: finished", token_id, self.state_name)
            return
        if self._injection:
            self._injection.popleft()
            if not self._injection:
                self._enter_next_field(after=self._field)
            return
        text = self._vocab.token_texts[token_id] if 0 <= token_id < self._vocab.num_tokens else ""
        if self._stage is Stage.FIELD_VALUE:
            self._advance_value(token_id, text)
        elif self._stage is not Stage.COMPLETED:
            self._position += len(text)
            if self._position >= len(self._fixed_text()):
                self._finish_fixed()

    def _fixed_text(self) -> str:
        if self._stage is Stage.THINK_TAG:
            return THINK_TAG
        if self._stage is Stage.NEWLINE_AFTER_THINK:
            return "\n"
        if self._stage is Stage.THINK_END_TAG:
            return THINK_END_TAG
        return f"{self._field}:"

    def _mask_fixed(self, logits: torch.Tensor) -> None:
        if self._stage is Stage.THINK_END_TAG and self._spec.stop_at_reasoning:
            keep_one(logits, self._vocab.eos_id)  # phase 1 ends where `</think>` would start
            return
        allowed = self._vocab.fixed[self._fixed_text()].allowed(self._position)
        keep_only(logits, self._vocab.on(allowed, logits.device))

    def _mask_value(self, logits: torch.Tensor) -> None:
        vocab, name = self._vocab, self._field
        if name == "caption":
            self._mask_caption(logits) if self._spec.strict else self._mask_caption_reference(logits)
        elif name == "genres":
            self._mask_genres(logits)
        elif name == "duration" and self._spec.target_codes is not None:
            self._mask_target_duration(logits)
        elif name == "language" and not self._value_ids:
            self._mask_language_choice(logits)
        else:
            node = vocab.value_tries[name].node(tuple(self._value_ids))
            if node is None or (node.is_complete and name in _CLOSED_FIELDS) or node.allowed.numel() == 0:
                keep_one(logits, vocab.newline_id)
            else:
                keep_only(logits, vocab.on(node.allowed, logits.device))

    def _mask_genres(self, logits: torch.Tensor) -> None:
        vocab = self._vocab
        if vocab.genres is None:
            self._mask_free_genres(logits)
            return
        if self._spec.strict:
            keep_only(logits, vocab.on(vocab.genres.allowed(self._value_text), logits.device))
            return
        allowed = vocab.genres_reference.allowed(self._value_text)
        if allowed.numel():
            keep_only(logits, vocab.on(allowed, logits.device))
        else:
            keep_one(logits, vocab.newline_id)

    def _mask_free_genres(self, logits: torch.Tensor) -> None:
        """No vocabulary (the reference's fallback): free text, ended when the newline is the most
        likely token once something was written; the newline is blocked before that."""
        newline = self._vocab.newline_id
        if not self._value_text.strip():
            logits[newline] = NEG_INF
            return
        others = logits.clone()
        others[newline] = NEG_INF
        if logits[newline] > others.max():
            keep_one(logits, newline)

    def _mask_target_duration(self, logits: torch.Tensor) -> None:
        """Reference quirk: with a target, the duration digits are forced (without leading space)."""
        digits = str(self._spec.target_codes // CODES_PER_SECOND)
        written = sum(ch.isdigit() for ch in self._value_text)
        if written < len(digits):
            keep_one(logits, self._vocab.digit_ids[int(digits[written])])
        else:
            keep_one(logits, self._vocab.newline_id)

    def _mask_language_choice(self, logits: torch.Tensor) -> None:
        """The language's first token is the top-scoring candidate; the rest follows the tree."""
        root = self._vocab.language.node(())
        if root is None:
            keep_one(logits, self._vocab.newline_id)
            return
        candidates = self._vocab.on(root.allowed, logits.device)  # [K]
        best = candidates[torch.argmax(logits.index_select(0, candidates))].reshape(1)  # [1]
        if self._debug:
            LOG.debug("language: top-1 first token %s of %d candidates",
                      self._vocab.describe([int(best.item())]), candidates.numel())
        keep_only(logits, best)

    def _mask_caption(self, logits: torch.Tensor) -> None:
        vocab = self._vocab
        if self._caption_mode is CaptionMode.LINE_START:
            self._decide_caption_line(logits)
        if self._caption_mode is CaptionMode.ENDING:
            spelling = vocab.spellings[self._caption_successor()]
            keep_only(logits, vocab.on(spelling.allowed(self._position), logits.device))
        elif self._caption_tokens >= CAPTION_TOKEN_LIMIT:
            keep_one(logits, vocab.newline_id)
        else:
            indent = self._caption_mode is CaptionMode.INDENT
            vocab.apply(vocab.caption_indent if indent else vocab.caption_text, logits)

    def _mask_caption_reference(self, logits: torch.Tensor) -> None:
        """The reference's caption rules (module docstring)."""
        vocab = self._vocab
        if self._after_newline:
            self._after_newline = False
            top = int(torch.argmax(logits[: vocab.num_tokens]).item())
            text = vocab.token_texts[top]
            ends = bool(text) and text[0] not in " \t"
            if self._debug:
                LOG.debug("caption line start: top token %s, caption %s", vocab.describe([top]),
                          "ends" if ends else "continues")
            if ends:
                self._caption_mode, self._pending_name = CaptionMode.ENDING, ""
        if self._caption_mode is CaptionMode.ENDING:
            return  # free tokens until one holds ':'
        vocab.apply(vocab.caption_reference, logits)
        if self._caption_tokens >= CAPTION_TOKEN_LIMIT:
            keep_one(logits, vocab.newline_id)

    def _decide_caption_line(self, logits: torch.Tensor) -> None:
        """After a line break: the top-scoring token decides whether the caption goes on."""
        top = int(torch.argmax(logits[: self._vocab.num_tokens]).item())
        at_limit = self._caption_tokens >= CAPTION_TOKEN_LIMIT
        ends = at_limit or self._vocab.ends_caption[top]
        self._caption_mode = CaptionMode.ENDING if ends else CaptionMode.INDENT
        self._position = 0
        if self._debug:
            LOG.debug("caption line start: top token %s, %s", self._vocab.describe([top]),
                      "limit reached, caption ends" if at_limit else "caption ends" if ends else "caption continues")

    def _caption_successor(self) -> str:
        index = self._fields.index("caption")
        return self._fields[index + 1]  # duration is never skipped

    def _advance_value(self, token_id: int, text: str) -> None:
        if self._field == "caption":
            self._advance_caption(text)
        elif token_id == self._vocab.newline_id:
            self._enter_next_field(after=self._field)
        else:
            self._value_ids.append(token_id)
            self._value_text += text

    def _advance_caption(self, text: str) -> None:
        if not self._spec.strict:
            self._advance_caption_reference(text)
            return
        self._caption_tokens += 1
        if self._caption_mode is CaptionMode.ENDING:
            self._position += len(text)
            successor = self._caption_successor()
            if self._position >= len(successor) + 1:
                self._enter(Stage.FIELD_VALUE, successor)
            return
        self._value_text += text
        self._caption_mode = CaptionMode.LINE_START if text.endswith("\n") else CaptionMode.TEXT

    def _advance_caption_reference(self, text: str) -> None:
        self._caption_tokens += 1
        self._value_text += text
        self._after_newline = "\n" in text
        if self._caption_mode is not CaptionMode.ENDING:
            return
        self._pending_name += text
        if ":" not in text:
            return
        name = self._pending_name.strip().rstrip(":").strip().lower()
        if self._debug:
            LOG.debug("caption ended; the free text names %r", name)
        if name in _JUMP_FIELDS:
            self._enter(Stage.FIELD_VALUE, name)
        else:
            self._enter_next_field(after="caption")

    def _finish_fixed(self) -> None:
        if self._stage is Stage.THINK_TAG:
            self._enter(Stage.NEWLINE_AFTER_THINK)
        elif self._stage is Stage.NEWLINE_AFTER_THINK:
            self._enter(Stage.FIELD_NAME, self._fields[0])
        elif self._stage is Stage.FIELD_NAME:
            self._enter(Stage.FIELD_VALUE, self._field)
        elif self._spec.phase == "understand" or self._spec.stop_at_reasoning:
            self._enter(Stage.COMPLETED)
        else:
            self._enter(Stage.CODES)
            self._codes = CodesConstraint(self._vocab, self._spec.target_codes, self._debug)

    def _enter_next_field(self, after: str) -> None:
        """The name of the first field after ``after`` that is not skipped (``after`` itself may be
        a skipped field the caption's free text jumped to), else ``</think>``."""
        later = FIELD_ORDER[FIELD_ORDER.index(after) + 1:]
        following = [name for name in later if name in self._fields]
        if following:
            self._enter(Stage.FIELD_NAME, following[0])
        else:
            self._enter(Stage.THINK_END_TAG)

    def _enter(self, stage: Stage, field: str | None = None) -> None:
        old = self.state_name
        self._stage, self._field = stage, field
        self._position = 0
        self._value_ids, self._value_text = [], ""
        self._caption_mode, self._caption_tokens = CaptionMode.TEXT, 0
        self._pending_name, self._after_newline = "", False
        if stage is Stage.FIELD_VALUE:
            value = self._spec.user_value(field)
            if value is not None:
                self._injection = deque(self._vocab.encode(f" {value}\n"))
        if self._debug:
            LOG.debug("FSM transition: %s -> %s%s", old, self.state_name,
                      f" (injecting {self._vocab.describe(list(self._injection), 64)})" if self._injection else "")
