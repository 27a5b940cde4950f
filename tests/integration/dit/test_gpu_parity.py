"""bf16 DiT output against the float32 CPU output on the shared conformance vectors.

The service runs the DiT in bf16 on CUDA (SDPA with the dense sliding-window mask); an attention
kernel that ignored the window or the key padding would put the outputs far off (relative errors
of order 1). Every case of ``../shared/golden`` runs twice through the conformance runners: float32
on the CPU (the reference precision) and bf16 on the device under test, inputs cast to bf16. Float
outputs must agree within a bf16 tolerance; masks exactly. FSQ codes and the vectors quantised from
them are left out: bf16 moves values near a rounding boundary to the next level, by design.

The ``cuda`` case is the GPU check (marked ``gpu``); the ``cpu`` case runs the same bf16 path on
the CPU kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conformance.dit_tensors import DRAWN_OUTPUTS, MODULE_RUNNERS, available_runners
from dit_service.model.weights import LoadedDiT, load_dit

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = MANIFEST["cases"]
# bf16 keeps 8 significant bits (relative step 2**-8 = 0.0039); through the encoders and 8-60 sampler
# steps of the tiny model the errors measured on the CPU kernels stay below 0.021 (relative L2).
MAX_RELATIVE_L2 = 0.04
MAX_ABS_ERROR_OF_PEAK = 0.1
FSQ_OUTPUTS = {"quantized", "indices", "unaligned_quantized", "unaligned_indices", "quantized_from_indices"}
NOT_COMPARED = {*DRAWN_OUTPUTS, *FSQ_OUTPUTS}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu: needs CUDA")]),
]


def _detokenizer(model, silence, inputs, params):
    """The detokenizer case through the service's own code path (``codes_to_latents`` casts the FSQ
    output to the model dtype; the conformance runner feeds it to the detokenizer as float32)."""
    return {"latents_25hz": model.detokenize(inputs["quantized"]),
            "latents_25hz_from_indices": model.codes_to_latents(inputs["indices"])}


def _runners():
    runners, missing = available_runners()
    assert not missing, missing
    return {**runners, "detokenizer": _detokenizer}


def _run(loaded: LoadedDiT, case: dict, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    folder = GOLDEN / "cases" / case["name"]
    expected = load_file(folder / "outputs.safetensors")
    inputs = {**load_file(folder / "inputs.safetensors"), **{k: expected[k] for k in DRAWN_OUTPUTS if k in expected}}
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in inputs.items()}
    with torch.no_grad():
        return _runners()[case["runner"]](loaded.model, loaded.silence_latent, inputs, dict(case.get("params", {})))


@pytest.fixture(scope="module")
def float32_outputs() -> dict[str, dict[str, torch.Tensor]]:
    loaded = load_dit(GOLDEN / "checkpoint")
    return {case["name"]: _run(loaded, case, torch.float32, "cpu") for case in CASES}


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_matches_float32_cpu_on_every_conformance_case(device: str, float32_outputs) -> None:
    loaded = load_dit(GOLDEN / "checkpoint", dtype=torch.bfloat16, device=device)
    assert MODULE_RUNNERS.keys() <= _runners().keys()
    problems = []
    num_compared = 0
    for case in CASES:
        got = _run(loaded, case, torch.bfloat16, device)
        for name, want in float32_outputs[case["name"]].items():
            if name in NOT_COMPARED or name.startswith("traj_"):
                continue
            num_compared += 1
            have = got[name].detach().cpu()
            if not want.is_floating_point() or not have.is_floating_point():
                if not torch.equal(have.to(want.dtype), want):
                    problems.append(f"{case['name']}/{name}: differs")
                continue
            diff = (have.double() - want.double())
            relative_l2 = float(diff.norm() / want.double().norm().clamp_min(1e-12))
            abs_of_peak = float(diff.abs().max() / want.double().abs().max().clamp_min(1e-12))
            if relative_l2 > MAX_RELATIVE_L2 or abs_of_peak > MAX_ABS_ERROR_OF_PEAK:
                problems.append(f"{case['name']}/{name}: relative L2 {relative_l2:.4f}, max |err| / peak {abs_of_peak:.4f}")
    assert num_compared > 3 * len(CASES), num_compared
    assert not problems, "\n".join(problems)
