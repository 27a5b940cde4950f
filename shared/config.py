"""Service configuration: the one place that reads the environment.

Each setting is a command-line flag whose default comes from an ``ACESTEP_*`` environment
variable (Kubernetes ConfigMaps set those), then a built-in default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional


def env_default(name: str, default: Any, cast: Callable[[str], Any] = str) -> Any:
    """``ACESTEP_<NAME>`` cast to the type of the default, else ``default``."""
    raw = os.environ.get(f"ACESTEP_{name.upper()}")
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    return cast(raw)


@dataclass(frozen=True)
class ServerConfig:
    """What every gRPC server needs."""

    service_name: str
    host: str = "127.0.0.1"
    port: int = 0                      # 0: the OS picks; the bound port is logged and returned
    metrics_port: int = -1             # -1: no Prometheus endpoint; 0: OS picks
    drain_grace_s: float = 30.0        # SIGTERM: time in-flight RPCs get to finish
    otlp_endpoint: str = ""            # OTLP/gRPC collector, e.g. otel-collector:4317; empty: no export
    log_level: str = "INFO"
    log_json: bool = False
    max_message_bytes: int = 320 * 1024 * 1024  # a 10-minute float WAV upload fits


def add_server_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Flags shared by the three servers."""
    parser.add_argument("--host", default=env_default("host", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=env_default("port", default_port, int))
    parser.add_argument("--metrics-port", type=int, default=env_default("metrics_port", -1, int))
    parser.add_argument("--drain-grace-s", type=float, default=env_default("drain_grace_s", 30.0, float))
    parser.add_argument("--otlp-endpoint", default=env_default("otlp_endpoint", ""))
    parser.add_argument("--log-level", default=env_default("log_level", "INFO"))
    parser.add_argument("--log-json", action="store_true", default=env_default("log_json", False, bool))
    parser.add_argument("--port-file", default=env_default("port_file", ""),
                        help="write the bound port here once serving (used by tests and `acestep serve`)")


def server_config_from_args(service_name: str, args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        service_name=service_name,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        drain_grace_s=args.drain_grace_s,
        otlp_endpoint=args.otlp_endpoint,
        log_level=args.log_level,
        log_json=args.log_json,
    )


def optional_env(name: str) -> Optional[str]:
    """Raw ``ACESTEP_<NAME>`` or None (for secrets such as API keys)."""
    value = os.environ.get(f"ACESTEP_{name.upper()}")
    return value or None


def export_for_workers(name: str, value: object) -> None:
    """Publish a setting as ``ACESTEP_<NAME>`` for worker processes the engine spawns."""
    os.environ[f"ACESTEP_{name.upper()}"] = str(value)
