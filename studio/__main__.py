"""``acestep studio --gateway host:port``: the web page on port 7865, a client of the gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional

import gradio as gr
from fastapi import FastAPI

from gateway import sdk
from shared.config import env_default, optional_env
from shared.asgi import serve_asgi
from shared.telemetry import setup_logging
from studio.app import CSS, StudioSettings, build_page
from studio.jobs import GatewayLink

log = logging.getLogger("studio")
DEFAULT_PORT = 7865  # the port of ACE-Step's own web page


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acestep studio", description=__doc__)
    parser.add_argument("--gateway", default=env_default("gateway", "127.0.0.1:50050"), help="gateway host:port")
    parser.add_argument("--api-key", default=optional_env("studio_api_key"),
                        help="API key the page uses at the gateway (env ACESTEP_STUDIO_API_KEY)")
    parser.add_argument("--tls-ca", default=env_default("studio_tls_ca", ""),
                        help="CA certificate (PEM) to reach the gateway over TLS")
    parser.add_argument("--host", default=env_default("studio_host", "127.0.0.1"),
                        help="listen address (0.0.0.0 to serve other machines)")
    parser.add_argument("--port", type=int, default=env_default("studio_port", DEFAULT_PORT, int),
                        help="listen port (0: the OS picks)")
    parser.add_argument("--work-dir", default=env_default("studio_work_dir", ""),
                        help="folder for the fetched songs and uploads (default: a new temporary folder)")
    parser.add_argument("--max-concurrent", type=int, default=env_default("studio_max_concurrent", 16, int),
                        help="requests the page runs at once; the gateway's own admission limit still applies")
    parser.add_argument("--state-secret", default=optional_env("studio_state_secret") or "",
                        help="key of the job id kept in the browser; give replicas the same one "
                             "(env ACESTEP_STUDIO_STATE_SECRET; default: random per process)")
    parser.add_argument("--log-level", default=env_default("log_level", "INFO"))
    parser.add_argument("--log-json", action="store_true", default=env_default("log_json", False, bool))
    parser.add_argument("--drain-grace-s", type=float, default=env_default("drain_grace_s", 5.0, float),
                        help="SIGTERM: time open requests get to finish")
    parser.add_argument("--metrics-port", type=int, default=-1,
                        help="accepted for uniformity with the gRPC services; the page has no metrics port")
    parser.add_argument("--port-file", default=env_default("port_file", ""),
                        help="write the bound port here once serving (tests and `acestep serve --studio`)")
    return parser.parse_args(argv)


def create_app(args: argparse.Namespace, work_dir: Path) -> FastAPI:
    certs = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    client = sdk.AceStepClient(args.gateway, api_key=args.api_key, root_certificates=certs)
    link = GatewayLink(client, work_dir / "audio")
    page = build_page(link, StudioSettings(state_secret=args.state_secret))
    page.queue(default_concurrency_limit=args.max_concurrent)
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return gr.mount_gradio_app(app, page, path="/", allowed_paths=[str(work_dir / "audio")], ssr_mode=False,
                               footer_links=["api"], css=CSS, mcp_server=False)


async def serve(args: argparse.Namespace) -> None:
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="acestep-studio-"))
    await serve_asgi(create_app(args, work_dir), args.host, args.port, args.port_file, args.drain_grace_s,
                     args.log_level, f"studio (gateway {args.gateway})")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_json)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
