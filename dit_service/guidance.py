"""Classifier-free guidance for the base DiT: batch doubling, APG and ADG (pure tensor functions).

The conditional and unconditional passes run as one doubled batch: ``[x ; x]`` with encoder
states ``[enc ; null_condition_emb broadcast to enc's shape]`` and the context duplicated. The
output splits into ``(v_cond, v_uncond)``, which one of the rules below combines:

* APG (the reference default): momentum-averaged difference, L2-clipped over the time axis, and
  only its component orthogonal to ``v_cond`` (computed in float64) is added.
* ADG: angle-based guidance on the clean-sample estimates ``x - t * v``, per frame over the
  channels, with the angle clipped to ``3.14 / 6`` (the reference's literal, not pi).
* ``cfg_type`` "cfg" and "cfg_star" (ACE-Step v1's other two rules, kept for its users): plain
  CFG ``u + s * (c - u)``, and CFG-Zero* (the unconditional velocity rescaled by the per-item
  projection ``<c, u> / |u|^2``, with a zero velocity on steps 0 and 1 as v1's ``zero_steps=1``).

Guidance applies only while ``interval_start <= t <= interval_end``; elsewhere ``v = v_cond``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.errors import InvalidArgument

APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 2.5
APG_ETA = 0.0
ADG_ANGLE_CLIP = 3.14 / 6
_ADG_COS_MARGIN = 1e-6
_ADG_MIN_SIN = 1e-3
_ADG_WEIGHT_FLOOR = 1e-3
_PROJECTION_EPS = 1e-8
CFG_TYPES = ("apg", "cfg", "cfg_star")
CFG_STAR_ZERO_STEPS = 1        # v1: steps with index <= zero_steps return a zero velocity
_CFG_STAR_EPS = 1e-8


@dataclass(frozen=True)
class GuidanceSettings:
    """CFG settings of one request (pure data). ``scale <= 1`` disables CFG entirely."""

    scale: float = 1.0
    use_adg: bool = False
    interval_start: float = 0.0
    interval_end: float = 1.0
    cfg_type: str = "apg"         # ignored when use_adg

    @property
    def is_enabled(self) -> bool:
        """Whether the doubled conditional/unconditional batch runs at all."""
        return self.scale > 1.0

    def applies_at(self, t: float, dtype: torch.dtype = torch.float32) -> bool:
        """``interval_start <= t <= interval_end``, compared in ``dtype`` like the reference's
        model-dtype timestep tensor (the bounds are rounded to it too)."""
        t_tensor = torch.tensor(t, dtype=dtype)
        return bool((t_tensor >= self.interval_start) & (t_tensor <= self.interval_end))

    def validate(self) -> None:
        if self.cfg_type not in CFG_TYPES:
            raise InvalidArgument(f"cfg_type must be one of {', '.join(CFG_TYPES)}, got {self.cfg_type!r}",
                                  field="cfg_type")
        if not self.interval_start <= self.interval_end:
            raise InvalidArgument(
                f"cfg interval start must be <= end, got [{self.interval_start}, {self.interval_end}]",
                field="cfg_interval_start",
            )


class MomentumBuffer:
    """APG's running difference: ``avg = value + momentum * avg``, starting from 0, one per request."""

    def __init__(self, momentum: float = APG_MOMENTUM) -> None:
        self.momentum = momentum
        self.running: Tensor | None = None

    def update(self, value: Tensor) -> Tensor:
        """Fold ``value`` in and return the new running average."""
        self.running = value if self.running is None else value + self.momentum * self.running
        return self.running


def double_conditions(
    encoder_hidden_states: Tensor, context_latents: Tensor, null_condition_emb: Tensor
) -> tuple[Tensor, Tensor]:
    """``([enc ; null], [ctx ; ctx])`` for the doubled batch; null is ``[1, 1, D]`` broadcast to enc."""
    null = null_condition_emb.to(encoder_hidden_states.dtype).expand_as(encoder_hidden_states)  # [B, L, D]
    encoder = torch.cat([encoder_hidden_states, null], dim=0)  # [2B, L, D]
    context = torch.cat([context_latents, context_latents], dim=0)  # [2B, T, 128]
    return encoder, context


def double_batch(x: Tensor) -> Tensor:
    """``[x ; x]`` along the batch axis."""
    return torch.cat([x, x], dim=0)


def split_cfg(velocity: Tensor) -> tuple[Tensor, Tensor]:
    """``(v_cond, v_uncond)`` halves of a doubled-batch output ``[2B, T, C]``."""
    cond, uncond = velocity.chunk(2)
    return cond, uncond


def project(value: Tensor, direction: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Parts of ``value`` parallel and orthogonal to ``direction`` over ``dim``, computed in float64."""
    v0, v1 = value.double(), F.normalize(direction.double(), dim=dim)
    parallel = (v0 * v1).sum(dim=dim, keepdim=True) * v1
    orthogonal = v0 - parallel
    return parallel.to(value.dtype), orthogonal.to(value.dtype)


def apg(
    cond: Tensor,
    uncond: Tensor,
    scale: float,
    momentum: MomentumBuffer | None,
    norm_threshold: float = APG_NORM_THRESHOLD,
    eta: float = APG_ETA,
    dim: int = 1,
) -> Tensor:
    """Adaptive projected guidance on velocities ``[B, T, C]`` (``dim=1``: the time axis)."""
    diff = cond - uncond
    if momentum is not None:
        diff = momentum.update(diff)
    if norm_threshold > 0:
        diff_norm = diff.norm(p=2, dim=dim, keepdim=True)  # [B, 1, C]
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / diff_norm)
    parallel, orthogonal = project(diff, cond, dim)
    return cond + (scale - 1) * (orthogonal + eta * parallel)


def adg(
    sample: Tensor, cond: Tensor, uncond: Tensor, sigma: float, scale: float, angle_clip: float = ADG_ANGLE_CLIP
) -> Tensor:
    """Angle-based guidance for ``sample``/velocities ``[B, T, C]`` at noise level ``sigma > 0``.

    Rotates the conditional clean estimate away from the unconditional one by ``w * angle``
    (``w = max(scale - 1, 0) + 1e-3``, clipped to ``angle_clip``), per frame, and converts back
    to a velocity. Angles are computed in float64 and the result is cast to ``sample``'s dtype.
    """
    batch, frames, channels = cond.shape
    weight = max(scale - 1, 0.0) + _ADG_WEIGHT_FLOOR
    sigma_t = torch.tensor(sigma, dtype=sample.dtype, device=sample.device)
    x0_cond = sample - sigma_t * cond  # [B, T, C]
    x0_uncond = sample - sigma_t * uncond
    a = x0_cond.reshape(-1, channels).double()  # [B*T, C]
    b = x0_uncond.reshape(-1, channels).double()
    cos = (a / a.norm(dim=1, keepdim=True) * (b / b.norm(dim=1, keepdim=True))).sum(dim=1, keepdim=True)
    theta = torch.acos(cos.clamp(-1 + _ADG_COS_MARGIN, 1 - _ADG_COS_MARGIN)).view(batch, frames, 1)  # [B, T, 1]
    theta_new = torch.clip(weight * theta, -angle_clip, angle_clip)
    perp = _perpendicular(x0_cond - x0_uncond, x0_uncond)  # [B, T, C]
    sin_theta = torch.sin(theta)
    rotated = torch.where(sin_theta > _ADG_MIN_SIN, perp * torch.sin(theta_new) / sin_theta, perp * weight)
    x0_new = torch.cos(theta_new) * x0_cond + rotated  # [B, T, C] float64
    return ((sample - x0_new) / sigma_t).to(sample.dtype)


def _perpendicular(diff: Tensor, base: Tensor) -> Tensor:
    """Component of ``diff`` orthogonal to ``base`` per frame over channels, in float32."""
    d, u = diff.float(), base.float()
    dot = (d * u).sum(dim=-1, keepdim=True)  # [B, T, 1]
    norm_sq = (u * u).sum(dim=-1, keepdim=True)
    return d - dot / (norm_sq + _PROJECTION_EPS) * u


def cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Plain classifier-free guidance ``u + s * (c - u)``."""
    return uncond + scale * (cond - uncond)


def cfg_star(cond: Tensor, uncond: Tensor, scale: float, step_index: int,
             zero_steps: int = CFG_STAR_ZERO_STEPS) -> Tensor:
    """CFG-Zero* on velocities ``[B, T, C]``: ``a * u + s * (c - a * u)`` with the per-item
    ``a = <c, u> / (|u|^2 + 1e-8)`` over all of an item's values; zero on steps ``<= zero_steps``."""
    if step_index <= zero_steps:
        return cond * 0.0
    batch = cond.shape[0]
    flat_cond, flat_uncond = cond.reshape(batch, -1), uncond.reshape(batch, -1)
    alpha = (flat_cond * flat_uncond).sum(dim=1) / ((flat_uncond ** 2).sum(dim=1) + _CFG_STAR_EPS)  # [B]
    alpha = alpha.view(batch, *([1] * (cond.dim() - 1)))
    return uncond * alpha + scale * (cond - uncond * alpha)


def guide(
    doubled_velocity: Tensor, sample: Tensor, t: float, settings: GuidanceSettings, momentum: MomentumBuffer,
    step_index: int = 0,
) -> Tensor:
    """Combine a doubled-batch output ``[2B, T, C]`` into the guided velocity ``[B, T, C]`` at ``t``
    (``step_index``: the step's 0-based index, for CFG-Zero*'s zero start).

    Outside the cfg interval the conditional half is returned and the momentum is left untouched.
    """
    cond, uncond = split_cfg(doubled_velocity)
    if not settings.applies_at(t, sample.dtype):
        return cond
    if settings.use_adg:
        return adg(sample, cond, uncond, t, settings.scale)
    if settings.cfg_type == "cfg":
        return cfg(cond, uncond, settings.scale)
    if settings.cfg_type == "cfg_star":
        return cfg_star(cond, uncond, settings.scale, step_index)
    return apg(cond, uncond, settings.scale, momentum)
