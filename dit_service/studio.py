"""Pure math of the studio operations on the DiT (docs/studio.md): retake noise mixing, the
two-sided extend layout and its crossfade weights, and the flow-edit step schedule.

* Retake: an item's random draws are ``sum_k w_k * draw(seed_k)`` over its noise terms (the
  gateway computes the weights, ``cos(v*pi/2)`` and ``sin(v*pi/2)`` of ACE-Step v1's retake, with
  exact endpoints). A single term of weight 1 is the plain seeded draw, bit for bit.
* Extend: new frames before and after the source, generated as repaint spans; the kept middle
  is the source, blended at its two borders like the reference's repaint crossfade.
* Edit: the flow-matching edit (FlowEdit, as ACE-Step v1's ``edit`` task uses it) runs over a
  slice of the step schedule measured from the data end: ``edit_n_max`` is the fraction of
  steps (counted from the clean end) where editing starts, ``edit_n_min`` the fraction of final
  steps that sample the target normally. ``edit_n_max = 0`` leaves the source untouched.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shared.constants import LATENT_FRAMES_PER_SECOND

NoiseTerms = tuple[tuple[int, float], ...]
"""``((seed, weight), ...)`` of one item; empty: the item's own seed with weight 1."""

_FRACTION_EPS = 1e-9


def mix_draws(draws: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_k weights[k] * draws[k]`` (all ``[1, T, C]``), summed in order; terms of weight 0 are
    skipped and a lone term of weight 1 is returned as it is (so a retake with variance 0 or 1
    reproduces a plain draw exactly)."""
    if len(draws) != len(weights) or not draws:
        raise ValueError(f"mix_draws needs one weight per draw, got {len(draws)} draws and {len(weights)} weights")
    terms = [(draw, float(weight)) for draw, weight in zip(draws, weights) if weight != 0.0]
    if not terms:
        return torch.zeros_like(draws[0])
    if len(terms) == 1 and terms[0][1] == 1.0:
        return terms[0][0]
    total = terms[0][0] * terms[0][1]
    for draw, weight in terms[1:]:
        total = total + draw * weight
    return total


def seconds_to_frames(seconds: float) -> int:
    """Latent frames of ``seconds`` of new audio, rounded to the nearest frame (40 ms)."""
    return int(round(seconds * LATENT_FRAMES_PER_SECOND))


def extend_spans(num_src_frames: int, left_frames: int, right_frames: int) -> tuple[tuple[int, int], ...]:
    """The ``[start, end)`` spans to generate around a source of ``num_src_frames`` frames: the
    first ``left_frames`` and the last ``right_frames`` of the extended item."""
    spans = []
    if left_frames > 0:
        spans.append((0, left_frames))
    if right_frames > 0:
        end = left_frames + num_src_frames
        spans.append((end, end + right_frames))
    return tuple(spans)


def spans_mask(spans: Sequence[tuple[int, int]], num_frames: int) -> Tensor:
    """A ``[num_frames]`` bool mask, True inside the spans."""
    mask = torch.zeros(num_frames, dtype=torch.bool)
    for start, end in spans:
        mask[start:end] = True
    return mask


def soft_mask(mask: Tensor, num_frames: int) -> Tensor:
    """Crossfade weights ``[B, T]`` (1 = generated) for a bool ``mask [B, T]`` of any number of spans.

    Each kept frame within ``num_frames`` of a generated span gets the reference's linear ramp
    toward it: the ``n <= num_frames`` frames before a span ``linspace(0, 1, n + 2)[1:-1]``, those
    after it the mirror ramp; where two ramps meet, the larger weight wins. With one span per row
    this is the reference's repaint crossfade; rows that are all True or all False keep 0/1.
    """
    soft = mask.float().clone()  # [B, T]
    frames = mask.shape[1]
    for row_index, row in enumerate(mask.to(torch.bool)):
        if bool(row.all()) or not bool(row.any()):
            continue
        for start, end in _runs(row):
            fade_in = start - max(start - num_frames, 0)
            if fade_in > 0:
                ramp = torch.linspace(0, 1, fade_in + 2, device=soft.device)[1:-1]
                soft[row_index, start - fade_in : start] = torch.maximum(soft[row_index, start - fade_in : start], ramp)
            fade_out = min(end + num_frames, frames) - end
            if fade_out > 0:
                ramp = torch.linspace(1, 0, fade_out + 2, device=soft.device)[1:-1]
                soft[row_index, end : end + fade_out] = torch.maximum(soft[row_index, end : end + fade_out], ramp)
    return soft


def _runs(row: Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of True in a bool row ``[T]``."""
    padded = torch.cat([torch.zeros(1, dtype=torch.int8), row.to(torch.int8).cpu(), torch.zeros(1, dtype=torch.int8)])
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends))


class EditPhase(enum.Enum):
    SKIP = "skip"          # above the edited slice: the source stays as it is
    EDIT = "edit"          # the flow edit: x_edit moves by the target-minus-source velocity
    REGULAR = "regular"    # below it: plain sampling of the target from the noised edit


@dataclass(frozen=True)
class EditSchedule:
    """Which phase each of ``num_steps`` steps (index 0 = most noise) belongs to."""

    num_steps: int
    first_edit: int
    first_regular: int

    def phase(self, step_index: int) -> EditPhase:
        if step_index < self.first_edit:
            return EditPhase.SKIP
        return EditPhase.EDIT if step_index < self.first_regular else EditPhase.REGULAR


def edit_schedule(num_steps: int, n_min: float, n_max: float) -> EditSchedule:
    """``floor(N * n_max)`` steps from the clean end are edited, of which the last
    ``floor(N * n_min)`` sample the target normally (ACE-Step v1 counts ``int(N * n)`` steps from
    the noise end instead; see docs/studio.md for the correspondence)."""
    if not 0.0 <= n_min <= n_max <= 1.0:
        raise ValueError(f"edit slice needs 0 <= n_min <= n_max <= 1, got [{n_min}, {n_max}]")
    edited = math.floor(num_steps * n_max + _FRACTION_EPS)
    regular = math.floor(num_steps * n_min + _FRACTION_EPS)
    return EditSchedule(num_steps=num_steps, first_edit=num_steps - edited, first_regular=num_steps - regular)
