"""Per-generation configuration of the constrained decoder and the interface every constraint has.

A ``ConstraintSpec`` is pure data (it crosses process boundaries); ``build_constraint`` turns it into
a stateful ``TokenConstraint`` for one sequence. Field names and the ``phase`` values follow the
reference processor's per-generation setters (reference-lm.md section 4.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Protocol, Union

import torch

from shared.errors import InvalidArgument

Phase = Literal["cot", "codes", "understand"]
PHASES: tuple[str, ...] = ("cot", "codes", "understand")

# Order in which the CoT block lists its fields (the training data was YAML with sorted keys).
FIELD_ORDER: tuple[str, ...] = ("bpm", "caption", "duration", "genres", "keyscale", "language", "timesignature")

MetadataValue = Union[str, int, float]


@dataclass(frozen=True)
class ConstraintSpec:
    """What one generation is allowed to write.

    ``phase``: ``"cot"`` (text2music phase 1), ``"codes"`` (phase 2) or ``"understand"`` (understand,
    create_sample, format_sample). ``stop_at_reasoning``: end with EOS where ``</think>`` would come
    (phase 1). ``skip_*``: leave that field out of the CoT. ``user_metadata``: values written verbatim
    instead of sampled (keys from ``FIELD_ORDER``; ``None`` values mean "not given"); each is forced
    as the tokens of ``f" {value}\\n"``. ``target_codes``: in the codes state allow exactly this many
    audio codes, then only EOS (``None``: EOS allowed at any time). As in the reference, a target
    also forces the CoT ``duration`` digits to ``target_codes // 5`` when a metadata block is
    generated with it (never the case on the shipped paths, which leave it ``None`` outside the
    codes phase). ``strict``: the tightened CoT rules of ``metadata_fsm`` instead of the reference's
    (``--lm-strict-cot``). ``debug``: log every transition and allowed-token choice.
    """

    phase: Phase = "cot"
    stop_at_reasoning: bool = False
    skip_genres: bool = True
    skip_caption: bool = False
    skip_language: bool = False
    user_metadata: Mapping[str, MetadataValue | None] = field(default_factory=dict)
    target_codes: int | None = None
    strict: bool = False
    debug: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise InvalidArgument(f"phase must be one of {list(PHASES)}, got {self.phase!r}", field="phase")
        unknown = sorted(set(self.user_metadata) - set(FIELD_ORDER))
        if unknown:
            raise InvalidArgument(
                f"user_metadata has unknown fields {unknown}; expected a subset of {list(FIELD_ORDER)}",
                field="user_metadata",
            )
        if self.target_codes is not None and self.target_codes < 0:
            raise InvalidArgument(f"target_codes must be >= 0 or None, got {self.target_codes}", field="target_codes")

    def is_skipped(self, name: str) -> bool:
        """Whether field ``name`` is left out of the CoT block (bpm, duration, keyscale and
        timesignature never are)."""
        return {"genres": self.skip_genres, "caption": self.skip_caption, "language": self.skip_language}.get(
            name, False
        )

    def user_value(self, name: str) -> str | None:
        """The user's value for ``name`` as the text that is injected (``None`` when not given)."""
        value = self.user_metadata.get(name)
        return None if value is None else str(value)


class TokenConstraint(Protocol):
    """Stateful per-sequence constraint: mask, sample outside, then advance with the sampled id."""

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Set disallowed ids of ``logits`` ([V] float32, CFG-combined) to -inf and return it."""
        ...

    def advance(self, token_id: int) -> None:
        """Record the token that was sampled from the last masked logits."""
        ...

    @property
    def is_finished(self) -> bool:
        """True once a stop token (EOS) has been advanced."""
        ...
