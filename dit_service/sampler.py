"""Flow-matching sampler of ACE-Step 1.5, kept separate from the model (diffusers' contract).

Convention: ``x_t = t * noise + (1 - t) * x0`` and the DiT predicts ``v = noise - x0``, so
``x0_hat = x_t - t * v`` and an Euler step is ``x_next = x_t - (t - t_next) * v``.

* turbo: steps ``0..N-2`` move to the next table value; the last step jumps to ``x0_hat``.
* base: every step moves to the next grid value, the last one to exactly 0.
* SDE: ``x_next = t_next * eps + (1 - t_next) * x0_hat`` with fresh ``eps`` supplied by the
  caller. Turbo re-noises on steps ``0..N-2`` to the next table value. Base re-noises on every step
  to ``1 - (k + 1) / N`` (the unshifted grid) although the model runs at shifted timesteps; that
  is the reference's behaviour and is reproduced here.

Timesteps are Python floats holding values of the model dtype (the reference builds its schedule
tensor in that dtype, so bf16 rounds them) and Euler step sizes are rounded to that dtype before
they multiply the velocity, as the reference's ``dt * ones(dtype)`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dit_service import schedules
from shared.errors import Internal, InvalidArgument

INFER_METHODS = ("ode", "sde")


@dataclass(frozen=True)
class SamplerSettings:
    """How to walk from noise to data (pure data).

    ``num_steps`` applies to base models only (turbo uses its fixed table); ``timesteps`` to turbo
    only (a custom descending list, snapped to the valid turbo values).
    """

    is_turbo: bool
    infer_method: str = "ode"
    shift: float = 3.0
    num_steps: int = 8
    timesteps: tuple[float, ...] | None = None

    def build(self, dtype: torch.dtype = torch.float32) -> FlowMatchSampler:
        """A sampler with its timesteps set from these settings, for latents of ``dtype``."""
        sampler = FlowMatchSampler(is_turbo=self.is_turbo, infer_method=self.infer_method, dtype=dtype)
        sampler.set_timesteps(num_steps=self.num_steps, shift=self.shift, timesteps=self.timesteps)
        return sampler


def predict_x0(sample: Tensor, velocity: Tensor, t: float) -> Tensor:
    """``x0_hat = x_t - t * v`` for ``sample``/``velocity [B, T, C]``."""
    return sample - velocity * t


def add_noise(x0: Tensor, eps: Tensor, t: float) -> Tensor:
    """``x_t = t * eps + (1 - t) * x0`` (the reference's ``renoise``)."""
    return t * eps + (1 - t) * x0


class FlowMatchSampler:
    """Euler ODE / re-noising SDE over a descending schedule; it holds only the schedule (``step`` is pure)."""

    def __init__(self, is_turbo: bool, infer_method: str = "ode", dtype: torch.dtype = torch.float32) -> None:
        if infer_method not in INFER_METHODS:
            raise InvalidArgument(
                f"infer_method must be one of {', '.join(INFER_METHODS)}, got {infer_method!r}", field="infer_method"
            )
        self.is_turbo = is_turbo
        self.infer_method = infer_method
        self.dtype = dtype
        self._levels: tuple[float, ...] = ()   # schedule as the reference picks cover-noise levels from it
        self._grid: tuple[float, ...] = ()     # evaluation timesteps (dtype values), plus the final 0 for base

    def set_timesteps(self, num_steps: int = 8, shift: float = 3.0, timesteps: Sequence[float] | None = None) -> None:
        """Build the schedule: turbo table / custom list, or the base linspace with shift."""
        if self.is_turbo:
            self._levels = schedules.turbo_timesteps(shift, timesteps)
            self._grid = schedules.round_to_dtype(self._levels, self.dtype)
        else:
            self._grid = schedules.base_timesteps(num_steps, shift, self.dtype)
            self._levels = self._grid[:-1]

    @property
    def timesteps(self) -> tuple[float, ...]:
        """The ``num_steps`` timesteps the model is evaluated at, in order."""
        return self._grid if self.is_turbo else self._grid[:-1]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def start_from_source(self, cover_noise_strength: float) -> float:
        """Drop the schedule's leading steps for a noised-source start; return that start level.

        The start is the scheduled timestep nearest to ``1 - cover_noise_strength``; the caller
        initialises ``x = add_noise(src, noise, level)``.
        """
        self._require_schedule()
        start = schedules.cover_noise_start(self._levels, cover_noise_strength)
        level = self._levels[start]
        self._levels, self._grid = self._levels[start:], self._grid[start:]
        return level

    def timestep(self, step_index: int) -> float:
        """Timestep of step ``step_index`` (a value of the sampler's dtype)."""
        return self.timesteps[step_index]

    def is_final_jump(self, step_index: int) -> bool:
        """True on turbo's last step, which returns ``x0_hat`` instead of moving along the path."""
        return self.is_turbo and step_index == self.num_steps - 1

    def needs_renoise(self, step_index: int) -> bool:
        """Whether ``step`` needs fresh ``eps`` for this step (SDE, except turbo's final jump)."""
        return self.infer_method == "sde" and not self.is_final_jump(step_index)

    def level_after(self, step_index: int) -> float | None:
        """Noise level of the sample ``step`` returns; None after turbo's final jump."""
        if self.is_final_jump(step_index):
            return None
        if self.infer_method == "sde" and not self.is_turbo:
            return 1.0 - float(step_index + 1) / self.num_steps
        return self._grid[step_index + 1]

    def step(self, velocity: Tensor, step_index: int, sample: Tensor, renoise: Tensor | None = None) -> Tensor:
        """Advance ``sample [B, T, C]`` by one step with ``velocity [B, T, C]``.

        ``renoise [B, T, C]`` is the fresh noise for SDE steps (see ``needs_renoise``).
        """
        self._require_schedule()
        t = self.timestep(step_index)
        t_next = self.level_after(step_index)
        if t_next is None:
            return predict_x0(sample, velocity, t)
        if self.infer_method == "ode":
            step_size = torch.tensor(t - t_next, dtype=sample.dtype, device=sample.device)
            return sample - velocity * step_size
        if renoise is None:
            raise Internal(f"SDE step {step_index} needs renoise noise")
        return add_noise(predict_x0(sample, velocity, t), renoise, t_next)

    def _require_schedule(self) -> None:
        if not self._grid:
            raise Internal("set_timesteps must be called before sampling")
