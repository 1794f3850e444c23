"""The worker re-reads the population sketch a partition at a time, spread over the
refresh interval, instead of every partition in one batch each second.

Against a real Redis: after the first full read each refresh reads at most one partition's
histogram when batches come every 50 ms, every partition is read again within
``population_refresh_s`` of its last read, a change to one partition shows within that
interval, and the cached population always equals merging the histograms as last read
(and, once every partition was read again, as they are now) from scratch.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from features.store import RedisFeatureStore
from scorers import rfm
from scorers.scoring import RFM_HASH
from stream.redisconn import redis_client
from stream.runtime import ScoringRuntime
from stream.settings import load_settings

pytestmark = pytest.mark.integration
PARTITIONS = 6


def histogram(rng: random.Random, customers: int) -> dict[str, int]:
    h: dict[str, int] = {}
    for _ in range(customers):
        for f in (f"r:{20_000 + rng.randint(0, 400)}", f"f:{rng.randint(1, 30)}",
                  f"m:{rfm.money_bucket(rng.lognormvariate(4, 1.5))}"):
            h[f] = h.get(f, 0) + 1
    return h


def test_the_sketch_is_re_read_a_partition_at_a_time_within_the_interval(services) -> None:
    s = load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                      redis_prefix=f"skr-{uuid.uuid4().hex[:8]}:", partitions=PARTITIONS,
                      models_enabled=False, population_refresh_s=1.0)
    rng = random.Random(7)

    async def run() -> None:
        r = redis_client(s)
        try:
            store = RedisFeatureStore(r, s.redis_prefix)
            keys = [store.keys.table(p, RFM_HASH) for p in range(PARTITIONS)]
            for k in keys:
                await r.hset(k, mapping=histogram(rng, 500))

            async def stored() -> list[dict[bytes, bytes]]:
                return [await r.hgetall(k) for k in keys]

            async def hgetalls() -> int:
                return int((await r.info("commandstats"))["cmdstat_hgetall"]["calls"])

            clock = [1_000.0]
            rt = ScoringRuntime(s, r, store, clock=lambda: clock[0])
            await rt.refresh()
            assert rt.population == rfm.Population.from_hashes(await stored())

            reads: list[int] = []
            last_read = {p: clock[0] for p in range(PARTITIONS)}
            gaps: list[float] = []
            changed_at = None
            seen_change_after = None
            for step in range(60):  # three seconds of batches 50 ms apart
                clock[0] += 0.05
                if step == 20:
                    # a commit elsewhere moves partition 3's histogram
                    await r.hincrby(keys[3], "f:999", 40)
                    changed_at = clock[0]
                before_read = dict(rt._sketch_read_at)
                n0 = await hgetalls()
                await rt.refresh()
                reads.append(await hgetalls() - n0)
                for p, at in rt._sketch_read_at.items():
                    if at != before_read.get(p):
                        gaps.append(clock[0] - last_read[p])
                        last_read[p] = clock[0]
                if (changed_at is not None and seen_change_after is None
                        and rt.population.f.strictly_below(999) < rt.population.f.total):
                    seen_change_after = clock[0] - changed_at
            assert max(reads) <= 1, reads
            assert sum(reads) >= 2 * PARTITIONS  # every partition read again, repeatedly
            assert max(gaps) <= s.population_refresh_s + 0.05 + 1e-9, max(gaps)
            assert seen_change_after is not None
            assert seen_change_after <= s.population_refresh_s + 0.05 + 1e-9
            assert rt.population == rfm.Population.from_hashes(await stored())
            for k in keys:
                await r.delete(k)
        finally:
            await r.aclose()

    asyncio.run(run())
