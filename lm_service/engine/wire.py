"""What a request carries to vLLM's engine process in ``SamplingParams.extra_args`` (pure data).

The frontend writes one entry under ``EXTRA_ARGS_KEY``; the scheduler (engine-core process) reads
it to create the unconditional twin of a guided request, and the logits processor (worker process)
reads it to find the rows of a pair and to sample. Everything in it is JSON-like so it survives
vLLM's msgpack serialization between processes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lm_service.engine.types import ConstraintRef, SamplingSettings

EXTRA_ARGS_KEY = "acestep_lm"
UNCOND_SUFFIX = "#uncond"


class RowRole(str, enum.Enum):
    """What a vLLM sequence is to its request."""

    SINGLE = "single"    # an unguided request: the only sequence
    COND = "cond"        # the conditional sequence of a guided pair (its output is returned)
    UNCOND = "uncond"    # the unconditional twin (created by the scheduler, never returned)


@dataclass(frozen=True)
class RowArgs:
    """The decoded ``extra_args`` entry of one sequence.

    ``key`` is unique per request and shared by the two sequences of a pair.
    ``uncond_prompt_token_ids`` is set on the conditional sequence only, for the scheduler.
    """

    key: str
    role: RowRole
    settings: SamplingSettings
    constraint: ConstraintRef | None = None
    uncond_prompt_token_ids: tuple[int, ...] | None = None

    def to_extra_args(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "key": self.key,
            "role": self.role.value,
            "settings": self.settings.to_wire(),
            "constraint": None if self.constraint is None else self.constraint.to_wire(),
        }
        if self.uncond_prompt_token_ids is not None:
            entry["uncond_prompt_token_ids"] = [int(t) for t in self.uncond_prompt_token_ids]
        return {EXTRA_ARGS_KEY: entry}

    def twin(self) -> "RowArgs":
        """The entry of the unconditional sequence of this (conditional) sequence."""
        if self.role is not RowRole.COND:
            raise ValueError(f"only a conditional sequence has a twin, not a {self.role.value} one")
        return RowArgs(key=self.key, role=RowRole.UNCOND, settings=self.settings, constraint=self.constraint)


def read_row_args(extra_args: Mapping[str, Any] | None) -> RowArgs | None:
    """The entry in a sequence's ``extra_args``; None for sequences this engine did not tag."""
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return None
    entry = extra_args[EXTRA_ARGS_KEY]
    constraint = entry.get("constraint")
    uncond = entry.get("uncond_prompt_token_ids")
    return RowArgs(
        key=str(entry["key"]),
        role=RowRole(entry["role"]),
        settings=SamplingSettings.from_wire(entry["settings"]),
        constraint=None if constraint is None else ConstraintRef.from_wire(constraint),
        uncond_prompt_token_ids=None if uncond is None else tuple(int(t) for t in uncond),
    )


def twin_request_id(cond_request_id: str) -> str:
    """The engine-internal id of the unconditional twin of ``cond_request_id``."""
    return cond_request_id + UNCOND_SUFFIX
