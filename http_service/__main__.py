"""``acestep-http --gateway host:port``: the HTTP door (native API + ACE-Step REST compatibility)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Optional


from http_service.app import HttpSettings, create_app
from shared.config import env_default
from shared.asgi import serve_asgi
from shared.telemetry import setup_logging

log = logging.getLogger("http")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acestep-http", description=__doc__)
    parser.add_argument("--gateway", default=env_default("gateway", "127.0.0.1:50050"), help="gateway host:port")
    parser.add_argument("--gateway-tls-ca", default=env_default("gateway_tls_ca", ""),
                        help="PEM file of the CA that signed the gateway's certificate (TLS); empty: plaintext")
    parser.add_argument("--host", default=env_default("http_host", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=env_default("http_port", 8001, int),
                        help="8001 is the port of ACE-Step's own REST server (0: the OS picks)")
    parser.add_argument("--cors-origins", default=env_default("cors_origins", ""),
                        help="comma-separated origins allowed by CORS ('*' for any); empty: CORS off")
    parser.add_argument("--max-body-mb", type=float, default=env_default("max_body_mb", 64.0, float),
                        help="largest request body (uploads included)")
    parser.add_argument("--heartbeat-s", type=float, default=env_default("heartbeat_s", 15.0, float))
    parser.add_argument("--public-url", default=env_default("public_url", ""),
                        help="base URL for absolute file links (empty: relative links)")
    parser.add_argument("--dit-model", default=env_default("dit_model", ""),
                        help="the DiT model name the ACE-Step REST routes report (/v1/models, results)")
    parser.add_argument("--lm-model", default=env_default("lm_model", ""),
                        help="the LM model name the ACE-Step REST routes report")
    parser.add_argument("--queue-maxsize", type=int, default=env_default("queue_maxsize", 0, int),
                        help="the gateway's --max-queued, reported by /v1/stats (0: not reported)")
    parser.add_argument("--log-level", default=env_default("log_level", "INFO"))
    parser.add_argument("--log-json", action="store_true", default=env_default("log_json", False, bool))
    parser.add_argument("--drain-grace-s", type=float, default=env_default("drain_grace_s", 5.0, float),
                        help="SIGTERM: time open requests and event streams get to finish")
    parser.add_argument("--metrics-port", type=int, default=-1,
                        help="accepted for uniformity with the gRPC services; the edge has no metrics port")
    parser.add_argument("--port-file", default=env_default("port_file", ""),
                        help="write the bound port here once serving (tests and `acestep serve`)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> HttpSettings:
    origins = tuple(o.strip() for o in args.cors_origins.split(",") if o.strip())
    gateway_ca = Path(args.gateway_tls_ca).read_bytes() if args.gateway_tls_ca else None
    return HttpSettings(gateway=args.gateway, cors_origins=origins, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                        heartbeat_s=args.heartbeat_s, public_url=args.public_url.rstrip("/"), gateway_ca=gateway_ca,
                        extra=_model_names(args))


def _model_names(args: argparse.Namespace) -> dict:
    names = {"dit_model": args.dit_model, "lm_model": args.lm_model}
    if args.queue_maxsize > 0:
        names["queue_maxsize"] = args.queue_maxsize
    return {key: value for key, value in names.items() if value}


async def serve(args: argparse.Namespace) -> None:
    await serve_asgi(create_app(settings_from_args(args)), args.host, args.port, args.port_file, args.drain_grace_s,
                     args.log_level, f"HTTP API (gateway {args.gateway})")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_json)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
