"""The DiT denoising loop: noise -> latents for one batch of prepared conditions.

``denoise`` walks a ``FlowMatchSampler`` schedule, calling the decoder once per step (on a doubled
batch when CFG is on), guiding the velocity (APG / ADG), and reproducing the reference's task
extras: the cover-to-text2music condition switch (``audio_cover_strength``), the noised-source
start (``cover_noise_strength``) and repaint injection plus boundary crossfade.

Randomness is per item: item ``b``'s initial noise is ``randn((1, T, 64))`` from
``torch.Generator(device).manual_seed(seeds[b])`` (exactly the reference's draw), and the same
generator then supplies that item's SDE noise, so an item's result does not depend on what else
shares its batch. A retake item mixes several seeded generators instead (``noise_mix``, see
``dit_service.studio``). Tests inject recorded draws through ``noise`` and ``eps_source``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from dit_service.guidance import GuidanceSettings, MomentumBuffer, double_batch, double_conditions, guide
from dit_service.sampler import SamplerSettings, add_noise
from dit_service.studio import NoiseTerms, mix_draws, soft_mask
from shared.errors import Cancelled, InvalidArgument

LATENT_CHANNELS = 64


class DenoiseModel(Protocol):
    """What ``denoise`` uses of the model: its decoder and the CFG null embedding ``[1, 1, D_enc]``.

    ``decoder(x, t, r, encoder_hidden_states, context_latents, cross_kv=...)`` returns the velocity;
    when the decoder has ``precompute_cross_kv(encoder_hidden_states)``, its result is computed
    once per condition set and passed to every step.
    """

    decoder: Any
    null_condition_emb: Tensor


EpsSource = Callable[[int, tuple[int, ...]], Tensor]
"""``(draw_index, shape [B, T, 64]) -> eps``: the fresh noise of the ``draw_index``-th SDE re-noise."""


@dataclass(frozen=True)
class Conditions:
    """One condition set from ``prepare_condition`` (the DiT ignores the encoder mask)."""

    encoder_hidden_states: Tensor  # [B, L, D_enc]
    context_latents: Tensor  # [B, T, 128]: source latents, then chunk mask


@dataclass(frozen=True)
class RepaintPlan:
    """Repaint refinement: ``mask [B, T]`` is True where new audio is generated."""

    mask: Tensor  # [B, T] bool
    clean_latents: Tensor  # [B, T, 64]: the source latents outside (and inside) the span
    injection_ratio: float = 0.5
    crossfade_frames: int = 10


@dataclass(frozen=True)
class DenoiseInputs:
    """Everything one ``denoise`` call needs besides the model.

    Give ``noise [B, T, 64]`` or ``seeds`` (one non-negative int per item); an SDE sampler needs
    ``seeds`` or an ``eps_source``. ``noise_mix`` (one entry per item, ``()`` for a plain item)
    makes an item's draws a weighted sum of several seeds' draws. ``non_cover`` is required when
    ``audio_cover_strength < 1``; ``src_latents [B, T, 64]`` when ``cover_noise_strength > 0``.
    """

    conditions: Conditions
    sampling: SamplerSettings
    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    seeds: Sequence[int] | None = None
    noise: Tensor | None = None
    non_cover: Conditions | None = None
    audio_cover_strength: float = 1.0
    cover_noise_strength: float = 0.0
    src_latents: Tensor | None = None
    repaint: RepaintPlan | None = None
    eps_source: EpsSource | None = None
    noise_mix: Sequence[NoiseTerms] | None = None


def seeded_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per item, seeded like the reference's ``prepare_noise``."""
    for seed in seeds:
        if int(seed) < 0:
            raise InvalidArgument(f"seeds must be >= 0 (resolve random seeds first), got {seed}", field="seeds")
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def draw_per_item(
    generators: Sequence[torch.Generator], frames: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``cat_b randn((1, frames, 64), generator_b)`` -> ``[B, frames, 64]``."""
    draws = [torch.randn((1, frames, LATENT_CHANNELS), generator=g, dtype=dtype, device=device) for g in generators]
    return torch.cat(draws, dim=0)


def seeded_noise(seeds: Sequence[int], frames: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The reference's initial noise for per-item ``seeds``: ``[B, frames, 64]``."""
    return draw_per_item(seeded_generators(seeds, device), frames, dtype, device)


@torch.no_grad()
def denoise(
    model: DenoiseModel,
    request: DenoiseInputs,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Tensor:
    """Sample latents ``[B, T, 64]`` for ``request``.

    ``on_step(step_index, num_steps)`` runs after each finished step (0-based index);
    ``should_stop()`` runs before each step and, when it returns True, ends the loop with
    ``Cancelled``. ``model`` needs ``decoder`` and ``null_condition_emb`` (for CFG).
    """
    _validate(request)
    context = request.conditions.context_latents
    sampler = request.sampling.build(context.dtype)
    shape = (context.shape[0], context.shape[1], LATENT_CHANNELS)
    randomness = Randomness(request, shape, context.dtype, context.device)
    x = noise = randomness.initial_noise()
    if request.cover_noise_strength > 0:
        start_level = sampler.start_from_source(request.cover_noise_strength)
        x = add_noise(request.src_latents.to(noise.dtype), noise, start_level)  # [B, T, 64]
    num_steps = sampler.num_steps
    conditions = _ConditionSwitch(model, request, num_steps)
    momentum = MomentumBuffer()
    repaint = request.repaint
    injection_steps = round(repaint.injection_ratio * num_steps) if repaint is not None else 0
    for step_index in range(num_steps):
        if should_stop is not None and should_stop():
            raise Cancelled(f"denoising cancelled before step {step_index + 1} of {num_steps}")
        t = sampler.timestep(step_index)
        velocity = guided_velocity(model, conditions.at(step_index), x, t, request.guidance, momentum, step_index)
        eps = randomness.draw() if sampler.needs_renoise(step_index) else None
        x = sampler.step(velocity, step_index, x, renoise=eps)
        level = sampler.level_after(step_index)
        if repaint is not None and step_index < injection_steps and level is not None:
            x = inject_source(x, repaint, noise, level)
        if on_step is not None:
            on_step(step_index, num_steps)
    if repaint is not None and repaint.crossfade_frames > 0:
        x = crossfade_boundaries(x, repaint.clean_latents, repaint.mask, repaint.crossfade_frames)
    return x


def _validate(request: DenoiseInputs) -> None:
    if request.noise is None and request.seeds is None:
        raise InvalidArgument("either noise or seeds is required", field="seeds")
    if request.sampling.infer_method == "sde" and request.seeds is None and request.eps_source is None:
        raise InvalidArgument("SDE sampling needs seeds or an eps_source", field="seeds")
    if not 0.0 <= request.audio_cover_strength <= 1.0:
        raise InvalidArgument(
            f"audio_cover_strength must be in [0, 1], got {request.audio_cover_strength}", field="audio_cover_strength"
        )
    if request.audio_cover_strength < 1.0 and request.non_cover is None:
        raise InvalidArgument("audio_cover_strength < 1 needs the non-cover conditions", field="audio_cover_strength")
    if request.cover_noise_strength > 0 and request.src_latents is None:
        raise InvalidArgument("cover_noise_strength > 0 needs src_latents", field="cover_noise_strength")
    request.guidance.validate()


class Randomness:
    """Initial noise and later draws (SDE noise, flow-edit noise) of one request: given tensors, or
    per-item seeded generators (several, weighted, for an item with a noise mix)."""

    def __init__(self, request: DenoiseInputs, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device):
        self._request, self._shape, self._dtype, self._device = request, shape, dtype, device
        seeds = request.seeds
        if seeds is not None and len(seeds) != shape[0]:
            raise InvalidArgument(f"seeds must hold one seed per item ({shape[0]}), got {len(seeds)}", field="seeds")
        mixes = list(request.noise_mix) if request.noise_mix is not None else [()] * shape[0]
        if len(mixes) != shape[0]:
            raise InvalidArgument(f"noise_mix must hold one entry per item ({shape[0]}), got {len(mixes)}",
                                  field="noise_mix")
        self._sources = None
        if seeds is not None:
            terms = [mix or ((seed, 1.0),) for seed, mix in zip(seeds, mixes)]
            self._sources = [(seeded_generators([s for s, _ in item], device), [w for _, w in item]) for item in terms]
        self._num_draws = 0

    def initial_noise(self) -> Tensor:
        noise = self._request.noise
        if self._sources is not None:
            drawn = self._draw_seeded()  # [B, T, 64]
            noise = drawn if noise is None else noise
        if tuple(noise.shape) != self._shape:
            raise InvalidArgument(f"noise must have shape {list(self._shape)}, got {list(noise.shape)}", field="noise")
        return noise.to(device=self._device, dtype=self._dtype)

    def draw(self) -> Tensor:
        """The next fresh noise ``[B, T, 64]`` after the initial one."""
        index, self._num_draws = self._num_draws, self._num_draws + 1
        if self._request.eps_source is not None:
            return self._request.eps_source(index, self._shape).to(device=self._device, dtype=self._dtype)
        return self._draw_seeded()

    def _draw_seeded(self) -> Tensor:
        frames = self._shape[1]
        rows = [mix_draws(draw_per_item(generators, frames, self._dtype, self._device).split(1), weights)
                for generators, weights in self._sources]
        return torch.cat(rows, dim=0)  # [B, T, 64]


@dataclass(frozen=True)
class ActiveConditions:
    """A condition set as the decoder takes it (doubled with the null condition under CFG)."""

    encoder_hidden_states: Tensor  # [B or 2B, L, D_enc]
    context_latents: Tensor  # [B or 2B, T, 128]
    cross_kv: Any  # the decoder's precomputed cross-attention K/V, when it supports them


def activate(model: DenoiseModel, conditions: Conditions, guidance: GuidanceSettings) -> ActiveConditions:
    """``conditions`` doubled for CFG when it is on, with the decoder's cross-attention K/V."""
    enc, context = conditions.encoder_hidden_states, conditions.context_latents
    if guidance.is_enabled:
        enc, context = double_conditions(enc, context, model.null_condition_emb)
    decoder = model.decoder
    cross_kv = decoder.precompute_cross_kv(enc) if hasattr(decoder, "precompute_cross_kv") else None
    return ActiveConditions(enc, context, cross_kv)


class _ConditionSwitch:
    """The condition set for each step: cover conditions for ``int(N * strength)`` steps, then
    the non-cover set for good (fresh cross-attention K/V), each doubled with the null condition
    when CFG is on."""

    def __init__(self, model: DenoiseModel, request: DenoiseInputs, num_steps: int) -> None:
        self._model, self._request = model, request
        self._cover_steps = int(num_steps * request.audio_cover_strength)
        self._active = activate(model, request.conditions, request.guidance)
        self._switched = False

    def at(self, step_index: int) -> ActiveConditions:
        if step_index >= self._cover_steps and not self._switched:
            self._switched = True
            self._active = activate(self._model, self._request.non_cover, self._request.guidance)
        return self._active


def guided_velocity(
    model: DenoiseModel,
    active: ActiveConditions,
    x: Tensor,
    t: float,
    guidance: GuidanceSettings,
    momentum: MomentumBuffer,
    step_index: int = 0,
) -> Tensor:
    """One decoder call at timestep ``t`` (``r = t``), guided when CFG is on -> ``[B, T, 64]``."""
    x_in = double_batch(x) if guidance.is_enabled else x  # [B or 2B, T, 64]
    timestep = torch.full((x_in.shape[0],), t, dtype=x.dtype, device=x.device)  # [B or 2B]
    kwargs = {"cross_kv": active.cross_kv} if active.cross_kv is not None else {}
    out = model.decoder(x_in, timestep, timestep, active.encoder_hidden_states, active.context_latents, **kwargs)
    return guide(out, x, t, guidance, momentum, step_index) if guidance.is_enabled else out


def inject_source(x: Tensor, repaint: RepaintPlan, noise: Tensor, level: float) -> Tensor:
    """Outside the repaint span, replace ``x`` by the clean source noised to ``level`` with the initial noise."""
    noised = add_noise(repaint.clean_latents.to(x.dtype), noise, level)  # [B, T, 64]
    keep = repaint.mask.to(device=x.device, dtype=torch.bool).unsqueeze(-1).expand_as(x)  # [B, T, 64]
    return torch.where(keep, x, noised)


def crossfade_boundaries(generated: Tensor, clean: Tensor, mask: Tensor, num_frames: int) -> Tensor:
    """Blend ``generated`` into ``clean`` (both ``[B, T, 64]``) around each row's repaint span.

    The weight is ``mask [B, T]`` (1 = generated) plus, per row, a linear ramp
    ``linspace(0, 1, n + 2)[1:-1]`` over the ``n <= num_frames`` frames before each span of True
    frames and the mirror ramp after it (``dit_service.studio.soft_mask``); rows that are all True
    or all False keep their 0/1 mask.
    """
    mask = mask.to(device=generated.device, dtype=torch.bool)
    soft = soft_mask(mask, num_frames)  # [B, T]
    weight = soft.unsqueeze(-1).expand_as(generated)  # [B, T, 64]
    return (weight * generated + (1.0 - weight) * clean.to(generated.dtype)).to(generated.dtype)
