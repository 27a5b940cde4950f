"""The DiT module tree against the shared conformance vectors and the published key layout."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conformance.dit_tensors import MODULE_RUNNERS, available_runners, run_case, run_tensor_cases
from dit_service.model.acestep import AceStepConditionGenerationModel
from dit_service.model.config import DiTConfig
from dit_service.model.weights import LoadedDiT, expected_shapes, load_dit, write_random_dit
from shared.errors import InvalidArgument

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "golden"
CHECKPOINT = GOLDEN / "checkpoint"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = {case["name"]: case for case in MANIFEST["cases"]}
MODULE_CASES = [name for name, case in CASES.items() if case["runner"] in MODULE_RUNNERS]


def _golden_config_dict() -> dict:
    return json.loads((CHECKPOINT / "config.json").read_text())


def _real_2b_config_dict() -> dict:
    return {
        **_golden_config_dict(),
        "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "text_hidden_dim": 1024,
        "num_lyric_encoder_hidden_layers": 8, "num_timbre_encoder_hidden_layers": 4,
        "num_attention_pooler_hidden_layers": 2, "fsq_dim": 2048,
    }


def _case(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    folder = GOLDEN / "cases" / name
    return load_file(folder / "inputs.safetensors"), load_file(folder / "outputs.safetensors")


@pytest.fixture(scope="module")
def golden() -> LoadedDiT:
    return load_dit(CHECKPOINT)


def _with_config(loaded: LoadedDiT, **changes: object) -> AceStepConditionGenerationModel:
    """The golden weights in a tree built from a config with some fields changed."""
    model = AceStepConditionGenerationModel(dataclasses.replace(loaded.config, **changes))
    model.load_state_dict(loaded.model.state_dict(), strict=True)
    return model.eval()


@torch.no_grad()
def _velocity(model: AceStepConditionGenerationModel, name: str = "decoder_t_ne_r") -> torch.Tensor:
    inputs, _ = _case(name)
    return model.decoder(
        inputs["hidden_states"], inputs["timestep"], inputs["timestep_r"],
        inputs["encoder_hidden_states"], inputs["context_latents"],
    )


@pytest.mark.parametrize("name", MODULE_CASES)
def test_module_case_matches_reference(golden: LoadedDiT, name: str) -> None:
    runners, _ = available_runners()
    result = run_case(golden, GOLDEN, CASES[name], runners)
    assert result.passed, result.line()


def test_golden_module_cases_are_all_covered() -> None:
    runners = {case["runner"] for case in MANIFEST["cases"]}
    assert set(MODULE_RUNNERS) <= runners
    assert len(MODULE_CASES) == 6


def test_missing_key_is_named(tmp_path: Path) -> None:
    shutil.copy(CHECKPOINT / "config.json", tmp_path / "config.json")
    state = load_file(CHECKPOINT / "model.safetensors")
    del state["decoder.layers.1.cross_attn.k_norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(InvalidArgument, match=r"missing keys \(1\): decoder\.layers\.1\.cross_attn\.k_norm\.weight"):
        load_dit(tmp_path)


def test_unexpected_key_and_wrong_shape_are_named(tmp_path: Path) -> None:
    shutil.copy(CHECKPOINT / "config.json", tmp_path / "config.json")
    state = load_file(CHECKPOINT / "model.safetensors")
    state["decoder.rotary_emb.inv_freq"] = torch.zeros(8)
    state["null_condition_emb"] = torch.zeros(1, 1, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(InvalidArgument) as info:
        load_dit(tmp_path)
    assert "unexpected keys (1): decoder.rotary_emb.inv_freq" in str(info.value)
    assert "null_condition_emb: file [1, 1, 32] vs model [1, 1, 64]" in str(info.value)


def test_missing_required_config_field_is_named() -> None:
    data = _golden_config_dict()
    del data["intermediate_size"]
    with pytest.raises(InvalidArgument, match="intermediate_size") as info:
        DiTConfig.from_dict(data)
    assert info.value.field == "intermediate_size"


def test_config_rejects_inconsistent_fields() -> None:
    with pytest.raises(InvalidArgument, match="in_channels"):
        DiTConfig.from_dict({**_golden_config_dict(), "in_channels": 256})
    with pytest.raises(InvalidArgument, match="layer_types"):
        DiTConfig.from_dict({**_golden_config_dict(), "layer_types": ["full_attention"]})


def test_sliding_window_and_layer_types_change_the_output(golden: LoadedDiT) -> None:
    reference = _velocity(golden.model)
    wider = _velocity(_with_config(golden, sliding_window=8))
    all_full = _velocity(_with_config(golden, layer_types=("full_attention", "full_attention")))
    window_off = _velocity(_with_config(golden, use_sliding_window=False, sliding_window=None))
    assert (wider - reference).abs().max() > 1e-3
    assert (all_full - reference).abs().max() > 1e-3
    torch.testing.assert_close(window_off, all_full, rtol=0, atol=1e-6)


def test_rope_theta_and_eps_are_honoured(golden: LoadedDiT) -> None:
    reference = _velocity(golden.model)
    assert (_velocity(_with_config(golden, rope_theta=10.0)) - reference).abs().max() > 1e-3
    assert (_velocity(_with_config(golden, rms_norm_eps=0.5)) - reference).abs().max() > 1e-3


@torch.no_grad()
def test_encoders_run_only_num_hidden_layers(golden: LoadedDiT) -> None:
    inputs, expected = _case("condition_encoder")
    shallow = AceStepConditionGenerationModel(dataclasses.replace(golden.config, num_hidden_layers=1))
    shallow.encoder.load_state_dict(golden.model.encoder.state_dict(), strict=True)
    lyric = shallow.encoder.lyric_encoder(inputs["lyric_hidden_states"], inputs["lyric_attention_mask"])
    shallow.encoder.lyric_encoder.layers[1].mlp.down_proj.weight.add_(1.0)
    again = shallow.encoder.lyric_encoder(inputs["lyric_hidden_states"], inputs["lyric_attention_mask"])
    torch.testing.assert_close(again, lyric, rtol=0, atol=0)
    assert (lyric - expected["lyric_encoded"]).abs().max() > 1e-3


@torch.no_grad()
def test_precomputed_cross_kv_gives_the_same_velocity(golden: LoadedDiT) -> None:
    inputs, expected = _case("decoder_t_eq_r")
    decoder = golden.model.decoder
    cross_kv = decoder.precompute_cross_kv(inputs["encoder_hidden_states"])
    velocity = decoder(
        inputs["hidden_states"], inputs["timestep"], inputs["timestep_r"], None, inputs["context_latents"], cross_kv
    )
    torch.testing.assert_close(velocity, expected["velocity"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_codes_to_latents_matches_detokenized_codes(golden: LoadedDiT) -> None:
    inputs, expected = _case("detokenizer")
    latents = golden.model.codes_to_latents(inputs["indices"])
    torch.testing.assert_close(latents, expected["latents_25hz_from_indices"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_prepare_condition_skips_tokenizer_without_covers(golden: LoadedDiT) -> None:
    inputs, _ = _case("prepare_condition")
    names = ("text_hidden_states", "text_attention_mask", "lyric_hidden_states", "lyric_attention_mask",
             "refer_audio_acoustic_hidden_states_packed", "refer_audio_order_mask")
    src = inputs["src_latents"]
    _, _, context = golden.model.prepare_condition(
        *(inputs[n] for n in names), hidden_states=src, attention_mask=None, silence_latent=None,
        src_latents=src, chunk_masks=inputs["chunk_masks"], is_covers=torch.zeros(2, dtype=torch.bool),
    )
    torch.testing.assert_close(context, torch.cat([src, inputs["chunk_masks"].float()], dim=-1), rtol=0, atol=0)


def test_random_writer_reproduces_the_golden_weights_sharded(tmp_path: Path) -> None:
    folder = write_random_dit(tmp_path / "ckpt", _golden_config_dict(), seed=MANIFEST["seed"],
                              silence_frames=12, max_shard_bytes=400_000)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    loaded = load_dit(folder)
    golden_state = load_file(CHECKPOINT / "model.safetensors")
    state = loaded.model.state_dict()
    assert state.keys() == golden_state.keys()
    assert all(torch.equal(state[k], golden_state[k]) for k in golden_state)
    raw = torch.load(folder / "silence_latent.pt", weights_only=True)
    assert raw.shape == (1, 64, 12)
    torch.testing.assert_close(loaded.silence_latent, raw.transpose(1, 2), rtol=0, atol=0)


def test_bfloat16_load_keeps_quantizer_float32() -> None:
    loaded = load_dit(CHECKPOINT, dtype=torch.bfloat16)
    assert loaded.model.decoder.proj_in[1].weight.dtype == torch.bfloat16
    assert loaded.model.tokenizer.quantizer.project_in.weight.dtype == torch.float32
    inputs, expected = _case("decoder_t_ne_r")
    with torch.no_grad():
        velocity = loaded.model.decoder(
            *(inputs[n].bfloat16() for n in ("hidden_states", "timestep", "timestep_r")),
            inputs["encoder_hidden_states"].bfloat16(), inputs["context_latents"].bfloat16(),
        )
    assert velocity.dtype == torch.bfloat16
    torch.testing.assert_close(velocity.float(), expected["velocity"], rtol=0.1, atol=0.1)


def test_published_2b_layout_on_meta() -> None:
    shapes = expected_shapes(DiTConfig.from_dict(_real_2b_config_dict()))
    assert len(shapes) == 677
    assert sum(math.prod(s) for s in shapes.values()) == 2_393_872_518
    prefixes = [name.split(".")[0] for name in shapes]
    counts = {p: prefixes.count(p) for p in ("decoder", "encoder", "tokenizer", "detokenizer", "null_condition_emb")}
    assert counts == {"decoder": 476, "encoder": 140, "tokenizer": 32, "detokenizer": 28, "null_condition_emb": 1}
    assert shapes["decoder.proj_in.1.weight"] == (2048, 192, 2)
    assert shapes["decoder.proj_out.1.weight"] == (2048, 64, 2)
    assert shapes["decoder.time_embed_r.time_proj.weight"] == (12288, 2048)
    assert shapes["decoder.layers.23.self_attn.k_proj.weight"] == (1024, 2048)
    assert shapes["decoder.layers.0.cross_attn.q_norm.weight"] == (128,)
    assert shapes["encoder.text_projector.weight"] == (2048, 1024)
    assert shapes["encoder.lyric_encoder.layers.7.mlp.down_proj.weight"] == (2048, 6144)
    assert shapes["encoder.timbre_encoder.special_token"] == (1, 1, 2048)
    assert shapes["tokenizer.quantizer.project_in.weight"] == (6, 2048)
    assert shapes["detokenizer.special_tokens"] == (1, 5, 2048)


def test_xl_split_widths_on_meta() -> None:
    xl = {
        **_real_2b_config_dict(), "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 32,
        "num_attention_heads": 32, "layer_types": ["sliding_attention", "full_attention"] * 16,
        "encoder_hidden_size": 2048, "encoder_intermediate_size": 6144, "encoder_num_attention_heads": 16,
        "encoder_num_key_value_heads": 8,
    }
    shapes = expected_shapes(DiTConfig.from_dict(xl))
    assert shapes["decoder.layers.31.self_attn.q_proj.weight"] == (4096, 2560)
    assert shapes["decoder.layers.0.mlp.gate_proj.weight"] == (9728, 2560)
    assert shapes["decoder.condition_embedder.weight"] == (2560, 2048)
    assert shapes["decoder.time_embed.time_proj.weight"] == (15360, 2560)
    assert shapes["encoder.lyric_encoder.layers.0.self_attn.q_proj.weight"] == (2048, 2048)
    assert shapes["detokenizer.embed_tokens.weight"] == (2048, 2048)
    assert shapes["null_condition_emb"] == (1, 1, 2048)


def test_runner_reports_missing_and_failing_runners(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").symlink_to(CHECKPOINT.resolve())
    (tmp_path / "cases").symlink_to((GOLDEN / "cases").resolve())
    manifest = {
        "cases": [
            {**CASES["decoder_t_eq_r"], "runner": "no_such_runner"},
            {**CASES["tokenizer"], "runner": "decoder"},
            CASES["detokenizer"],
        ]
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    results = run_tensor_cases(tmp_path)
    assert [r.passed for r in results] == [False, False, True]
    assert results[0].detail.startswith("no runner")
    assert "KeyError" in results[1].detail and "hidden_states" in results[1].detail


def test_runner_fails_a_case_outside_tolerance(golden: LoadedDiT) -> None:
    def off_by_a_little(model, silence, inputs, params):
        return {"velocity": MODULE_RUNNERS["decoder"](model, silence, inputs, params)["velocity"] + 1e-3}

    result = run_case(golden, GOLDEN, CASES["decoder_t_eq_r"], {"decoder": off_by_a_little})
    assert not result.passed
    assert "velocity" in result.detail
    assert result.max_abs_error == pytest.approx(1e-3, rel=1e-2)
