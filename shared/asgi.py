"""Serving an ASGI app (the HTTP edge, the studio page) the way the gRPC services serve: bound
before start, the port published in a port file once serving, a grace period on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn

from shared.grpc_server import write_port_file

log = logging.getLogger(__name__)


async def serve_asgi(app: Any, host: str, port: int, port_file: str, drain_grace_s: float, log_level: str,
                     label: str) -> None:
    """Serve ``app`` on ``host:port`` (0: the OS picks) until SIGTERM/SIGINT; ``label`` names it in the log."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level=log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=max(1, int(drain_grace_s)))
    server = uvicorn.Server(config)
    bound = sock.getsockname()[1]

    async def publish_port() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        write_port_file(port_file, bound)
        log.info("%s on http://%s:%d", label, host, bound)

    publisher = asyncio.ensure_future(publish_port())
    await server.serve(sockets=[sock])
    publisher.cancel()
