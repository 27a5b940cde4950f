"""The optional gpu-production component that gives each DiT pod a second GPU for the VAE decode."""

from __future__ import annotations

import pytest

from dit_service.__main__ import parse_args
from tests.k8s.manifests import K8S, Rendered, compose, container_env, main_container, render

GPU = "nvidia.com/gpu"
PRODUCTION = K8S / "overlays" / "gpu-production"


@pytest.fixture(scope="module")
def two_gpus(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    folder = compose(tmp_path_factory.mktemp("dit-two-gpus"), [PRODUCTION], [PRODUCTION / "dit-two-gpus"])
    return Rendered("gpu-production+dit-two-gpus", render(kubectl, folder))


def test_the_dit_pod_gets_two_gpus_and_decodes_on_the_second(two_gpus: Rendered, monkeypatch) -> None:
    container = main_container(two_gpus.get("Deployment", "acestep-dit"))
    resources = container["resources"]
    assert str(resources["requests"][GPU]) == str(resources["limits"][GPU]) == "2"
    env = container_env(two_gpus, container)
    assert env["ACESTEP_DIT_DEVICE"] == "cuda:0"
    for name, value in env.items():  # the service reads its flags' defaults from this environment
        monkeypatch.setenv(name, value)
    args = parse_args([])
    assert (args.device, args.vae_device) == ("cuda:0", "cuda:1")


def test_the_other_pods_and_the_default_overlay_keep_one_gpu(two_gpus: Rendered, render_variant) -> None:
    lm = main_container(two_gpus.get("Deployment", "acestep-lm"))
    assert str(lm["resources"]["limits"][GPU]) == "1"
    default = render_variant("gpu-production")
    dit = main_container(default.get("Deployment", "acestep-dit"))
    assert str(dit["resources"]["limits"][GPU]) == "1"
    assert "ACESTEP_DIT_VAE_DEVICE" not in container_env(default, dit)
