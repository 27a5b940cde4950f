"""Operational policy of the rendered manifests: probes, drain, resources, security, wiring
between objects (Services, ConfigMaps, volumes, gateway targets), GPU placement per overlay."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from tests.k8s.manifests import (ALL_VARIANTS, OVERLAYS, Rendered, container_env, containers, cpu_cores, expand_args,
                                 flag_value, labels_match, main_container, memory_bytes, pod_spec, prestop_sleep_s)

GPU = "nvidia.com/gpu"
BACKENDS = ("acestep-lm", "acestep-dit")
SERVERS = ("acestep-gateway", *BACKENDS)
SERVER_COMMANDS = {"acestep-gateway": "acestep-gateway", "acestep-lm": "acestep-lm", "acestep-dit": "acestep-dit"}
STARTUP_BUDGET_S = 15 * 60  # a model load must not be killed before this
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}


def _deployments(rendered: Rendered) -> list[dict]:
    return rendered.of_kind("Deployment")


def _claim_templates(workload: dict) -> dict[str, dict]:
    """A StatefulSet's per-pod volume claims, by the volume name its containers mount."""
    return {t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates", [])}


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_servers_have_native_grpc_probes_on_their_grpc_port(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    for name in SERVERS:  # the gRPC servers (the studio page is HTTP: see its own test)
        deployment = rendered.get("Deployment", name)
        container = main_container(deployment)
        grpc_port = {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"]
        args = expand_args(container["args"], container_env(rendered, container))
        assert flag_value(args, "--port") == str(grpc_port), f"{name}: --port differs from the grpc containerPort"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in container, f"{variant}: {name} has no {probe}"
            if variant == "base+gateway-tls" and name == "acestep-gateway":
                assert container[probe]["tcpSocket"]["port"] == "grpc"  # kubelet gRPC probes cannot do TLS
                continue
            assert container[probe].get("grpc", {}).get("port") == grpc_port, f"{name}: {probe} is not gRPC"
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, f"{name}: liveness too twitchy"


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_model_servers_get_a_generous_startup_budget(render_variant, variant: str) -> None:
    for name in BACKENDS:
        probe = main_container(render_variant(variant).get("Deployment", name))["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= STARTUP_BUDGET_S, name


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_gateway_startup_budget_covers_its_backend_wait(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    container = main_container(rendered.get("Deployment", "acestep-gateway"))
    wait_s = float(container_env(rendered, container).get("ACESTEP_BACKEND_WAIT_S", 600))  # the flag's default
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= wait_s


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_model_servers_load_from_the_checkpoint_mount(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    for name in BACKENDS:
        container = main_container(rendered.get("Deployment", name))
        args = expand_args(container["args"], container_env(rendered, container))
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "checkpoints"]
        assert flag_value(args, "--checkpoints") == mount["mountPath"] and mount.get("readOnly") is True
        assert flag_value(args, "--model"), f"{name}: no --model"


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_termination_grace_covers_prestop_and_drain(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    for deployment in _deployments(rendered):
        container = main_container(deployment)
        env = container_env(rendered, container)
        drain_s = float(env["ACESTEP_DRAIN_GRACE_S"])
        sleep_s = prestop_sleep_s(container)
        grace_s = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert sleep_s > 0, f"{deployment['metadata']['name']}: no preStop sleep before SIGTERM"
        assert grace_s >= sleep_s + drain_s, (
            f"{variant}: {deployment['metadata']['name']} terminationGracePeriodSeconds {grace_s} < "
            f"preStop {sleep_s} s + ACESTEP_DRAIN_GRACE_S {drain_s} s")


def test_production_drain_lets_a_ten_minute_song_finish(render_variant) -> None:
    rendered = render_variant("gpu-production")
    for name in SERVERS:
        container = main_container(rendered.get("Deployment", name))
        assert float(container_env(rendered, container)["ACESTEP_DRAIN_GRACE_S"]) >= 600, name


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_every_container_has_requests_and_limits(render_variant, variant: str) -> None:
    for workload in render_variant(variant).workloads():
        for kind, container in containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            requests = container.get("resources", {}).get("requests", {})
            limits = container.get("resources", {}).get("limits", {})
            for resource in ("cpu", "memory"):
                assert resource in requests and resource in limits, f"{where}: {resource} request/limit missing"
            assert cpu_cores(requests["cpu"]) <= cpu_cores(limits["cpu"]), where
            assert memory_bytes(requests["memory"]) <= memory_bytes(limits["memory"]), where
            assert str(requests.get(GPU, "0")) == str(limits.get(GPU, "0")), f"{where}: GPU request != limit"


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_every_container_runs_restricted(render_variant, variant: str) -> None:
    for workload in render_variant(variant).workloads():
        spec = pod_spec(workload)
        pod_ctx = spec.get("securityContext", {})
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", workload["metadata"]["name"]
        assert spec.get("automountServiceAccountToken") is False, workload["metadata"]["name"]
        mounts_by_volume = {v["name"]: v for v in spec.get("volumes", [])}
        for kind, container in containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert ctx.get("runAsUser") == 10001, f"{where}: runAsUser"
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), f"{where}: capabilities not dropped"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
            if kind == "init" and not container["args"][0].startswith("acestep"):
                continue  # a shell loop writes nothing
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in mounts_by_volume[tmp[0]["name"]], f"{where}: /tmp is not an emptyDir"


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_references_resolve(render_variant, variant: str) -> None:
    """ConfigMaps, keys, $(VAR) arguments, volumes and claims that pods name all exist; Secrets are optional."""
    rendered = render_variant(variant)
    for workload in rendered.workloads():
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mountable = {**volumes, **_claim_templates(workload)}
        for kind, container in containers(workload):
            env = container_env(rendered, container)  # raises on a missing ConfigMap or key
            expand_args(container.get("args", []), env)
            assert "command" not in container, "keep the image's tini entrypoint: set args, not command"
            for var in container.get("env", []):
                secret = var.get("valueFrom", {}).get("secretKeyRef")
                assert secret is None or secret.get("optional") is True, f"{var['name']}: required Secret"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in mountable, f"{container['name']}: unknown volume {mount['name']}"
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim")
            assert claim is None or rendered.has("PersistentVolumeClaim", claim["claimName"])


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_services_select_pods_and_named_ports(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    pods = {d["metadata"]["name"]: d for d in (*_deployments(rendered), *rendered.of_kind("StatefulSet"))}
    for service in rendered.of_kind("Service"):
        selected = [d for d in pods.values() if labels_match(service["spec"]["selector"],
                                                             d["spec"]["template"]["metadata"]["labels"])]
        assert len(selected) == 1, f"{service['metadata']['name']} selects {len(selected)} workloads"
        port_names = {p["name"] for p in main_container(selected[0])["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service['metadata']['name']}: {port['targetPort']}"
    for backend in BACKENDS:
        assert rendered.get("Service", f"{backend}-headless")["spec"]["clusterIP"] == "None"
    assert rendered.get("Service", "acestep-gateway")["spec"].get("type", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_gateway_targets_every_backend_endpoint(render_variant, variant: str) -> None:
    """--lm / --dit are dns:/// names of headless Services on the backends' gRPC ports."""
    rendered = render_variant(variant)
    gateway = main_container(rendered.get("Deployment", "acestep-gateway"))
    args = expand_args(gateway["args"], container_env(rendered, gateway))
    assert args[0] == "acestep-gateway"
    for flag, backend in (("--lm", "acestep-lm"), ("--dit", "acestep-dit")):
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", flag_value(args, flag) or "")
        assert match, f"gateway {flag} must be a dns:/// target so that every endpoint is resolved"
        service = rendered.get("Service", match.group(1))
        assert service["spec"].get("clusterIP") == "None", f"{flag} points at a non-headless Service"
        deployment = rendered.get("Deployment", backend)
        assert labels_match(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
        grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"][0]
        assert str(grpc["port"]) == match.group(2)
        backend_args = expand_args(main_container(deployment)["args"],
                                   container_env(rendered, main_container(deployment)))
        assert backend_args[0] == SERVER_COMMANDS[backend]
        assert flag_value(backend_args, "--port") == match.group(2)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_metrics_port_matches_the_configured_metrics_port(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    for name in SERVERS:  # the studio page has no metrics port
        container = main_container(rendered.get("Deployment", name))
        metrics_port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
        assert container_env(rendered, container)["ACESTEP_METRICS_PORT"] == str(metrics_port)
        assert container_env(rendered, container)["ACESTEP_HOST"] == "0.0.0.0"  # probes reach the pod IP


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_backends_accept_grpc_only_from_the_gateway(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    gateway_labels = rendered.get("Deployment", "acestep-gateway")["spec"]["template"]["metadata"]["labels"]
    for backend in BACKENDS:
        labels = rendered.get("Deployment", backend)["spec"]["template"]["metadata"]["labels"]
        policies = [p for p in rendered.of_kind("NetworkPolicy") if labels_match(p["spec"]["podSelector"], labels)]
        assert policies, f"no NetworkPolicy selects {backend}"
        for policy in policies:
            assert "Ingress" in policy["spec"]["policyTypes"]
            for rule in policy["spec"].get("ingress", []):
                ports = {p["port"] for p in rule.get("ports", [])}
                assert ports, f"{policy['metadata']['name']}: a rule without ports opens every port"
                peers = rule.get("from", [])
                assert peers, f"{policy['metadata']['name']}: a rule without sources admits everyone"
                if "grpc" in ports:
                    assert all("podSelector" in p and "namespaceSelector" not in p
                               and labels_match(p["podSelector"], gateway_labels) for p in peers)
                else:
                    assert ports == {"metrics"} and all("namespaceSelector" in p for p in peers)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_disruption_budgets_cover_every_server(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    budgets = rendered.of_kind("PodDisruptionBudget")
    for name in SERVERS:
        labels = rendered.get("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert sum(labels_match(b["spec"]["selector"], labels) for b in budgets) == 1, name


def test_production_budgets_leave_room_to_evict(render_variant) -> None:
    rendered = render_variant("gpu-production")
    minimum = {s["spec"]["scaleTargetRef"]["name"]: s["spec"]["minReplicaCount"]
               for s in rendered.of_kind("ScaledObject")}
    minimum["acestep-gateway"] = rendered.get("Deployment", "acestep-gateway")["spec"]["replicas"]
    for name in SERVERS:
        budget = rendered.get("PodDisruptionBudget", name)["spec"]
        assert "minAvailable" in budget and "maxUnavailable" not in budget, name
        assert 1 <= budget["minAvailable"] < minimum[name], f"{name}: minAvailable blocks every eviction"


def _gpus(container: dict) -> tuple[str, str]:
    resources = container.get("resources", {})
    return str(resources.get("requests", {}).get(GPU)), str(resources.get("limits", {}).get(GPU))


def test_gpu_overlay_gives_one_gpu_to_each_model_pod(render_variant) -> None:
    rendered = render_variant("gpu-production")
    for name in BACKENDS:
        deployment = rendered.get("Deployment", name)
        assert _gpus(main_container(deployment)) == ("1", "1"), name
        spec = pod_spec(deployment)
        assert spec.get("nodeSelector"), f"{name}: not pinned to GPU nodes"
        assert any(t.get("key") == GPU for t in spec.get("tolerations", [])), f"{name}: no GPU toleration"
        assert all(_gpus(c) == ("None", "None") for kind, c in containers(deployment) if kind == "init")
    for workload in (rendered.get("Deployment", "acestep-gateway"), rendered.get("Job", "acestep-checkpoints-download")):
        assert all(_gpus(c) == ("None", "None") for _, c in containers(workload))
    env = container_env(rendered, main_container(rendered.get("Deployment", "acestep-lm")))
    assert env["ACESTEP_LM_MODEL"] == "acestep-5Hz-lm-1.7B" and env["ACESTEP_LM_DEVICE"].startswith("cuda")


def test_base_requests_gpus_but_leaves_node_placement_to_overlays(render_variant) -> None:
    rendered = render_variant("base")
    for name in BACKENDS:
        deployment = rendered.get("Deployment", name)
        assert _gpus(main_container(deployment)) == ("1", "1")
        assert not pod_spec(deployment).get("nodeSelector") and not pod_spec(deployment).get("tolerations")
    assert not CRD_KINDS & {o["kind"] for o in rendered.objects}, "the base must apply without CRDs"


def test_cpu_tiny_needs_no_gpu_volume_or_crd(render_variant) -> None:
    rendered = render_variant("cpu-tiny")
    kinds = {o["kind"] for o in rendered.objects}
    assert not kinds & (CRD_KINDS | {"PersistentVolumeClaim", "Job", "HorizontalPodAutoscaler"}), kinds
    for workload in rendered.workloads():
        assert all(_gpus(c) == ("None", "None") for _, c in containers(workload))
        assert not pod_spec(workload).get("nodeSelector")
    for name in BACKENDS:
        deployment = rendered.get("Deployment", name)
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert set(volumes["checkpoints"]) == {"name", "emptyDir"}
        (init,) = pod_spec(deployment)["initContainers"]
        assert init["args"] == ["acestep-make-tiny-checkpoints", "/checkpoints"]
        assert {"name": "checkpoints", "mountPath": "/checkpoints"} in init["volumeMounts"]
        args = expand_args(main_container(deployment)["args"], container_env(rendered, main_container(deployment)))
        assert flag_value(args, "--device") == "cpu"
        assert "acestep-serve-cpu" in main_container(deployment)["image"]


@pytest.mark.parametrize("variant", [v for v in ALL_VARIANTS if v != "cpu-tiny"])
def test_checkpoints_come_read_only_from_the_downloaded_volume(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    claim = rendered.get("PersistentVolumeClaim", "acestep-checkpoints")
    assert "ReadOnlyMany" in claim["spec"]["accessModes"]
    job = rendered.get("Job", "acestep-checkpoints-download")
    script = main_container(job)["args"][-1]
    assert "hf download ACE-Step/Ace-Step1.5" in script
    written = set(re.findall(r"marker=(\S+)", script))
    for name in BACKENDS:
        deployment = rendered.get("Deployment", name)
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "acestep-checkpoints",
                                                                    "readOnly": True}
        for _, container in containers(deployment):
            mount = [m for m in container["volumeMounts"] if m["name"] == "checkpoints"][0]
            assert mount.get("readOnly") is True and mount["mountPath"] == "/checkpoints"
        (wait,) = pod_spec(deployment)["initContainers"]
        assert set(re.findall(r"-f (\S+) \]", wait["args"][-1])) == written, "init waits for another marker"


@pytest.mark.parametrize("variant", OVERLAYS)
def test_overlays_place_everything_in_their_namespace(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    (namespace,) = rendered.of_kind("Namespace")
    name = namespace["metadata"]["name"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in rendered.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == name, f"{obj['kind']}/{obj['metadata']['name']}"
    for scaled in rendered.of_kind("ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            assert f'namespace="{name}"' in trigger["metadata"]["query"], "KEDA query reads another namespace"


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    scaled = {s["spec"]["scaleTargetRef"]["name"] for s in rendered.of_kind("ScaledObject")}
    hpa = {h["spec"]["scaleTargetRef"]["name"] for h in rendered.of_kind("HorizontalPodAutoscaler")}
    assert not scaled & hpa, "KEDA and an HPA would fight over the same Deployment"
    for name in scaled | hpa:
        assert "replicas" not in rendered.get("Deployment", name)["spec"], name
    if variant == "gpu-production":
        assert scaled == set(BACKENDS)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_service_monitors_scrape_the_metrics_port(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    monitors = rendered.of_kind("ServiceMonitor")
    if not monitors:
        return
    for name in SERVERS:
        services = [s for s in rendered.of_kind("Service")
                    if s["metadata"]["labels"].get("app.kubernetes.io/name") == name]
        matching = [m for m in monitors if any(labels_match(m["spec"]["selector"], s["metadata"]["labels"])
                                               for s in services)]
        assert len(matching) == 1, f"{name}: {len(matching)} ServiceMonitors"
        assert [e["port"] for e in matching[0]["spec"]["endpoints"]] == ["metrics"]
        assert all("metrics" in {p["name"] for p in s["spec"]["ports"]} for s in services)


@pytest.mark.parametrize("variant", ["gpu-production", "base+redis"])
def test_gateway_replicas_share_a_redis_job_store(render_variant, variant: str, monkeypatch) -> None:
    """The gateways' job store env is read by the gateway's own flags, names the Redis Service of
    the StatefulSet (data on its claim, append-only, never evicting), and the audio folder is one
    ReadWriteMany claim every gateway pod mounts writable."""
    from gateway.__main__ import parse_args

    rendered = render_variant(variant)
    gateway = rendered.get("Deployment", "acestep-gateway")
    container = main_container(gateway)
    env = container_env(rendered, container)
    for name in ("ACESTEP_JOB_STORE", "ACESTEP_JOB_FILES_DIR"):
        monkeypatch.setenv(name, env[name])
    args = parse_args(["--dit", "dns:///acestep-dit-headless:50052"])
    assert (args.job_store, args.job_files_dir) == (env["ACESTEP_JOB_STORE"], env["ACESTEP_JOB_FILES_DIR"])

    url = urlsplit(args.job_store)
    assert url.scheme == "redis" and url.path == "/0"
    service = rendered.get("Service", url.hostname)
    redis = rendered.get("StatefulSet", "acestep-redis")
    assert redis["spec"]["serviceName"] == service["metadata"]["name"]
    assert labels_match(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    redis_container = main_container(redis)
    assert {p["name"]: p["containerPort"] for p in redis_container["ports"]}[port["targetPort"]] == 6379
    redis_args = redis_container["args"]
    assert flag_value(redis_args, "--appendonly") == "yes"
    assert flag_value(redis_args, "--maxmemory-policy") == "noeviction"
    (data,) = [m for m in redis_container["volumeMounts"] if m["mountPath"] == flag_value(redis_args, "--dir")]
    assert data["name"] in _claim_templates(redis)

    (files,) = [m for m in container["volumeMounts"] if m["mountPath"] == args.job_files_dir]
    assert not files.get("readOnly")
    volume = {v["name"]: v for v in pod_spec(gateway)["volumes"]}[files["name"]]
    claim = rendered.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod_spec(gateway)["securityContext"].get("fsGroup") == 10001  # the non-root gateway can write


@pytest.mark.parametrize("variant", ["gpu-production", "base+redis"])
def test_redis_accepts_connections_only_from_gateways(render_variant, variant: str) -> None:
    rendered = render_variant(variant)
    gateway_labels = rendered.get("Deployment", "acestep-gateway")["spec"]["template"]["metadata"]["labels"]
    labels = rendered.get("StatefulSet", "acestep-redis")["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in rendered.of_kind("NetworkPolicy") if labels_match(p["spec"]["podSelector"], labels)]
    assert policies, "no NetworkPolicy selects the Redis pod"
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            assert {p["port"] for p in rule.get("ports", [])} == {"redis"}
            peers = rule.get("from", [])
            assert peers and all("podSelector" in p and "namespaceSelector" not in p
                                 and labels_match(p["podSelector"], gateway_labels) for p in peers)


def test_studio_component_serves_the_page_from_the_gateway(render_variant) -> None:
    """The studio is its own CPU Deployment on port 7865, a client of the gateway's Service."""
    rendered = render_variant("base+studio")
    container = main_container(rendered.get("Deployment", "acestep-studio"))
    assert container["args"][:2] == ["acestep", "studio"]
    env = container_env(rendered, container)
    host, port = env["ACESTEP_GATEWAY"].rsplit(":", 1)
    assert int(port) in {p["port"] for p in rendered.get("Service", host)["spec"]["ports"]}
    assert env["ACESTEP_STUDIO_HOST"] == "0.0.0.0" and env["ACESTEP_STUDIO_PORT"] == "7865"
    assert {p["containerPort"] for p in container["ports"]} == {7865}
    assert [p["port"] for p in rendered.get("Service", "acestep-studio")["spec"]["ports"]] == [7865]
    assert GPU not in container["resources"]["limits"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
