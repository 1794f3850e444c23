"""The pipeline benchmark against the real Redis: the Redis store and the in-memory twin
the unit tests use write and publish the same things for the same batches."""

from __future__ import annotations

import asyncio

import pytest
import redis
from conftest import REDIS

from bench import profile_pipeline as pp

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize("live", [0, 2_000])
def test_redis_store_writes_what_the_memory_twin_writes(services: dict[str, str],
                                                        live: int) -> None:
    kw = {"seed": 4, "live": live, "warm": 1_000, "live_batch": 130}
    memory = asyncio.run(pp.run(4_000, 400, **kw))
    stored = asyncio.run(pp.run(4_000, 400, redis_url=REDIS, **kw))
    assert stored.events == memory.events and stored.batches == memory.batches
    assert stored.migrations == memory.migrations > 0
    assert stored.published == memory.published
    # Feature states, profiles, counters and partition metadata read back from Redis,
    # and every published record, hash the same.
    assert stored.digest == memory.digest
    assert stored.roundtrips >= 2 * stored.batches  # a load and a commit each, at least
    assert stored.load_s > 0 and stored.commit_s > 0 and stored.wall_s >= stored.load_s
    assert memory.roundtrips >= 2 * memory.batches
    # Its own keys are gone afterwards.
    r = redis.Redis.from_url(REDIS)
    try:
        assert not list(r.scan_iter(match="profile-*", count=1000))
    finally:
        r.close()


def test_a_different_input_gives_a_different_digest_against_redis(
        services: dict[str, str]) -> None:
    a = asyncio.run(pp.run(2_000, 200, seed=1, redis_url=REDIS))
    b = asyncio.run(pp.run(2_000, 200, seed=2, redis_url=REDIS))
    assert a.digest != b.digest
