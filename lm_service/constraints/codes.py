"""The audio-code constraint (reference-lm.md section 4.3.11).

In the codes state only valid audio codes (``<|audio_code_0|>`` .. ``<|audio_code_63999|>``) and EOS
may be sampled. With a target, EOS is blocked until ``target_codes`` tokens have been generated in
this state; from then on only EOS is allowed, so the sequence holds exactly ``target_codes`` codes.
Without a target EOS is allowed at any time and the model decides the length.
"""

from __future__ import annotations

import logging

import torch

from lm_service.constraints.masking import NEG_INF, TokenWindow, block_padding, code_windows, keep_only
from lm_service.constraints.vocab import ConstraintVocab

LOG = logging.getLogger("lm_service.constraints")


def log_allowed(vocab: ConstraintVocab, where: str, logits: torch.Tensor) -> None:
    """Debug log of the ids left finite in ``logits`` ([V])."""
    finite = torch.isfinite(logits)  # [V]
    shown = finite.nonzero()[:8].flatten().tolist()
    more = int(finite.sum()) - len(shown)
    LOG.debug("%s: %d allowed: %s%s", where, len(shown) + more, vocab.describe(shown),
              f" (+{more} more)" if more else "")


class CodesConstraint:
    """Audio codes then EOS; exactly ``target_codes`` codes when a target is given."""

    def __init__(self, vocab: ConstraintVocab, target_codes: int | None, debug: bool = False) -> None:
        self._vocab = vocab
        self._target_codes = target_codes
        self._debug = debug
        self._num_generated = 0
        self._finished = False
        if debug:
            LOG.debug("codes state entered: target_codes=%s", target_codes)

    @property
    def is_finished(self) -> bool:
        return self._finished

    @property
    def num_generated(self) -> int:
        """Tokens generated in the codes state so far (EOS not counted)."""
        return self._num_generated

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask ``logits`` ([V]) in place to the codes allowed at this step."""
        vocab, target = self._vocab, self._target_codes
        block_padding(logits, vocab.num_tokens)
        if self._finished or (target is not None and self._num_generated >= target):
            keep_only(logits, vocab.on(vocab.eos, logits.device))
            eos = "forced"
        else:
            eos_logit = logits[vocab.eos_id].clone()
            logits[: vocab.code_start_id] = NEG_INF
            logits[vocab.code_end_id:] = NEG_INF
            if target is None:
                logits[vocab.eos_id] = eos_logit
            eos = "allowed" if target is None else "blocked"
        if self._debug:
            LOG.debug("codes %d/%s: audio codes %s, EOS %s", self._num_generated, target,
                      "blocked" if eos == "forced" else "allowed", eos)
        return logits

    def allowed_window(self) -> TokenWindow | None:
        """The tokens ``mask_logits`` allows at this step, as a window over the codes and EOS
        (None with debug logging on, so that ``mask_logits`` runs and logs every step)."""
        if self._debug:
            return None
        vocab, target = self._vocab, self._target_codes
        windows = code_windows(vocab.code_start_id, vocab.code_end_id, vocab.eos_id)
        if self._finished or (target is not None and self._num_generated >= target):
            return windows.eos_only
        return windows.codes_or_eos if target is None else windows.codes_only

    def advance(self, token_id: int) -> None:
        """Count a generated code; a stop token finishes the sequence."""
        if self._finished:
            return
        if token_id in self._vocab.stop_ids:
            self._finished = True
            if self._debug:
                LOG.debug("codes finished after %d codes", self._num_generated)
            return
        self._num_generated += 1
