"""Per-request LoRA on the tiny decoder (float32, CPU): oracle equalities, strict loading, the registry.

Oracles: our per-row deltas equal a decoder whose weights were merged (``W + scale * alpha/r * B @ A``)
and equal PEFT's own ``PeftModel`` around the same decoder; a batch mixing adapters, a blend and a
row without adapter gives every row what it gives alone. The adapters are the tiny ones
``acestep-make-tiny-checkpoints`` writes with peft.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from devtools import tiny_checkpoints as tc
from dit_service.lora.format import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, load_adapter
from dit_service.lora.layers import BatchAdapters, LoraLinear, install_lora_layers
from dit_service.lora.registry import LoraRegistry, RegistryConfig
from dit_service.model.config import DiTConfig
from dit_service.model.dit import DiTDecoder
from dit_service.model.weights import random_state_dict
from shared.errors import InvalidArgument, NotFound, ResourceExhausted
from shared.types import GenerationParams
from shared.validation import lora_blend

ATOL = 1e-5
ADAPTERS = tuple(tc.TINY_LORAS)
ROWS, FRAMES, ENC_LEN = 5, 12, 7


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    assert tc.write_loras(root, seed=0) is None
    return root


@pytest.fixture(scope="module")
def plain() -> DiTDecoder:
    config = DiTConfig.from_dict(tc.tiny_dit_config("turbo"))
    state = {k[len("decoder."):]: v for k, v in random_state_dict(config, seed=0).items() if k.startswith("decoder.")}
    decoder = DiTDecoder(config)
    decoder.load_state_dict(state, strict=True)
    return decoder.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def ours(plain: DiTDecoder):
    decoder = copy.deepcopy(plain)
    return decoder, install_lora_layers(decoder)


@pytest.fixture(scope="module")
def adapters(lora_root: Path, ours) -> dict[str, LoraAdapter]:
    _, router = ours
    return {name: load_adapter(lora_root / name, name, router.targets, torch.float32) for name in ADAPTERS}


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, FRAMES, 64, generator=g)
    t = torch.rand(ROWS, generator=g)
    return x, t, t, torch.randn(ROWS, ENC_LEN, 64, generator=g), torch.randn(ROWS, FRAMES, 128, generator=g)


def run(decoder, rows, inputs) -> torch.Tensor:
    with torch.no_grad():
        return decoder(*(value[rows] for value in inputs))


def run_with(ours, blends, inputs, rows=None) -> torch.Tensor:
    decoder, router = ours
    rows = list(range(len(blends))) if rows is None else rows
    with router.use(BatchAdapters.build(blends)):
        return run(decoder, rows, inputs)


def merged(plain: DiTDecoder, lora_root: Path, blend: list[tuple[str, float]]) -> DiTDecoder:
    """The oracle: the adapters' deltas added into the weights, from the files and the configs."""
    decoder = copy.deepcopy(plain)
    for name, scale in blend:
        config = json.loads((lora_root / name / CONFIG_FILE).read_text())
        tensors = load_file(str(lora_root / name / WEIGHTS_FILE))
        for key, lora_a in tensors.items():
            if not key.endswith("lora_A.weight"):
                continue
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            lora_b = tensors[key.replace("lora_A", "lora_B")]
            rank = lora_a.shape[0]
            alpha = next((v for k, v in config["alpha_pattern"].items() if module.endswith(k)), config["lora_alpha"])
            scaling = alpha / rank ** 0.5 if config["use_rslora"] else alpha / rank
            decoder.get_submodule(module).weight += scale * scaling * (lora_b @ lora_a)
    return decoder


@pytest.mark.parametrize("name", ADAPTERS)
@pytest.mark.parametrize("scale", [1.0, 0.35])
def test_each_adapter_equals_merged_weights(name, scale, plain, ours, adapters, lora_root, inputs):
    rows = list(range(ROWS))
    ours_out = run_with(ours, [((adapters[name], scale),)] * ROWS, inputs)
    oracle = run(merged(plain, lora_root, [(name, scale)]), rows, inputs)
    assert (ours_out - oracle).abs().max() <= ATOL
    assert (oracle - run(plain, rows, inputs)).abs().max() > 100 * ATOL  # the adapter does change the output


@pytest.mark.parametrize("name", ADAPTERS)
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_each_adapter_equals_peft_model(name, scale, plain, ours, adapters, lora_root, inputs):
    peft_model = PeftModel.from_pretrained(copy.deepcopy(plain), str(lora_root / name)).eval()
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.scale_layer(scale)  # PEFT's own adapter weight: scaling *= scale
    rows = list(range(ROWS))
    assert (run_with(ours, [((adapters[name], scale),)] * ROWS, inputs) - run(peft_model, rows, inputs)).abs().max() \
        <= ATOL


def test_mixed_batch_gives_every_row_what_it_gives_alone(plain, ours, adapters, lora_root, inputs):
    attn, mlp, rs = (adapters[name] for name in ADAPTERS)
    blends = [((attn, 1.0),), ((mlp, 0.7),), ((rs, 0.3),), ((attn, 0.5), (rs, 0.8)), ()]
    mixed = run_with(ours, blends, inputs)
    for row, blend in enumerate(blends):
        alone = run_with(ours, [blend], inputs, rows=[row])
        assert (mixed[row] - alone[0]).abs().max() <= ATOL, row
    blend_oracle = run(merged(plain, lora_root, [(ADAPTERS[0], 0.5), (ADAPTERS[2], 0.8)]), [3], inputs)
    assert (mixed[3] - blend_oracle[0]).abs().max() <= ATOL
    assert (mixed[4] - run(plain, [4], inputs)[0]).abs().max() <= ATOL


def test_live_rows_and_guidance_copies_keep_their_adapters(ours, adapters, inputs):
    """A batch reduced to its live rows, and the doubled batch of CFG, map rows to the right blends."""
    decoder, router = ours
    attn, mlp, _ = (adapters[name] for name in ADAPTERS)
    blends = [((attn, 1.0),), (), ((mlp, 1.0),)]
    batch = BatchAdapters.build(blends)
    with router.use(batch.select([0, 2])):
        live = run(decoder, [0, 2], inputs)
    with router.use(batch):
        doubled = run(decoder, [0, 1, 2, 0, 1, 2], inputs)
    full = run_with(ours, blends, inputs, rows=[0, 1, 2])
    assert (live - full[[0, 2]]).abs().max() <= ATOL
    assert (doubled[:3] - full).abs().max() <= ATOL and (doubled[3:] - full).abs().max() <= ATOL


def test_scale_zero_is_no_adapter(plain, ours, adapters, inputs):
    assert BatchAdapters.build([((adapters[ADAPTERS[0]], 0.0),)] * ROWS) is None
    rows = list(range(ROWS))
    assert torch.equal(run_with(ours, [((adapters[ADAPTERS[0]], 0.0),)] * ROWS, inputs), run(ours[0], rows, inputs))
    assert (run(ours[0], rows, inputs) - run(plain, rows, inputs)).abs().max() <= ATOL


def test_wrappers_keep_keys_and_base_weights(plain, ours):
    decoder, router = ours
    assert list(decoder.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(decoder.state_dict().values(), plain.state_dict().values()))
    assert isinstance(decoder.layers[0].self_attn.q_proj, LoraLinear)
    assert install_lora_layers(decoder) is router  # installed once
    assert router.targets["layers.1.mlp.down_proj"] == (64, 128)


def _copy_adapter(lora_root: Path, tmp_path: Path, name: str = ADAPTERS[0]) -> Path:
    folder = tmp_path / "bad"
    shutil.copytree(lora_root / name, folder)
    return folder


def _rewrite(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))


Q_A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("change, fragments", [
    (lambda t: t.update({Q_A: torch.zeros(4, 63)}), [Q_A, "shape [4, 63]", "expected [4, 64]"]),
    (lambda t: t.update({"base_model.model.layers.0.self_attn.q_norm.lora_A.weight": torch.zeros(4, 16)}),
     ["layers.0.self_attn.q_norm", "not a Linear layer of the DiT decoder"]),
    (lambda t: t.pop(Q_A.replace("lora_A", "lora_B")), [Q_A, "no lora_B.weight partner"]),
    (lambda t: t.update({Q_A: torch.full((4, 64), float("nan"))}), [Q_A, "NaN"]),
    (lambda t: t.update({"base_model.model.layers.0.mlp.up_proj.lora_magnitude_vector": torch.zeros(128)}),
     ["lora_magnitude_vector", "only lora_A.weight and lora_B.weight"]),
])
def test_strict_loading_names_the_key(change, fragments, lora_root, ours, tmp_path):
    folder = _copy_adapter(lora_root, tmp_path)
    _rewrite(folder, change)
    with pytest.raises(InvalidArgument) as info:
        load_adapter(folder, "bad", ours[1].targets, torch.float32)
    for fragment in fragments:
        assert fragment in info.value.message


@pytest.mark.parametrize("config_change, fragment", [
    ({"r": 8}, f"{Q_A.replace('q_proj', 'k_proj').replace('layers.0.self_attn', 'layers.0.cross_attn')}"),
    ({"peft_type": "LOKR"}, "PEFT LoKr adapters are not supported"),
    ({"use_dora": True}, "DoRA adapters are not supported"),
    ({"bias": "all"}, "bias must be 'none'"),
    ({"rank_pattern": {"(": 2}}, "is not a valid pattern"),
])
def test_config_problems_are_refused_clearly(config_change, fragment, lora_root, ours, tmp_path):
    folder = _copy_adapter(lora_root, tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **config_change}))
    with pytest.raises(InvalidArgument) as info:
        load_adapter(folder, "bad", ours[1].targets, torch.float32)
    assert fragment in info.value.message


def test_lycoris_lokr_output_and_garbage_are_refused(ours, tmp_path):
    lokr = tmp_path / "lokr"
    lokr.mkdir()
    save_file({"lycoris_layers_0_self_attn_q_proj.lokr_w1": torch.zeros(2, 2)}, str(lokr / "lokr_weights.safetensors"))
    with pytest.raises(InvalidArgument, match="LyCORIS LoKr adapters"):
        load_adapter(lokr, "lokr", ours[1].targets, torch.float32)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (garbage / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidArgument, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(garbage, "garbage", ours[1].targets, torch.float32)


def test_blend_validation():
    assert lora_blend(GenerationParams(lora_id="a", lora_scale=0.5, loras=[("b", 1.0)])) == [("a", 0.5), ("b", 1.0)]
    assert lora_blend(GenerationParams(lora_scale=0.7)) == []  # a scale without an id selects nothing
    problems = [
        (GenerationParams(lora_id="../etc"), "lora_id must start with a letter or digit"),
        (GenerationParams(lora_id="a", lora_scale=1.5), "lora_scale must be in [0.0, 1.0]"),
        (GenerationParams(lora_id="a", loras=[("a", 1.0)]), "adapter 'a' is named twice"),
        (GenerationParams(loras=[(f"x{i}", 1.0) for i in range(9)]), "at most 8 adapters"),
        (GenerationParams(loras=[("a/b", 1.0)]), "loras[0].lora_id must start"),
        (GenerationParams(loras=["a"]), "loras[0] must be a (lora_id, scale) pair"),
    ]
    for params, fragment in problems:
        with pytest.raises(InvalidArgument) as info:
            lora_blend(params)
        assert fragment in info.value.message


async def _chunks(data: bytes, size: int = 4096):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def _upload_parts(lora_root: Path, name: str) -> tuple[str, bytes]:
    return (lora_root / name / CONFIG_FILE).read_text(), (lora_root / name / WEIGHTS_FILE).read_bytes()


def _registry(tmp_path: Path, targets, cache_bytes: int = 1 << 30) -> LoraRegistry:
    return LoraRegistry(RegistryConfig(tmp_path / "loras", cache_bytes, 1 << 20), targets, torch.device("cpu"),
                        torch.float32)


async def test_registry_upload_list_pin_delete(lora_root, ours, tmp_path):
    registry = _registry(tmp_path, ours[1].targets)
    config_text, weights = _upload_parts(lora_root, ADAPTERS[0])
    info, already = await registry.upload("style-1", config_text, _chunks(weights), len(weights))
    assert (info.lora_id, info.rank, info.alpha, info.num_modules, already) == ("style-1", 4, 8.0, 16, False)
    assert info.targets == ("k_proj", "o_proj", "q_proj", "v_proj") and info.size_bytes == len(weights)
    again, already = await registry.upload("style-1", config_text, _chunks(weights), len(weights))
    assert already and again.lora_id == "style-1"  # an identical adapter (a shared volume) is accepted
    other_config, other = _upload_parts(lora_root, ADAPTERS[1])
    with pytest.raises(InvalidArgument, match="already exists with a different adapter"):
        await registry.upload("style-1", other_config, _chunks(other), len(other))
    async with registry.pinned([("style-1", 0.5)]) as blend:
        assert blend[0][1] == 0.5 and blend[0][0].lora_id == "style-1"
        infos, missing = await registry.list(["style-1", "nope"])
        assert [i.loaded for i in infos] == [True] and missing == ["nope"]
    await registry.delete("style-1")
    assert (await registry.list(["style-1"]))[1] == ["style-1"]
    with pytest.raises(NotFound, match="no adapter 'style-1'"):
        await registry.delete("style-1")
    with pytest.raises(InvalidArgument, match="lora_id 'style-1' is not a known adapter"):
        async with registry.pinned([("style-1", 1.0)]):
            pass
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == []  # no staging or trash left


async def test_registry_refuses_bad_uploads_and_leaves_nothing(lora_root, ours, tmp_path):
    registry = _registry(tmp_path, ours[1].targets)
    config_text, weights = _upload_parts(lora_root, ADAPTERS[0])
    tensors = load_file(str(lora_root / ADAPTERS[0] / WEIGHTS_FILE))
    tensors[Q_A] = torch.zeros(4, 32)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(InvalidArgument, match=Q_A.replace(".", r"\.")):
        await registry.upload("bad", config_text, _chunks(bad.read_bytes()), bad.stat().st_size)
    with pytest.raises(InvalidArgument, match="the upload sent more than the announced 10 bytes"):
        await registry.upload("short", config_text, _chunks(weights), 10)
    with pytest.raises(InvalidArgument, match=r"total_bytes must be in \[1, 1048576\]"):
        await registry.upload("huge", config_text, _chunks(b""), 2 << 20)
    with pytest.raises(InvalidArgument, match="lora_id must start with a letter or digit"):
        await registry.upload("../escape", config_text, _chunks(weights), len(weights))
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == []


async def test_cache_evicts_least_recently_used_and_refuses_when_pinned_full(lora_root, ours, tmp_path):
    targets = ours[1].targets
    probe = _registry(tmp_path / "probe", targets)
    sizes = {}
    for name in ADAPTERS[:2]:
        config_text, weights = _upload_parts(lora_root, name)
        await probe.upload(name, config_text, _chunks(weights), len(weights))
        async with probe.pinned([(name, 1.0)]) as blend:
            sizes[name] = blend[0][0].num_bytes
    budget = max(sizes.values()) + min(sizes.values()) // 2  # room for one adapter at a time
    registry = LoraRegistry(RegistryConfig(tmp_path / "probe" / "loras", budget), targets, torch.device("cpu"),
                            torch.float32)
    first, second = ADAPTERS[:2]
    async with registry.pinned([(first, 1.0)]):
        with pytest.raises(ResourceExhausted, match="held by adapters in use"):
            async with registry.pinned([(second, 1.0)]):
                pass
    async with registry.pinned([(second, 1.0)]):  # the first one, unpinned now, makes room
        infos, _ = await registry.list([first, second])
        assert [(i.lora_id, i.loaded) for i in infos] == [(first, False), (second, True)]
    assert registry.used_bytes <= budget
