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
              "orchestrator.py", "auth.py", "upstream_errors.py", "passthrough.py", "bench_overhead.py",
              "runner.py", "lora_relay.py", "studio_ops.py"}
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
        services = [n for n in _imports(path)
                    if n.split(".")[0] in ("lm_service", "dit_service", "gateway", "conformance", "devtools")]
        assert not services, f"{path.relative_to(REPO)} imports {services}"


# Developer entry points inside the service packages (benchmarks, the demo) may use the tooling.
TOOL_MODULES = frozenset({"bench.py", "bench_overhead.py", "demo.py", "bench_lora.py"})


def _package_graph() -> dict[str, set[str]]:
    """Which top-level packages each top-level package imports (tests, benches and tools excluded)."""
    graph: dict[str, set[str]] = {}
    for package in ("shared", "lm_service", "dit_service", "gateway", "http_service", "studio"):
        uses = graph.setdefault(package, set())
        for path in (REPO / package).rglob("*.py"):
            if "pb" in path.relative_to(REPO).parts or path.name in TOOL_MODULES:
                continue
            uses.update(n.split(".")[0] for n in _imports(path))
        uses &= {"shared", "lm_service", "dit_service", "gateway", "http_service", "studio", "conformance", "devtools"}
        uses.discard(package)
    return graph


def test_lm_and_dit_services_do_not_import_each_other() -> None:
    graph = _package_graph()
    assert "dit_service" not in graph["lm_service"] and "lm_service" not in graph["dit_service"]


def test_http_edge_talks_to_the_gateway_only() -> None:
    """The HTTP edge is a gRPC client of the gateway: no model service code, no gateway internals
    beyond the SDK's conversions."""
    assert not _package_graph()["http_service"] & {"lm_service", "dit_service"}


def test_studio_page_talks_to_the_gateway_only() -> None:
    """The studio page is a gRPC client of the gateway (through its SDK): no model service code,
    and nothing imports the page (the CLI starts it as its own program)."""
    graph = _package_graph()
    assert not graph["studio"] & {"lm_service", "dit_service", "http_service"}, graph["studio"]
    assert not [package for package, uses in graph.items() if "studio" in uses]


def test_services_do_not_import_the_tooling_and_packages_have_no_cycles() -> None:
    graph = _package_graph()
    for package, uses in graph.items():
        assert not uses & {"conformance", "devtools"}, f"{package} imports {uses & {'conformance', 'devtools'}}"

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    cycles = [package for package in graph if reaches(package, package, {package})]
    assert not cycles, f"import cycles through {cycles}: {graph}"