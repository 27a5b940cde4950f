"""The edit loop: a flow-matching edit of source latents from the source conditions to the target ones.

The idea is ACE-Step v1's ``edit`` task (FlowEdit): instead of inverting the source, each edited
step noises the clean source to the step's level with fresh noise, ``z_src = t * eps + (1 - t) *
x_src``, shifts it by the edit so far, ``z_tar = z_src + (x_edit - x_src)``, and moves the edit
by the difference of the two velocities, ``x_edit -= (t - t_next) * (v(z_tar | target) -
v(z_src | source))`` (the sampler's ODE step). Where the conditions agree the difference is
exactly zero, so an unchanged caption and lyrics leave the source as it is. Steps above the
edited slice are skipped; the final ``n_min`` part samples the target normally from the
edited latents noised to that level (``dit_service.studio.edit_schedule``).

Both branches see the text2music context (silence source, full mask): the edit acts through the
caption and lyrics only. Each branch has its own APG momentum under CFG.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dit_service.denoise import (
    LATENT_CHANNELS,
    Conditions,
    DenoiseInputs,
    DenoiseModel,
    Randomness,
    activate,
    guided_velocity,
)
from dit_service.guidance import MomentumBuffer
from dit_service.sampler import add_noise
from dit_service.studio import EditPhase, edit_schedule
from shared.errors import Cancelled, InvalidArgument


@dataclass(frozen=True)
class EditInputs:
    """One edit batch: ``source`` holds the source conditions, sampling, guidance and randomness
    (seeds, noise mix); ``target`` the target conditions; ``src_latents [B, T, 64]`` the clean source."""

    source: DenoiseInputs
    target: Conditions
    src_latents: Tensor
    n_min: float = 0.0
    n_max: float = 1.0


@torch.no_grad()
def flow_edit(
    model: DenoiseModel,
    request: EditInputs,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Tensor:
    """Edited latents ``[B, T, 64]``; ``on_step``/``should_stop`` as for ``denoise``."""
    inputs = request.source
    x_src = request.src_latents
    if tuple(x_src.shape) != (*inputs.conditions.context_latents.shape[:2], LATENT_CHANNELS):
        raise InvalidArgument(f"src_latents must be [B, T, {LATENT_CHANNELS}] like the conditions, got "
                              f"{list(x_src.shape)}", field="src_latents")
    if inputs.seeds is None and inputs.eps_source is None:
        raise InvalidArgument("editing draws fresh noise every step: give seeds or an eps_source", field="seeds")
    inputs.guidance.validate()
    sampler = inputs.sampling.build(x_src.dtype)
    ode = dataclasses.replace(inputs.sampling, infer_method="ode").build(x_src.dtype)
    schedule = edit_schedule(sampler.num_steps, request.n_min, request.n_max)
    randomness = Randomness(inputs, tuple(x_src.shape), x_src.dtype, x_src.device)
    source = activate(model, inputs.conditions, inputs.guidance)
    target = activate(model, request.target, inputs.guidance)
    momentum_src, momentum_tar = MomentumBuffer(), MomentumBuffer()
    edited, x = x_src, None
    for step_index in range(sampler.num_steps):
        if should_stop is not None and should_stop():
            raise Cancelled(f"editing cancelled before step {step_index + 1} of {sampler.num_steps}")
        phase, t = schedule.phase(step_index), sampler.timestep(step_index)
        if phase is EditPhase.EDIT:
            z_src = add_noise(x_src, randomness.draw(), t)  # [B, T, 64]
            z_tar = z_src + (edited - x_src)
            v_tar = guided_velocity(model, target, z_tar, t, inputs.guidance, momentum_tar, step_index)
            v_src = guided_velocity(model, source, z_src, t, inputs.guidance, momentum_src, step_index)
            edited = ode.step(v_tar - v_src, step_index, edited)
        elif phase is EditPhase.REGULAR:
            if x is None:
                x = add_noise(x_src, randomness.draw(), t) + (edited - x_src)
            velocity = guided_velocity(model, target, x, t, inputs.guidance, momentum_tar, step_index)
            eps = randomness.draw() if sampler.needs_renoise(step_index) else None
            x = sampler.step(velocity, step_index, x, renoise=eps)
        if on_step is not None:
            on_step(step_index, sampler.num_steps)
    return edited if x is None else x
