"""Constrained decoding of the 5 Hz LM: the CoT metadata state machine and the audio-code phase.

Build one ``ConstraintVocab`` per tokenizer at load time, then one constraint per sequence::

    vocab = ConstraintVocab.from_tokenizer(tokenizer, max_duration_s=600)
    constraint = build_constraint(vocab, ConstraintSpec(phase="cot", stop_at_reasoning=True), prompt_ids)
    while not constraint.is_finished:
        logits = constraint.mask_logits(cfg_logits)   # [V], after CFG, before temperature/top-k/top-p
        token = sample(logits)
        constraint.advance(token)
"""

from __future__ import annotations

from typing import Sequence

from lm_service.constraints.codes import CodesConstraint
from lm_service.constraints.metadata_fsm import CAPTION_TOKEN_LIMIT, MetadataConstraint
from lm_service.constraints.spec import FIELD_ORDER, ConstraintSpec, Phase, TokenConstraint
from lm_service.constraints.vocab import ConstraintVocab

__all__ = [
    "CAPTION_TOKEN_LIMIT",
    "FIELD_ORDER",
    "CodesConstraint",
    "ConstraintSpec",
    "ConstraintVocab",
    "MetadataConstraint",
    "Phase",
    "TokenConstraint",
    "build_constraint",
]


def build_constraint(
    vocab: ConstraintVocab, spec: ConstraintSpec, prompt_token_ids: Sequence[int]
) -> TokenConstraint:
    """The constraint for one sequence.

    In the codes phase a prompt that already holds the tokens of ``</think>`` (the phase-2 prompt)
    starts directly in the codes state; any other prompt starts the metadata state machine, which
    enters the codes state after its own ``</think>`` (reference-lm.md section 4.3.11).
    """
    if spec.phase == "codes" and _contains(prompt_token_ids, vocab.think_end_ids):
        return CodesConstraint(vocab, spec.target_codes, spec.debug)
    return MetadataConstraint(vocab, spec)


def _contains(haystack: Sequence[int], needle: Sequence[int]) -> bool:
    ids, pattern = list(haystack), list(needle)
    if not pattern:
        return False
    first, width = pattern[0], len(pattern)
    return any(ids[i:i + width] == pattern for i, token in enumerate(ids) if token == first)
