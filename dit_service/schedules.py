"""Timestep schedules of the ACE-Step 1.5 flow-matching samplers.

Time runs from ``t = 1`` (pure noise) down to ``t = 0`` (data). Two families exist:

* turbo: a fixed 8-entry table per shift in {1, 2, 3} (final 0 excluded), or a custom list of up
  to 20 values each snapped to the 20 distinct table values;
* base / sft: ``linspace(1, 0, N + 1)``, then ``shift * t / (1 + (shift - 1) * t)``, evaluated in
  model-dtype tensor arithmetic (final 0 included).

Turbo tables are returned in Python doubles exactly as the reference lists them; base schedules
as the values the reference computes in the model dtype. ``round_to_dtype`` gives the values the
model is evaluated at (the reference builds a schedule tensor in the model dtype and reads it back
with ``.item()``), so step sizes taken as Python differences round the same way as the reference's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared.errors import InvalidArgument

VALID_SHIFTS: tuple[float, ...] = (1.0, 2.0, 3.0)
TURBO_NUM_STEPS = 8
MAX_CUSTOM_TIMESTEPS = 20

# s * u / (1 + (s - 1) * u) at u = 1 - i/8, i = 0..7, written out as the reference lists them.
TURBO_SHIFT_TABLES: dict[float, tuple[float, ...]] = {
    1.0: (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125),
    2.0: (1.0, 0.9333333333333333, 0.8571428571428571, 0.7692307692307693, 0.6666666666666666,
          0.5454545454545454, 0.4, 0.2222222222222222),
    3.0: (1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3),
}

# The 20 distinct values of the three tables, in the order used to break snapping ties.
VALID_TIMESTEPS: tuple[float, ...] = (
    1.0, 0.9545454545454546, 0.9333333333333333, 0.9, 0.875,
    0.8571428571428571, 0.8333333333333334, 0.7692307692307693, 0.75,
    0.6666666666666666, 0.6428571428571429, 0.625, 0.5454545454545454,
    0.5, 0.4, 0.375, 0.3, 0.25, 0.2222222222222222, 0.125,
)


def nearest(values: Sequence[float], target: float) -> float:
    """The entry of ``values`` closest to ``target``; the first one in order on ties."""
    return min(values, key=lambda value: abs(value - target))


def snap_shift(shift: float) -> float:
    """Nearest supported turbo shift (1, 2 or 3); ties go to the smaller one."""
    if not shift > 0:
        raise InvalidArgument(f"shift must be > 0, got {shift!r}", field="shift")
    return nearest(VALID_SHIFTS, shift)


def snap_custom_timesteps(timesteps: Sequence[float]) -> tuple[float, ...] | None:
    """Turbo custom timesteps as the reference maps them, or None when nothing is left.

    Exact trailing zeros are removed, the list is truncated to 20 entries and every value is
    snapped to the nearest of ``VALID_TIMESTEPS``. The order of the values is kept as given.
    """
    values = [float(t) for t in timesteps]
    while values and values[-1] == 0:
        values.pop()
    if not values:
        return None
    return tuple(nearest(VALID_TIMESTEPS, t) for t in values[:MAX_CUSTOM_TIMESTEPS])


def round_to_dtype(values: Sequence[float], dtype: torch.dtype = torch.float32) -> tuple[float, ...]:
    """Round-trip through a ``dtype`` tensor, as the reference's schedule tensor (model dtype) does."""
    return tuple(torch.tensor(list(values), dtype=dtype).tolist())


def turbo_timesteps(shift: float, timesteps: Sequence[float] | None = None) -> tuple[float, ...]:
    """The turbo schedule (final 0 excluded) as the reference lists it, in Python doubles.

    ``timesteps``, when given and non-empty after stripping trailing zeros, replaces the shift
    table (see ``snap_custom_timesteps``); otherwise the shift is snapped to {1, 2, 3}. The model
    is evaluated at ``round_to_dtype`` of these values; the cover-noise start level uses them as is.
    """
    custom = snap_custom_timesteps(timesteps) if timesteps is not None else None
    return custom if custom is not None else TURBO_SHIFT_TABLES[snap_shift(shift)]


def cover_noise_start(levels: Sequence[float], cover_noise_strength: float) -> int:
    """Index of the level nearest to ``1 - cover_noise_strength`` (first on ties).

    ``cover_noise_strength = 1`` means "closest to the source", i.e. the lowest noise level.
    """
    if not 0.0 < cover_noise_strength <= 1.0:
        raise InvalidArgument(
            f"cover_noise_strength must be in (0, 1], got {cover_noise_strength!r}", field="cover_noise_strength"
        )
    return list(levels).index(nearest(levels, 1.0 - cover_noise_strength))


def base_timesteps(num_steps: int, shift: float, dtype: torch.dtype = torch.float32) -> tuple[float, ...]:
    """``num_steps + 1`` values from 1 down to exactly 0, shifted when ``shift != 1``.

    Reproduces ``t = linspace(1, 0, N + 1)`` followed by ``shift * t / (1 + (shift - 1) * t)``
    in ``dtype`` tensor arithmetic (the model dtype: bf16 rounds the timesteps).
    """
    if num_steps < 1:
        raise InvalidArgument(f"num_steps must be >= 1, got {num_steps}", field="num_steps")
    if not shift > 0:
        raise InvalidArgument(f"shift must be > 0, got {shift!r}", field="shift")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)  # [N + 1]
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)  # [N + 1]
    return tuple(t.tolist())
