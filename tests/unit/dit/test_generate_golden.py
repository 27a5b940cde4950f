"""The denoising loop on the tiny golden checkpoint: all generate conformance cases, seeds,
cross-attention K/V reuse, progress / cancellation hooks and the repaint helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from conformance.dit_generate import GENERATE_RUNNERS
from dit_service.denoise import (
    Conditions,
    DenoiseInputs,
    RepaintPlan,
    crossfade_boundaries,
    denoise,
    inject_source,
    seeded_noise,
)
from dit_service.guidance import GuidanceSettings
from dit_service.model.weights import LoadedDiT, load_dit
from dit_service.sampler import SamplerSettings
from shared.errors import Cancelled, InvalidArgument

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = {case["name"]: case for case in MANIFEST["cases"] if case["runner"] in GENERATE_RUNNERS}
DRAWN = ("noise", "sde_renoise_noise")


@pytest.fixture(scope="module")
def golden() -> LoadedDiT:
    return load_dit(GOLDEN / "checkpoint")


def _case(name: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    folder = GOLDEN / "cases" / name
    return load_file(folder / "inputs.safetensors"), load_file(folder / "outputs.safetensors")


def _assert_matches(name: str, got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    tolerance = CASES[name]["tolerance"]
    assert set(got) == set(expected), f"{name}: produced {sorted(got)}, expected {sorted(expected)}"
    for key, want in expected.items():
        have = got[key].detach().cpu()
        assert have.shape == want.shape, f"{name}/{key}: shape {list(have.shape)} != {list(want.shape)}"
        if not want.is_floating_point():
            assert torch.equal(have.to(want.dtype), want), f"{name}/{key} differs"
            continue
        error = (have.double() - want.double()).abs()
        bound = tolerance["atol"] + tolerance["rtol"] * want.double().abs()
        assert bool((error <= bound).all()), f"{name}/{key}: max_abs_err {float(error.max()):.3e}"


def test_all_twelve_generate_cases_are_covered() -> None:
    assert len(CASES) == 12


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_case_matches_the_reference(golden: LoadedDiT, name: str) -> None:
    inputs, expected = _case(name)
    drawn = {key: expected[key] for key in DRAWN if key in expected}
    runner = GENERATE_RUNNERS[CASES[name]["runner"]]
    got = runner(golden.model, golden.silence_latent, {**inputs, **drawn}, CASES[name]["params"])
    _assert_matches(name, got, expected)


@pytest.mark.parametrize("name", ["turbo_text2music_sde", "base_sde", "turbo_repaint"])
def test_runner_redraws_the_reference_noise_from_its_seeds(golden: LoadedDiT, name: str) -> None:
    inputs, expected = _case(name)
    got = GENERATE_RUNNERS[CASES[name]["runner"]](golden.model, None, inputs, CASES[name]["params"])
    _assert_matches(name, got, expected)


def test_same_seed_gives_the_same_noise_in_any_batch() -> None:
    alone = seeded_noise([22], 23, torch.float32, torch.device("cpu"))
    pair = seeded_noise([11, 22], 23, torch.float32, torch.device("cpu"))
    triple = seeded_noise([5, 22, 11], 23, torch.float32, torch.device("cpu"))
    assert torch.equal(pair[1], alone[0]) and torch.equal(triple[1], alone[0]) and torch.equal(triple[2], pair[0])
    _, expected = _case("turbo_text2music_ode")
    assert torch.equal(pair, expected["noise"])


def _text2music(rows: slice, **changes: Any) -> DenoiseInputs:
    _, out = _case("turbo_text2music_ode")
    conditions = Conditions(out["encoder_hidden_states"][rows], out["context_latents"][rows])
    fields: dict[str, Any] = {"sampling": SamplerSettings(is_turbo=True), "seeds": [11, 22][rows]}
    return DenoiseInputs(conditions=conditions, **{**fields, **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {"sampling": SamplerSettings(is_turbo=True, infer_method="sde")},
        {"sampling": SamplerSettings(False, "sde", num_steps=4), "guidance": GuidanceSettings(3.0)},
        {"sampling": SamplerSettings(is_turbo=False, num_steps=3), "guidance": GuidanceSettings(4.0, use_adg=True)},
    ],
    ids=["turbo_sde", "base_sde_apg", "base_ode_adg"],
)
def test_an_item_does_not_depend_on_its_batch(golden: LoadedDiT, changes: dict[str, Any]) -> None:
    both = denoise(golden.model, _text2music(slice(0, 2), **changes))
    second = denoise(golden.model, _text2music(slice(1, 2), **changes))
    torch.testing.assert_close(both[1:], second, rtol=0, atol=1e-5)
    again = denoise(golden.model, _text2music(slice(0, 2), **changes))
    assert torch.equal(both, again)


class _CountingDecoder:
    """Delegates to a decoder, counting forward calls and cross-K/V precomputations."""

    def __init__(self, decoder: Any, with_cross_kv: bool = True) -> None:
        self._decoder, self.num_calls, self.num_precomputed = decoder, 0, 0
        if with_cross_kv:
            self.precompute_cross_kv = self._precompute

    def _precompute(self, states: Tensor) -> Any:
        self.num_precomputed += 1
        return self._decoder.precompute_cross_kv(states)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.num_calls += 1
        return self._decoder(*args, **kwargs)


class _Model:
    def __init__(self, loaded: LoadedDiT, with_cross_kv: bool = True) -> None:
        self.decoder = _CountingDecoder(loaded.model.decoder, with_cross_kv)
        self.null_condition_emb = loaded.model.null_condition_emb


def _cover_switch_request() -> DenoiseInputs:
    inputs, out = _case("turbo_cover_strength_noise")
    return DenoiseInputs(
        conditions=Conditions(out["encoder_hidden_states"], out["context_latents"]),
        sampling=SamplerSettings(is_turbo=True, shift=3.0),
        seeds=[11, 22],
        non_cover=Conditions(out["non_cover_encoder_hidden_states"], out["non_cover_context_latents"]),
        audio_cover_strength=0.5,
        cover_noise_strength=0.4,
        src_latents=inputs["src_latents"],
    )


def test_cross_kv_is_computed_once_per_condition_set(golden: LoadedDiT) -> None:
    cached, uncached = _Model(golden), _Model(golden, with_cross_kv=False)
    result = denoise(cached, _cover_switch_request())
    assert cached.decoder.num_calls == 3 and cached.decoder.num_precomputed == 2
    torch.testing.assert_close(result, denoise(uncached, _cover_switch_request()), rtol=0, atol=0)
    _, expected = _case("turbo_cover_strength_noise")
    torch.testing.assert_close(result, expected["target_latents"], rtol=1e-4, atol=1e-4)


def test_progress_hook_sees_every_step(golden: LoadedDiT) -> None:
    seen: list[tuple[int, int]] = []
    denoise(golden.model, _text2music(slice(0, 2)), on_step=lambda k, n: seen.append((k, n)))
    assert seen == [(k, 8) for k in range(8)]


def test_should_stop_cancels_before_the_next_step(golden: LoadedDiT) -> None:
    model = _Model(golden)
    with pytest.raises(Cancelled, match="step 3 of 8"):
        denoise(model, _text2music(slice(0, 2)), should_stop=lambda: model.decoder.num_calls >= 2)
    assert model.decoder.num_calls == 2


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"seeds": None}, "seeds"),
        ({"seeds": [1, 2, 3]}, "seeds"),
        ({"seeds": [-1, 2]}, "seeds"),
        ({"audio_cover_strength": 0.5}, "audio_cover_strength"),
        ({"cover_noise_strength": 0.5}, "cover_noise_strength"),
        ({"noise": torch.zeros(2, 5, 64)}, "noise"),
        ({"seeds": None, "noise": torch.zeros(2, 23, 64), "sampling": SamplerSettings(True, "sde")}, "seeds"),
    ],
)
def test_inconsistent_requests_are_rejected(golden: LoadedDiT, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        denoise(golden.model, _text2music(slice(0, 2), **changes))
    assert info.value.field == field


def test_crossfade_ramps_around_each_span() -> None:
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[0, 4:8] = True
    mask[1, 1:11] = True
    mask[2] = True
    generated, clean = torch.ones(4, 12, 2), torch.zeros(4, 12, 2)
    weight = crossfade_boundaries(generated, clean, mask, 3)[..., 0]
    assert weight[0].tolist() == [0, 0.25, 0.5, 0.75, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0]
    assert weight[1].tolist() == pytest.approx([0.5] + [1] * 10 + [0.5])
    assert weight[2].tolist() == [1] * 12 and weight[3].tolist() == [0] * 12


def test_injection_replaces_only_frames_outside_the_span() -> None:
    x, clean, noise = torch.randn(1, 6, 3), torch.randn(1, 6, 3), torch.randn(1, 6, 3)
    mask = torch.tensor([[False, True, True, False, False, False]])
    got = inject_source(x, RepaintPlan(mask=mask, clean_latents=clean), noise, 0.25)
    assert torch.equal(got[:, 1:3], x[:, 1:3])
    torch.testing.assert_close(got[:, 3:], 0.25 * noise[:, 3:] + 0.75 * clean[:, 3:])
