"""``acestep-gateway --lm host:port[,..] --dit host:port[,..]``: the public entry point."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from urllib.parse import urlsplit
from pathlib import Path
from typing import Optional

import grpc

from gateway.auth import ApiKeyInterceptor
from gateway.jobs.runner import JobRunner
from gateway.jobs.redis_store import DEFAULT_PREFIX, RedisJobStore, default_replica_id
from gateway.jobs.sqlite_store import SqliteJobStore
from gateway.jobs.store import JobStore
from gateway.orchestrator import GatewayLimits, Orchestrator
from gateway.passthrough import LmPassthrough
from gateway.servicer import GatewayServicer
from gateway.upstream import ReplicaPool
from shared.config import add_server_flags, env_default, optional_env, server_config_from_args
from shared.grpc_server import GrpcServer, ServiceBinding, run_service, write_port_file
from shared.pb.acestep.dit.v1 import dit_pb2_grpc
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc
from shared.pb.acestep.lm.v1 import lm_pb2_grpc
from shared.telemetry import setup_tracing

log = logging.getLogger("gateway")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acestep-gateway", description=__doc__)
    parser.add_argument("--lm", default=env_default("lm_targets", ""),
                        help="LM replicas: host:port or dns:///service:port, comma-separated (empty: no LM)")
    parser.add_argument("--dit", default=env_default("dit_targets", ""), help="DiT replicas, comma-separated")
    parser.add_argument("--max-active", type=int, default=env_default("max_active", 16, int))
    parser.add_argument("--max-queued", type=int, default=env_default("max_queued", 64, int))
    parser.add_argument("--max-audio-bytes", type=int, default=env_default("max_audio_bytes", 256 * 1024 * 1024, int))
    parser.add_argument("--max-attempts", type=int, default=env_default("max_attempts", 3, int))
    parser.add_argument("--health-interval-s", type=float, default=env_default("health_interval_s", 1.0, float))
    parser.add_argument("--backend-wait-s", type=float, default=env_default("backend_wait_s", 600.0, float),
                        help="how long to wait at start-up for one healthy replica of each backend")
    parser.add_argument("--job-dir", default=env_default("job_dir", str(Path(tempfile.gettempdir()) / "acestep-jobs")),
                        help="folder of the embedded job store (SQLite + audio files); survives restarts")
    parser.add_argument("--job-retention-s", type=float, default=env_default("job_retention_s", 86400.0, float),
                        help="how long finished jobs and their files are kept")
    parser.add_argument("--job-store", default=env_default("job_store", "sqlite"),
                        help="sqlite (embedded, in --job-dir; one gateway) or a redis://[:password@]host:port/db "
                             "URL (rediss:// for TLS) that several gateway replicas share")
    parser.add_argument("--job-files-dir", default=env_default("job_files_dir", ""),
                        help="with a Redis job store: the audio folder every replica mounts (a ReadWriteMany "
                             "volume); default --job-dir/files")
    parser.add_argument("--job-key-prefix", default=env_default("job_key_prefix", DEFAULT_PREFIX),
                        help="with a Redis job store: prefix of its keys")
    parser.add_argument("--replica-id", default=env_default("replica_id", default_replica_id()),
                        help="this gateway's name as the owner of the jobs it runs (default hostname-pid)")
    parser.add_argument("--tls-cert", default=env_default("tls_cert", ""))
    parser.add_argument("--tls-key", default=env_default("tls_key", ""))
    add_server_flags(parser, default_port=50050)
    args = parser.parse_args(argv)
    if not args.dit:
        parser.error("--dit is required (at least one DiT replica)")
    if args.job_store != "sqlite" and urlsplit(args.job_store).scheme not in ("redis", "rediss"):
        parser.error(f"--job-store must be sqlite or a redis:// or rediss:// URL, got {_redacted(args.job_store)!r}")
    return args


def _no_deadline() -> None:
    """Jobs outlive the call that started them: backend calls get no client deadline."""
    return None


def _targets(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _credentials(args: argparse.Namespace) -> Optional[grpc.ServerCredentials]:
    if not args.tls_cert:
        return None
    pair = (Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())
    return grpc.ssl_server_credentials([pair])


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


async def _job_store(args: argparse.Namespace) -> JobStore:
    if args.job_store == "sqlite":
        return SqliteJobStore(args.job_dir, args.job_retention_s)
    files_dir = args.job_files_dir or str(Path(args.job_dir) / "files")
    store = RedisJobStore(args.job_store, files_dir, args.job_retention_s, args.replica_id,
                          prefix=args.job_key_prefix)
    try:
        await store.check()
    except Exception as error:
        await store.close()
        raise SystemExit(f"acestep-gateway: job store {_redacted(args.job_store)} does not answer: {error}") from None
    log.info("job store: Redis at %s, files in %s, replica %s", _redacted(args.job_store), files_dir,
             args.replica_id)
    return store


async def serve(args: argparse.Namespace) -> None:
    config = server_config_from_args("acestep-gateway", args)
    setup_tracing(config.service_name, config.otlp_endpoint)
    lm_pool = ReplicaPool("lm", _targets(args.lm), lm_pb2_grpc.LmServiceStub, args.health_interval_s) \
        if args.lm else None
    dit_pool = ReplicaPool("dit", _targets(args.dit), dit_pb2_grpc.DitServiceStub, args.health_interval_s)
    limits = GatewayLimits(args.max_active, args.max_queued, args.max_audio_bytes, args.max_attempts)
    orchestrator = Orchestrator(lm_pool, dit_pool, limits)
    passthrough = LmPassthrough(orchestrator.lm, orchestrator.dit, args.max_audio_bytes)
    keys = (optional_env("api_keys") or "").split(",")
    interceptors = [ApiKeyInterceptor(keys)] if any(keys) else []
    store = await _job_store(args)
    jobs = JobRunner(lambda request: orchestrator.generate(request, _no_deadline), store)
    binding = ServiceBinding(gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
                             GatewayServicer(orchestrator, passthrough, jobs), "acestep.gateway.v1.GatewayService")
    server = GrpcServer(config, [binding], interceptors, _credentials(args))
    port = await server.start()
    server.install_signal_handlers()
    await jobs.start()
    for pool in filter(None, (lm_pool, dit_pool)):
        await pool.start()
        await pool.wait_ready(args.backend_wait_s)
    await server.mark_serving()
    write_port_file(args.port_file, port, server.metrics_port)
    log.info("gateway serving on port %d (lm: %s, dit: %s, auth: %s)", port, args.lm or "none", args.dit,
             "on" if interceptors else "off")
    await server.wait()
    await jobs.stop()
    await store.close()
    for pool in filter(None, (lm_pool, dit_pool)):
        await pool.close()


def main(argv: Optional[list[str]] = None) -> int:
    return run_service(parse_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
