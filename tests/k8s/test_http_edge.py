"""The HTTP edge in every rendered variant: its own Deployment and Service, HTTP probes on the
edge's own health routes, wired to the gateway's Service, and network policies that let browsers
in and the edge through to the gateway."""

from __future__ import annotations

import pytest

from http_service.__main__ import parse_args
from tests.k8s.manifests import ALL_VARIANTS, container_env, expand_args, labels_match, main_container, pod_spec
from tests.k8s.manifests import prestop_sleep_s


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_http_edge_listens_where_its_service_and_probes_point(render_variant, variant: str, monkeypatch) -> None:
    rendered = render_variant(variant)
    deployment = rendered.get("Deployment", "acestep-http")
    container = main_container(deployment)
    env = container_env(rendered, container)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = expand_args(container["args"], env)
    assert args[0] == "acestep-http"
    flags = parse_args(args[1:])  # the edge's own parser reads the flags and the environment
    (port,) = [p for p in container["ports"] if p["name"] == "http"]
    assert flags.port == port["containerPort"] and flags.host == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    grace_s = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace_s >= prestop_sleep_s(container) + flags.drain_grace_s

    service = rendered.get("Service", "acestep-http")
    assert labels_match(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    host, gateway_port = flags.gateway.rsplit(":", 1)
    gateway = rendered.get("Service", host)
    gateway_labels = rendered.get("Deployment", "acestep-gateway")["spec"]["template"]["metadata"]["labels"]
    assert labels_match(gateway["spec"]["selector"], gateway_labels)
    assert {p["name"]: p["port"] for p in gateway["spec"]["ports"]}["grpc"] == int(gateway_port)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_network_policies_admit_clients_and_let_the_edge_reach_the_gateway(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    edge_labels = rendered.get("Deployment", "acestep-http")["spec"]["template"]["metadata"]["labels"]
    gateway_labels = rendered.get("Deployment", "acestep-gateway")["spec"]["template"]["metadata"]["labels"]
    policies = rendered.of_kind("NetworkPolicy")

    def admits(target: dict, port: str, source: dict) -> bool:
        """Whether some Ingress rule of a policy selecting ``target`` admits ``source`` pods on ``port``."""
        for policy in policies:
            if not labels_match(policy["spec"]["podSelector"], target):
                continue
            for rule in policy["spec"].get("ingress", []):
                peers = rule.get("from")
                ports = {p["port"] for p in rule.get("ports", [])}
                if port in ports and (not peers or any("podSelector" in p and "namespaceSelector" not in p
                                                       and labels_match(p["podSelector"], source) for p in peers)):
                    return True
        return False

    assert any(labels_match(p["spec"]["podSelector"], edge_labels) for p in policies), "no policy selects the edge"
    assert admits(edge_labels, "http", {"app": "a-browser-facing-ingress"})
    assert admits(gateway_labels, "grpc", edge_labels)
    assert not admits(edge_labels, "metrics", {})


def test_with_gateway_tls_the_edge_trusts_the_gateways_ca(render_variant, monkeypatch) -> None:
    rendered = render_variant("base+gateway-tls")
    edge = rendered.get("Deployment", "acestep-http")
    container = main_container(edge)
    env = container_env(rendered, container)
    monkeypatch.setenv("ACESTEP_GATEWAY_TLS_CA", env["ACESTEP_GATEWAY_TLS_CA"])
    path = parse_args(expand_args(container["args"], env)[1:]).gateway_tls_ca
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    volume = {v["name"]: v for v in pod_spec(edge)["volumes"]}[mount["name"]]
    gateway = rendered.get("Deployment", "acestep-gateway")
    gateway_secrets = {v["secret"]["secretName"] for v in pod_spec(gateway)["volumes"] if "secret" in v}
    assert volume["secret"]["secretName"] in gateway_secrets
    assert [item["path"] for item in volume["secret"]["items"]] == [path.rsplit("/", 1)[1]]
