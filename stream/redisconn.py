"""Redis clients for the engine: one place that turns settings into a connection."""

from __future__ import annotations

import redis.asyncio as aioredis

from stream.settings import Settings


def redis_client(settings: Settings) -> aioredis.Redis:
    """The engine's asyncio Redis client."""
    return aioredis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
