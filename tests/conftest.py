"""Fixtures every test package may use: ``redis_server`` (a real redis-server, one per run)."""

from tests.redis_server import redis_server

__all__ = ["redis_server"]
