"""Runners for the ``generate`` conformance cases (the reference's ``generate_audio``).

Each runner maps a case's inputs and ``params.call_kwargs`` onto ``prepare_condition`` plus
``denoise`` and returns the outputs the manifest lists: ``target_latents``, the condition
tensors, the initial ``noise``, ``sde_renoise_noise`` (SDE), ``non_cover_*`` (cover strength) and
``traj_decoder_*`` (when ``params.trajectory``).

Random draws: when ``inputs`` holds ``noise`` / ``sde_renoise_noise`` (the recorded draws, taken
from the case outputs), they are fed in. Otherwise they are re-drawn as the reference drew them:
the initial noise from the per-item seeds, the SDE noise from a generator seeded with
``params.torch_manual_seed`` (the reference used the global RNG right after that seed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dit_service.denoise import Conditions, DenoiseInputs, RepaintPlan, denoise, seeded_noise
from dit_service.guidance import GuidanceSettings
from dit_service.sampler import SamplerSettings
from shared.errors import InvalidArgument

Runner = Callable[[Any, Tensor | None, dict[str, Tensor], dict[str, Any]], dict[str, Tensor]]

# Defaults of the reference's generate_audio signatures (turbo / base differ in shift).
_TURBO_DEFAULT_SHIFT = 3.0
_BASE_DEFAULT_SHIFT = 1.0
_BASE_DEFAULT_STEPS = 30
_BASE_DEFAULT_GUIDANCE = 7.0


_CONDITION_INPUTS = (
    "text_hidden_states",
    "text_attention_mask",
    "lyric_hidden_states",
    "lyric_attention_mask",
    "refer_audio_acoustic_hidden_states_packed",
    "refer_audio_order_mask",
    "chunk_masks",
    "is_covers",
)


class _RecordingDecoder:
    """Wraps a decoder and keeps every call's input latents, timesteps and raw output."""

    def __init__(self, decoder: Any) -> None:
        self._decoder = decoder
        self.hidden_states: list[Tensor] = []
        self.timesteps: list[Tensor] = []
        self.velocities: list[Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._decoder, name)

    def __call__(self, hidden_states: Tensor, timestep: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        velocity = self._decoder(hidden_states, timestep, *args, **kwargs)
        self.hidden_states.append(hidden_states.clone())
        self.timesteps.append(timestep.clone())
        self.velocities.append(velocity.clone())
        return velocity


class _RecordingModel:
    """The two attributes ``denoise`` uses, with the decoder recorded."""

    def __init__(self, model: Any) -> None:
        self.decoder = _RecordingDecoder(model.decoder)
        self.null_condition_emb = model.null_condition_emb


Prepared = tuple[Tensor, Tensor, Tensor]


def _prepare(model: Any, inputs: dict[str, Tensor], silence: Tensor | None, **overrides: Tensor | None) -> Prepared:
    """``model.prepare_condition`` as ``generate_audio`` calls it (attention mask of ones)."""
    args = {name: inputs[name] for name in _CONDITION_INPUTS}
    args.update({k: v for k, v in overrides.items() if k in _CONDITION_INPUTS})
    src = overrides.get("src_latents", inputs["src_latents"])
    ones = torch.ones(src.shape[0], src.shape[1], dtype=src.dtype, device=src.device)  # [B, T]
    return model.prepare_condition(
        **args,
        hidden_states=src,
        attention_mask=ones,
        silence_latent=silence,
        src_latents=src,
        precomputed_lm_hints_25Hz=overrides.get("hints", inputs.get("precomputed_lm_hints_25Hz")),
    )


def _non_cover(model: Any, inputs: dict[str, Tensor], silence: Tensor) -> Prepared:
    """The text2music condition set built from ``non_cover_text_*`` and silence as the source."""
    batch, frames = inputs["src_latents"].shape[:2]
    silence_src = silence[:, :frames, :].expand(batch, -1, -1)  # [B, T, 64]
    return _prepare(
        model,
        inputs,
        silence,
        text_hidden_states=inputs["non_cover_text_hidden_states"],
        text_attention_mask=inputs["non_cover_text_attention_mask"],
        is_covers=torch.zeros_like(inputs["is_covers"]),
        src_latents=silence_src,
        hints=None,
    )


def _settings(
    is_turbo: bool, kwargs: dict[str, Any], inputs: dict[str, Tensor]
) -> tuple[SamplerSettings, GuidanceSettings]:
    method = kwargs.get("infer_method", "ode")
    if is_turbo:
        timesteps = tuple(inputs["timesteps"].tolist()) if "timesteps" in inputs else None
        shift = kwargs.get("shift", _TURBO_DEFAULT_SHIFT)
        return SamplerSettings(is_turbo=True, infer_method=method, shift=shift, timesteps=timesteps), GuidanceSettings()
    sampling = SamplerSettings(
        is_turbo=False,
        infer_method=method,
        shift=kwargs.get("shift", _BASE_DEFAULT_SHIFT),
        num_steps=kwargs.get("infer_steps", _BASE_DEFAULT_STEPS),
    )
    guidance = GuidanceSettings(
        scale=kwargs.get("diffusion_guidance_sale", _BASE_DEFAULT_GUIDANCE),
        use_adg=kwargs.get("use_adg", False),
        interval_start=kwargs.get("cfg_interval_start", 0.0),
        interval_end=kwargs.get("cfg_interval_end", 1.0),
    )
    return sampling, guidance


def _repaint(inputs: dict[str, Tensor], kwargs: dict[str, Any]) -> RepaintPlan | None:
    if "repaint_mask" not in inputs or "clean_src_latents" not in inputs:
        return None
    return RepaintPlan(
        mask=inputs["repaint_mask"],
        clean_latents=inputs["clean_src_latents"],
        injection_ratio=kwargs.get("repaint_injection_ratio", 0.5),
        crossfade_frames=kwargs.get("repaint_crossfade_frames", 10),
    )


class _EpsRecorder:
    """SDE noise source: recorded draws when given, else a generator seeded like the reference's RNG."""

    def __init__(self, recorded: Tensor | None, seed: int) -> None:
        self._recorded = recorded
        self._generator = torch.Generator().manual_seed(seed)
        self.draws: list[Tensor] = []

    def __call__(self, index: int, shape: tuple[int, ...]) -> Tensor:
        eps = self._recorded[index] if self._recorded is not None else torch.randn(shape, generator=self._generator)
        self.draws.append(eps)
        return eps


def run_generate(
    model: Any, silence_latent: Tensor | None, inputs: dict[str, Tensor], params: dict[str, Any]
) -> dict[str, Tensor]:
    """One ``generate`` case: ``params`` is the manifest's ``params`` (model kind, call_kwargs, ...)."""
    kwargs = params.get("call_kwargs", {})
    kind = params.get("model")
    if kind not in ("turbo", "base"):
        raise InvalidArgument(f"params.model must be turbo or base, got {kind!r}", field="model")
    silence = silence_latent if silence_latent is not None else inputs.get("silence_latent")
    enc, enc_mask, context = _prepare(model, inputs, silence)
    outputs = {"context_latents": context, "encoder_hidden_states": enc, "encoder_attention_mask": enc_mask}
    strength = kwargs.get("audio_cover_strength", 1.0)
    non_cover = None
    if strength < 1.0:
        nc_enc, _, nc_context = _non_cover(model, inputs, silence)
        outputs.update(non_cover_context_latents=nc_context, non_cover_encoder_hidden_states=nc_enc)
        non_cover = Conditions(nc_enc, nc_context)
    sampling, guidance = _settings(kind == "turbo", kwargs, inputs)
    seeds = [int(s) for s in kwargs["seed"]]
    noise = inputs.get("noise")
    if noise is None:
        noise = seeded_noise(seeds, context.shape[1], context.dtype, context.device)
    eps = _EpsRecorder(inputs.get("sde_renoise_noise"), int(params.get("torch_manual_seed", 0)))
    request = DenoiseInputs(
        conditions=Conditions(enc, context),
        sampling=sampling,
        guidance=guidance,
        seeds=seeds,
        noise=noise,
        non_cover=non_cover,
        audio_cover_strength=strength,
        cover_noise_strength=kwargs.get("cover_noise_strength", 0.0),
        src_latents=inputs["src_latents"],
        repaint=_repaint(inputs, kwargs),
        eps_source=eps,
    )
    recording = _RecordingModel(model)
    outputs.update(target_latents=denoise(recording, request), noise=noise)
    if sampling.infer_method == "sde":
        outputs["sde_renoise_noise"] = torch.stack(eps.draws)  # [n_renoise, B, T, 64]
    if params.get("trajectory"):
        decoder = recording.decoder
        outputs["traj_decoder_hidden_states"] = torch.stack(decoder.hidden_states)  # [N, B', T, 64]
        outputs["traj_decoder_timestep"] = torch.stack(decoder.timesteps)  # [N, B']
        outputs["traj_decoder_velocity"] = torch.stack(decoder.velocities)  # [N, B', T, 64]
    return outputs


GENERATE_RUNNERS: dict[str, Runner] = {"generate": run_generate}
"""Keyed by the manifest's ``runner`` field; all twelve generate cases use ``"generate"``."""
