"""Imports flow one way: only edge modules (servicers, converters, gRPC clients, server plumbing,
entry points) see grpc or generated protobuf code; engines, models, samplers and audio never do."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "lm_service", "dit_service", "gateway")
EDGE_NAMES = {"__main__.py", "servicer.py", "convert.py", "grpc_server.py", "protogen.py", "clients.py",
              "client.py", "sdk.py", "cli.py", "demo.py", "serve.py", "balancer.py", "upstream.py",
              "orchestrator.py", "auth.py", "upstream_errors.py", "passthrough.py", "bench_overhead.py"}
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "shared.pb", "google.protobuf")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _inner_modules() -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "pb" in path.relative_to(REPO).parts or path.name in EDGE_NAMES:
                continue
            files.append(path)
    return files


@pytest.mark.parametrize("path", _inner_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_inner_modules_do_not_import_grpc(path: Path) -> None:
    leaked = sorted(n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))
    assert not leaked, f"{path.relative_to(REPO)} imports {leaked}; move that code to an edge module"


def test_shared_does_not_import_services() -> None:
    for path in (REPO / "shared").rglob("*.py"):
        if path.name == "conformance.py" or path.name == "tiny_checkpoints.py":
            continue  # the command-line tools lazily import the service packages they drive
        services = [n for n in _imports(path) if n.split(".")[0] in ("lm_service", "dit_service", "gateway")]
        assert not services, f"{path.relative_to(REPO)} imports {services}"
