"""Every rendered object validates offline: built-in kinds against the Kubernetes OpenAPI JSON
schemas that kubernetes-validate ships (strict mode: an unknown field fails), custom resources
against the schemas in tests/k8s/crd_schemas.py."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version

from tests.k8s.crd_schemas import CRD_SCHEMAS
from tests.k8s.manifests import ALL_VARIANTS, Rendered

# Native gRPC probes are GA from Kubernetes 1.27; the newest schemas catch removed APIs.
OLDEST_SUPPORTED = "1.27"
VERSIONS = (OLDEST_SUPPORTED, latest_version())


def _problems(rendered: Rendered, version: str) -> list[str]:
    problems = []
    for obj in rendered.objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        try:
            if schema is not None:
                jsonschema.Draft202012Validator(schema).validate(obj)
            else:
                kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{where}: no schema for {obj['apiVersion']} in Kubernetes {version}")
        except jsonschema.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            problems.append(f"{where} at {path or '<root>'}: {exc.message}")
    return problems


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_rendered_objects_validate(render_variant, variant: str, version: str) -> None:
    problems = _problems(render_variant(variant), version)
    assert not problems, f"{variant} against Kubernetes {version}:\n" + "\n".join(problems)


def test_validation_rejects_a_misspelled_field(render_variant) -> None:
    rendered = render_variant("gpu-production")
    deployment = copy.deepcopy(rendered.get("Deployment", "acestep-lm"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    broken = Rendered("broken", [deployment])
    assert any("readinesProbe" in p for p in _problems(broken, OLDEST_SUPPORTED))


def test_crd_schemas_reject_typos_and_wrong_types(render_variant) -> None:
    rendered = render_variant("gpu-production")
    scaled = copy.deepcopy(rendered.get("ScaledObject", "acestep-dit"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # KEDA wants a string
    monitor = copy.deepcopy(rendered.get("ServiceMonitor", "acestep-dit"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    problems = _problems(Rendered("broken", [scaled, monitor]), OLDEST_SUPPORTED)
    assert len(problems) == 2, problems
