"""What refreshing the scoring inputs costs a batch: the population sketch and model reloads.

    python -m bench.profile_refresh [--customers 100000] [--partitions 6] [--ids 100000]
                                    [--redis URL]

Against a real Redis (its own keys, deleted afterwards) it times, over several rounds:

- reading every partition's RFM histogram and building the population from scratch (what
  one batch a second paid before the sketch was re-read a partition at a time);
- reading one partition's histogram and replacing it in :class:`scorers.rfm.SketchParts`
  (what a batch pays now, one or two partitions at a time);
- loading a model snapshot that carries ``--ids`` remembered example ids (the learner's
  checkpoint, and what workers loaded before) against the serving snapshot without them.

Prints the median and the maximum of each, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid

from scorers import rfm
from scorers.labels import INPUT_NAMES, Example
from scorers.online import OnlineModel


def _histograms(customers: int, partitions: int, rng: random.Random) -> list[dict[str, int]]:
    out: list[dict[str, int]] = [{} for _ in range(partitions)]
    for i in range(customers):
        h = out[i % partitions]
        total = rng.lognormvariate(4, 1.5)
        for f in (f"r:{20_000 + rng.randint(0, 540)}",
                  f"f:{min(60, int(rng.expovariate(0.3)) + 1)}",
                  f"m:{rfm.money_bucket(total)}"):
            h[f] = h.get(f, 0) + 1
    return out


def _model(ids: int, rng: random.Random) -> OnlineModel:
    m = OnlineModel("churn")
    learned = min(ids, 3_000)
    for i in range(learned):
        x = {n: rng.random() for n in INPUT_NAMES}
        m.learn(Example(f"{i:024x}", "churn", "h", i, i, x, int(rng.random() < 0.3)))
    for _ in range(ids - learned):  # as if it had learned that many more
        eid = f"{rng.getrandbits(96):024x}"
        m._seen.add(eid)
        m._order.append(eid)
    return m


def _ms(xs: list[float]) -> str:
    return f"median {1e3 * statistics.median(xs):.1f} ms, max {1e3 * max(xs):.1f} ms"


async def _sketch(url: str, customers: int, partitions: int, rounds: int) -> None:
    import redis.asyncio as aioredis

    rng = random.Random(1)
    r = aioredis.from_url(url)
    keys = [f"bench-refresh-{uuid.uuid4().hex[:8]}:rfm:{p}" for p in range(partitions)]
    try:
        hists = _histograms(customers, partitions, rng)
        for k, h in zip(keys, hists, strict=True):
            await r.hset(k, mapping=h)
        fields = sum(len(h) for h in hists)
        full: list[float] = []
        one: list[float] = []
        parts = rfm.SketchParts()
        for p, k in enumerate(keys):
            parts.replace(p, await r.hgetall(k))
        for i in range(rounds):
            t0 = time.perf_counter()
            async with r.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hgetall(k)
                res = await pipe.execute()
            rfm.Population.from_hashes(res)
            full.append(time.perf_counter() - t0)
            p = i % partitions
            t0 = time.perf_counter()
            async with r.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys[p])
                (hist,) = await pipe.execute()
            parts.replace(p, hist)
            parts.population()
            one.append(time.perf_counter() - t0)
        print(f"sketch of {customers:,} customers, {partitions} partitions, {fields:,} fields")
        print(f"  every partition, read and built from scratch: {_ms(full)}")
        print(f"  one partition, read and replaced:             {_ms(one)}")
    finally:
        for k in keys:
            await r.delete(k)
        await r.aclose()


def _snapshots(ids: int, rounds: int) -> None:
    m = _model(ids, random.Random(2))
    full, serving = m.snapshot(), m.snapshot(serving=True)
    t_full: list[float] = []
    t_serving: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        OnlineModel.restore(full)
        t_full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        OnlineModel.restore(serving)
        t_serving.append(time.perf_counter() - t0)
    print(f"model snapshot remembering {ids:,} example ids")
    print(f"  with the ids ({len(full):,} bytes):    {_ms(t_full)}")
    print(f"  serving, without ({len(serving):,} bytes): {_ms(t_serving)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--ids", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    a = ap.parse_args()
    asyncio.run(_sketch(a.redis, a.customers, a.partitions, a.rounds))
    _snapshots(a.ids, a.rounds)


if __name__ == "__main__":
    main()
