"""Per-request decoding state: one guided, constrained, seeded token per step (both backends).

``GuidedDecoder.next_token`` takes the raw logits of the conditional row (and the unconditional
row when guidance is on) plus the tokens generated so far, and runs the ``sampling`` pipeline.

The decoder holds no step counter: the step is ``len(output_token_ids)``, the constraint is caught
up with the tokens it has not seen yet, and the random number of a step depends only on
``(seed, step)``. So a decoder that is dropped and rebuilt (vLLM drops a request from its batch
when it is preempted) continues exactly where the old one was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lm_service.engine.constraint_hook import TokenConstraint
from lm_service.engine.sampling import (
    apply_repetition_penalty,
    cfg_combine,
    has_allowed_token,
    pick_token,
    step_uniform,
)
from lm_service.engine.types import SamplingSettings

ConstraintFactory = Callable[[], TokenConstraint]


class GuidedDecoder:
    """Picks the next token of one request.

    Args:
        settings: sampling settings (with the resolved seed).
        prompt_token_ids: the conditional prompt (the repetition penalty also covers it).
        constraint_factory: builds the request's constraint in its initial state; None: no constraint.
    """

    def __init__(
        self,
        settings: SamplingSettings,
        prompt_token_ids: Sequence[int],
        constraint_factory: ConstraintFactory | None = None,
    ) -> None:
        self.settings = settings
        self._prompt_token_ids = list(prompt_token_ids)
        self._constraint_factory = constraint_factory
        self._constraint: TokenConstraint | None = None
        self._num_advanced = 0

    @property
    def uses_guidance(self) -> bool:
        return self.settings.cfg_scale > 1.0

    def next_token(
        self,
        cond_logits: torch.Tensor,
        uncond_logits: torch.Tensor | None,
        output_token_ids: Sequence[int],
    ) -> int:
        """The token for step ``len(output_token_ids)``.

        Args:
            cond_logits: ``[V]`` raw logits of the conditional stream.
            uncond_logits: ``[V]`` raw logits of the unconditional stream; required when guided.
            output_token_ids: every token generated so far (identical in both streams).
        """
        settings = self.settings
        if self.uses_guidance:
            if uncond_logits is None:
                raise ValueError("a guided request needs the unconditional logits")
            logits = cfg_combine(cond_logits, uncond_logits, settings.cfg_scale)  # [V]
        else:
            logits = cond_logits.to(torch.float32)  # [V]
        constraint = self._synced_constraint(output_token_ids)
        if constraint is not None:
            if constraint.is_finished:
                return self._stop_token()
            logits = constraint.mask_logits(logits.clone())  # [V]
            if not has_allowed_token(logits):
                return self._stop_token()
        if settings.repetition_penalty != 1.0:
            history = self._prompt_token_ids + list(output_token_ids)
            logits = apply_repetition_penalty(logits, history, settings.repetition_penalty)  # [V]
        uniform = 0.0 if settings.is_greedy else step_uniform(settings.seed, len(output_token_ids))
        return pick_token(logits, settings.temperature, settings.top_k, settings.top_p, uniform)

    def _synced_constraint(self, output_token_ids: Sequence[int]) -> TokenConstraint | None:
        """The constraint, advanced over every generated token it has not seen yet."""
        if self._constraint_factory is None:
            return None
        if self._constraint is None or self._num_advanced > len(output_token_ids):
            self._constraint = self._constraint_factory()
            self._num_advanced = 0
        for token_id in output_token_ids[self._num_advanced:]:
            self._constraint.advance(int(token_id))
        self._num_advanced = len(output_token_ids)
        return self._constraint

    def _stop_token(self) -> int:
        if not self.settings.stop_token_ids:
            raise ValueError("the constraint ended the output but the request has no stop token")
        return self.settings.stop_token_ids[0]
