"""Run the tensor cases of a conformance vector folder against our DiT code.

A folder holds ``manifest.json`` (cases, each naming a ``runner``, its inputs, outputs and
tolerance), ``checkpoint/`` (published layout) and ``cases/<name>/{inputs,outputs}.safetensors``.
Nothing here depends on the sizes of one particular folder.

Runners are ``(model, silence_latent or None, inputs, params) -> {output name: tensor}``. The
module runners live here; the sampler runners come from ``conformance.dit_generate``
(``GENERATE_RUNNERS``). Outputs that record random draws (``noise``, ``sde_renoise_noise``) are
handed to the runner inside ``inputs``, to be used instead of sampling, and are not compared.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from dit_service.model.acestep import AceStepConditionGenerationModel
from dit_service.model.weights import LoadedDiT, load_dit
from conformance.results import CaseResult

Model = AceStepConditionGenerationModel
Tensors = dict[str, Tensor]
Params = dict[str, Any]
Runner = Callable[[Model, Tensor | None, Tensors, Params], Tensors]

DRAWN_OUTPUTS = ("noise", "sde_renoise_noise")
ENCODER_INPUTS = (
    "text_hidden_states",
    "text_attention_mask",
    "lyric_hidden_states",
    "lyric_attention_mask",
    "refer_audio_acoustic_hidden_states_packed",
    "refer_audio_order_mask",
)


def _condition_encoder(model: Model, silence: Tensor | None, inputs: Tensors, params: Params) -> Tensors:
    encoder = model.encoder
    states, mask = encoder(*(inputs[name] for name in ENCODER_INPUTS))
    timbre, timbre_mask = encoder.timbre_encoder(
        inputs["refer_audio_acoustic_hidden_states_packed"], inputs["refer_audio_order_mask"]
    )
    return {
        "encoder_hidden_states": states,
        "encoder_attention_mask": mask,
        "text_projected": encoder.text_projector(inputs["text_hidden_states"]),
        "lyric_encoded": encoder.lyric_encoder(inputs["lyric_hidden_states"], inputs["lyric_attention_mask"]),
        "timbre_embs_unpacked": timbre,
        "timbre_embs_mask": timbre_mask,
    }


def _prepare_condition(model: Model, silence: Tensor | None, inputs: Tensors, params: Params) -> Tensors:
    src = inputs["src_latents"]
    states, mask, context = model.prepare_condition(
        *(inputs[name] for name in ENCODER_INPUTS),
        hidden_states=inputs.get("hidden_states", src),
        attention_mask=inputs.get("attention_mask"),
        silence_latent=inputs.get("silence_latent", silence),
        src_latents=src,
        chunk_masks=inputs["chunk_masks"],
        is_covers=inputs["is_covers"],
        precomputed_lm_hints_25Hz=inputs.get("precomputed_lm_hints_25Hz"),
    )
    return {"encoder_hidden_states": states, "encoder_attention_mask": mask, "context_latents": context}


def _decoder(model: Model, silence: Tensor | None, inputs: Tensors, params: Params) -> Tensors:
    velocity = model.decoder(
        inputs["hidden_states"],
        inputs["timestep"],
        inputs["timestep_r"],
        inputs["encoder_hidden_states"],
        inputs["context_latents"],
    )
    return {"velocity": velocity}


def _tokenizer(model: Model, silence: Tensor | None, inputs: Tensors, params: Params) -> Tensors:
    x = inputs["x"]
    window = model.config.pool_window_size
    quantized, indices = model.tokenizer.tokenize(x)
    pooled = model.tokenizer.pool(x.reshape(x.shape[0], x.shape[1] // window, window, x.shape[2]))
    outputs = {"quantized": quantized, "indices": indices, "pooled": pooled}
    if "x_unaligned" in inputs:
        unaligned = model.tokenize(
            inputs["x_unaligned"], inputs.get("silence_latent", silence), inputs.get("x_unaligned_mask")
        )
        outputs.update(zip(("unaligned_quantized", "unaligned_indices", "unaligned_token_mask"), unaligned))
    return outputs


def _detokenizer(model: Model, silence: Tensor | None, inputs: Tensors, params: Params) -> Tensors:
    from_indices = model.tokenizer.codes_to_quantized(inputs["indices"])
    return {
        "latents_25hz": model.detokenize(inputs["quantized"]),
        "quantized_from_indices": from_indices,
        "latents_25hz_from_indices": model.detokenizer(from_indices),
    }


MODULE_RUNNERS: dict[str, Runner] = {
    "condition_encoder": _condition_encoder,
    "prepare_condition": _prepare_condition,
    "decoder": _decoder,
    "tokenizer": _tokenizer,
    "detokenizer": _detokenizer,
}


def available_runners() -> tuple[dict[str, Runner], str]:
    """Module runners plus ``GENERATE_RUNNERS``; the second value says why the latter are absent."""
    try:
        generate = importlib.import_module("conformance.dit_generate").GENERATE_RUNNERS
    except Exception as exc:  # a broken or missing sibling module must not stop the other cases
        return dict(MODULE_RUNNERS), f"conformance.dit_generate unavailable: {type(exc).__name__}: {exc}"
    return {**dict(generate), **MODULE_RUNNERS}, ""


def run_tensor_cases(vector_dir: Path, *, device: str = "cpu") -> list[CaseResult]:
    """Every case of ``vector_dir/manifest.json``, in manifest order; never raises for a case."""
    vector_dir = Path(vector_dir)
    manifest = json.loads((vector_dir / "manifest.json").read_text(encoding="utf-8"))
    cases = manifest.get("cases", [])
    runners, missing_reason = available_runners()
    checkpoint_dir = vector_dir / manifest.get("checkpoint", {}).get("dir", "checkpoint")
    try:
        loaded = load_dit(checkpoint_dir, device=device)
    except Exception as exc:  # reported per case below
        detail = f"checkpoint failed to load: {type(exc).__name__}: {exc}"
        return [CaseResult(case["name"], False, detail=detail) for case in cases]
    return [run_case(loaded, vector_dir, case, runners, missing_reason, device=device) for case in cases]


def run_case(
    loaded: LoadedDiT,
    vector_dir: Path,
    case: dict[str, Any],
    runners: dict[str, Runner],
    missing_reason: str = "",
    *,
    device: str = "cpu",
) -> CaseResult:
    """Run one manifest case with its runner and compare every expected output."""
    name = case["name"]
    tolerance = case.get("tolerance") or {}
    if "atol" not in tolerance or "rtol" not in tolerance:
        return CaseResult(name, False, detail="manifest case has no tolerance.atol / tolerance.rtol")
    atol, rtol = float(tolerance["atol"]), float(tolerance["rtol"])
    runner = runners.get(case.get("runner", ""))
    if runner is None:
        detail = f"no runner ({missing_reason})" if missing_reason else "no runner"
        return CaseResult(name, False, tolerance=atol, detail=detail)
    case_dir = vector_dir / "cases" / name
    try:
        inputs = load_file(case_dir / "inputs.safetensors", device=device)
        expected = load_file(case_dir / "outputs.safetensors")
        drawn = {key: expected[key].to(device) for key in DRAWN_OUTPUTS if key in expected}
        with torch.no_grad():
            got = runner(loaded.model, loaded.silence_latent, {**inputs, **drawn}, dict(case.get("params", {})))
    except Exception as exc:  # the case fails with the error text; the run goes on
        return CaseResult(name, False, tolerance=atol, detail=f"{type(exc).__name__}: {exc}")
    wanted = [key for key in case.get("outputs", expected) if key not in drawn]
    return compare_outputs(name, got, expected, wanted, atol, rtol)


def compare_outputs(
    name: str, got: dict[str, Tensor], expected: dict[str, Tensor], wanted: list[str], atol: float, rtol: float
) -> CaseResult:
    """``|got - exp| <= atol + rtol * |exp|`` for float outputs, exact equality for integer/bool ones."""
    worst = 0.0
    problems: list[str] = []
    for key in wanted:
        if key not in expected:
            problems.append(f"{key}: not in outputs.safetensors")
            continue
        if key not in got:
            problems.append(f"{key}: not produced")
            continue
        error, problem = compare_tensor(got[key], expected[key], atol, rtol)
        if not math.isnan(worst) and (math.isnan(error) or error > worst):
            worst = error
        if problem:
            problems.append(f"{key}: {problem}")
    return CaseResult(name, not problems, max_abs_error=worst, tolerance=atol, detail="; ".join(problems))


def compare_tensor(got: Tensor, expected: Tensor, atol: float, rtol: float) -> tuple[float, str]:
    """``(max abs error, problem or "")`` of one output against its expected tensor."""
    if not isinstance(got, Tensor):
        return 0.0, f"expected a tensor, got {type(got).__name__}"
    got = got.detach().cpu()
    if tuple(got.shape) != tuple(expected.shape):
        return 0.0, f"shape {list(got.shape)} != expected {list(expected.shape)}"
    if not expected.is_floating_point():
        if got.is_floating_point():
            return 0.0, f"dtype {got.dtype} where {expected.dtype} is expected"
        diff = (got.long() - expected.long()).abs()
        num_bad = int((diff != 0).sum())
        error = float(diff.max()) if diff.numel() else 0.0
        return error, f"{num_bad} of {diff.numel()} values differ" if num_bad else ""
    diff = (got.double() - expected.double()).abs()
    within = diff <= atol + rtol * expected.double().abs()
    error = float(diff.max()) if diff.numel() else 0.0
    num_bad = int((~within).sum())
    return error, f"{num_bad} of {diff.numel()} values outside tolerance (max_abs_err={error:.3e})" if num_bad else ""
