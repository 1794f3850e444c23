"""The commit script on a real Redis against the in-memory twin.

A commit writes its states, profiles and outbox records with one command per chunk of
arguments; these commits are larger than a chunk in every part (customers, deletions,
outbox records, table fields), so a chunk boundary that lost or doubled a write, or a
deletion taken for a write, shows up as a difference from the twin.
"""
from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from features.store import (
    LOG_APPEND_CHUNK,
    LogAppend,
    MemoryFeatureStore,
    PartitionCommit,
    RedisFeatureStore,
)
from stream.redisconn import redis_client
from stream.settings import load_settings

pytestmark = pytest.mark.integration
TOPICS = ["clickstream", "transactions"]


def _commits(rng: random.Random, round_: int, vers: dict[int, int],
             ids: list[str]) -> list[PartitionCommit]:
    out = []
    for p in (0, 1):
        states: dict[str, bytes] = {}
        profiles: dict[str, bytes] = {}
        for cid in rng.sample(ids, 1_300):
            # b"" deletes the customer's key (what an erase writes); round 2 deletes more
            # than one command's worth of ids
            gone = 0.85 if round_ == 2 else 0.15
            states[cid] = b"" if rng.random() < gone else rng.randbytes(rng.randint(1, 200))
            if rng.random() < 0.7:
                profiles[cid] = rng.randbytes(rng.randint(1, 50))
        outbox = {f"m:{round_}:{j}": rng.randbytes(rng.randint(1, 80)) for j in range(1_100)}
        table = {f"f{rng.randint(0, 900)}": rng.choice([-2, -1, 1, 1, 2, 3]) for _ in range(700)}
        out.append(PartitionCommit(
            p, vers[p], {"clickstream": 10 * round_ + p, "transactions": 5 * round_},
            1_000 * round_ + p, states, outbox, {"clickstream": 7 * round_},
            profiles, {"rfm": table}))
    return out


async def _everything(store, ids: list[str]):
    now, snaps = await store.load({0: ids, 1: ids}, TOPICS)
    view = {}
    for p, snap in snaps.items():
        view[p] = (snap.ver, snap.now_ms, snap.watermarks, snap.high_ts,
                   {c: v or None for c, v in snap.states.items()},
                   {c: v or None for c, v in snap.profiles.items()})
    pending = await store.outbox_pending([0, 1])
    tables = await store.read_tables("rfm", [0, 1])
    return now, view, pending, tables


def test_large_commits_with_deletions_match_the_in_memory_twin(services) -> None:
    s = load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                      redis_prefix=f"sc-{uuid.uuid4().hex[:8]}:", partitions=2)
    rng = random.Random(11)
    ids = [f"c{i}" for i in range(2_000)]

    async def run() -> None:
        r = redis_client(s)
        try:
            real, twin = RedisFeatureStore(r, s.redis_prefix), MemoryFeatureStore()
            for round_ in range(1, 4):
                vers = {p: snap.ver for p, snap in (await real.load({0: [], 1: []},
                                                                     TOPICS))[1].items()}
                commits = _commits(rng, round_, vers, ids)
                assert await real.commit(commits) == await twin.commit(commits) == {0: True,
                                                                                    1: True}
                # a stale version is refused by both, and writes nothing
                stale = _commits(rng, round_, vers, ids)
                assert await real.commit(stale) == await twin.commit(stale) == {0: False,
                                                                                1: False}
                assert await _everything(real, ids) == await _everything(twin, ids)
                for p in (0, 1):
                    listed: set[str] = set()
                    cursor = 0
                    while True:
                        cursor, page = await real.scan_customers(p, cursor, 500)
                        listed.update(page)
                        if not cursor:
                            break
                    stored = {c for (q, c), v in twin.customers.items() if q == p and v}
                    assert listed == stored and len(stored) > 300
        finally:
            async for k in r.scan_iter(f"{s.redis_prefix}*"):
                await r.delete(k)
            await r.aclose()

    asyncio.run(run())


def test_the_migrations_log_keeps_every_append_in_order_and_the_newest_under_its_cap(
        services) -> None:
    """The log is appended with one script call per chunk of values: appends longer than a
    chunk keep every value in order, and an append longer than the cap keeps the newest."""
    s = load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                      redis_prefix=f"sl-{uuid.uuid4().hex[:8]}:", partitions=2)
    first = [f"a{i}".encode() for i in range(2 * LOG_APPEND_CHUNK + 500)]
    second = [f"b{i}".encode() for i in range(LOG_APPEND_CHUNK + 500)]
    cap = LOG_APPEND_CHUNK + 200
    key = f"{s.redis_prefix}migrations:log"

    async def run() -> tuple[list[bytes], list[bytes], list[bytes]]:
        r = redis_client(s)
        try:
            real, twin = RedisFeatureStore(r, s.redis_prefix), MemoryFeatureStore()
            for store in (real, twin):
                await store.append_log("migrations:log", first, 10_000)
            after_first = [e[b"m"] for _, e in await r.xrange(key, "-", "+")]
            await r.hset(f"{s.redis_prefix}{{p0}}:outbox", "o1", b"rec")
            for store in (real, twin):
                await store.outbox_done({0: ["o1"]}, LogAppend("migrations:log", second, cap))
            assert not await r.hexists(f"{s.redis_prefix}{{p0}}:outbox", "o1")
            after_second = [e[b"m"] for _, e in await r.xrange(key, "-", "+")]
            return after_first, after_second, twin.logs["migrations:log"]
        finally:
            async for k in r.scan_iter(f"{s.redis_prefix}*"):
                await r.delete(k)
            await r.aclose()

    after_first, after_second, twin_log = asyncio.run(run())
    assert after_first == first
    assert twin_log == second[-cap:]
    # Redis trims whole stream nodes (``MAXLEN ~``): the newest ``cap`` values, in order,
    # and at most a node's worth (100 entries by default) of older ones before them.
    assert after_second[-cap:] == second[-cap:]
    assert cap <= len(after_second) <= cap + 100


def test_a_load_raises_an_engine_time_left_behind_by_a_commit(services) -> None:
    """A commit's partitions applied and its engine-time command failed (the key lives on
    another cluster node, or the server refused the write): the next load finds a
    partition's time ahead of the engine time and raises it, as the twin does (the retry
    of the batch loads that partition again)."""
    s = load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                      redis_prefix=f"sn-{uuid.uuid4().hex[:8]}:", partitions=2)
    later = 1_735_689_600_000 + 30 * 86_400_000

    async def run() -> list[tuple[int, int, int]]:
        r = redis_client(s)
        try:
            real, twin = RedisFeatureStore(r, s.redis_prefix), MemoryFeatureStore()
            seen = []
            for store in (real, twin):
                commit = PartitionCommit(1, 0, {"clickstream": 3}, later, {"c1": b"x"}, {})
                assert await store.commit([commit]) == {1: True}
                # the engine time as the failed command left it, on a server that also
                # lost its script cache (restarted): the repair must not need it
                if store is real:
                    await r.set(f"{s.redis_prefix}now", 1_000)
                    await r.script_flush()
                else:
                    twin.global_now = 1_000
                before = await store.now()
                now, _ = await store.load({1: ["c9"]}, TOPICS)
                seen.append((before, now, await store.now()))
            return seen
        finally:
            async for k in r.scan_iter(f"{s.redis_prefix}*"):
                await r.delete(k)
            await r.aclose()

    real, twin = asyncio.run(run())
    assert real == twin == (1_000, later, later)
