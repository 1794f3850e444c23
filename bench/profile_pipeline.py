"""CPU per input event of the whole micro-batch step, without Kafka or Redis.

``segstream bench`` measures the engine end to end, where the broker, Redis, the load
generator and Faust share the machine with the worker and move every figure. This
runs :class:`stream.pipeline.BatchProcessor` alone, in one process, on the benchmark's
own synthetic input: raw records are decoded, checked against watermarks, folded into
feature states, scored, placed in segments, committed to
:class:`features.store.MemoryFeatureStore` and their outbox "published" to a list. The
scoring state is what a worker serves (``bench.models``: trained online models,
personas and CLV parameters), and the garbage collector is tuned as a worker tunes it.

Two workloads:

* ``backlog``: ``--events`` events over ``--customers`` customers in batches of up to
  ``batch_max`` records drawn from every partition, as the throughput phase (E) of
  ``segstream bench`` feeds a worker: event time advances by days per batch, so most
  evaluations move a customer;
* ``live`` (``--live N``): after the backlog (not timed), ``--warm`` events at 7,200/s
  and then N events at 5,000/s whose event time keeps pace with the wall clock
  (``bench.workload.at_wall_pace``), in batches of ``--live-batch`` records, as the
  latency phases offer them.

It prints CPU microseconds per event and a digest of everything the batches wrote and
published (feature states, profiles, counters, partition metadata, outbox records), so two
versions of the code can be checked for identical output. ``--profile`` adds a cProfile
table of the timed part. ``--redis URL`` runs the same batches against
:class:`features.store.RedisFeatureStore` on that server, with the worker's client (its own
keys, deleted afterwards): it adds the wall time per event and what the loads and commits
took of it, and the digest, read back from Redis, must equal the in-memory run's. Run
``python -m bench.profile_pipeline --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import hashlib
import io
import os
import pstats
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from bench import workload as wl
from bench.profile_scoring import build
from features.store import MemoryFeatureStore, RedisFeatureStore
from scorers.labels import LabelState
from scorers.profile import Profile
from scorers.scoring import ScoringContext
from stream.app import tune_gc
from stream.pipeline import BatchProcessor, RawRecord
from stream.redisconn import delete_matching, redis_client, redis_sync_client
from stream.runtime import StaticScoring
from stream.settings import Settings, load_settings

#: Live batches between two reads of the population sketch: a worker re-reads it every
#: ``SEGSTREAM_POPULATION_REFRESH_S`` (1 s), about 40 live batches at 5,000 events/s.
LIVE_REFRESH_BATCHES = 40
WARM_RATE = 7200.0
LIVE_RATE = 5000.0


class _Published:
    """A publisher that keeps what it was given."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes]] = []

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        self.records.extend(records)


class _Scoring(StaticScoring):
    """:class:`StaticScoring` with personas, re-reading the sketch every ``every`` batches."""

    def __init__(self, *args: Any, personas: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.personas = personas
        # one fixed process key: the output digest is the same from run to run
        self.instance = "profile"
        self.every = 1
        self._calls = 0

    async def refresh(self, force: bool = False) -> None:
        self._calls += 1
        if force or (self._calls - 1) % self.every == 0:
            await super().refresh(force)

    def context(self, now_ms: int) -> ScoringContext:
        return dataclasses.replace(super().context(now_ms), personas=self.personas)


@dataclass
class Result:
    """What one timed part did."""

    workload: str
    events: int
    batches: int
    cpu_s: float
    applied: int
    migrations: int
    published: int
    dead_letters: int
    digest: str
    wall_s: float = 0.0
    #: wall seconds the batches spent in the store's loads and commits
    load_s: float = 0.0
    commit_s: float = 0.0
    roundtrips: int = 0

    @property
    def us_per_event(self) -> float:
        return self.cpu_s / max(1, self.events) * 1e6

    def per_event(self, seconds: float) -> float:
        return seconds / max(1, self.events) * 1e6


def _topics(s: Settings) -> dict[str, str]:
    return {"clickstream": s.clickstream_topic, "transactions": s.transactions_topic}


def backlog_batches(w: wl.Workload, s: Settings, batch_max: int
                    ) -> tuple[list[list[RawRecord]], dict[tuple[str, int], int]]:
    """The workload's records as a worker's batches: an equal share of every partition of
    both topics per batch, each partition's records in offset order. Also returns the
    next offset of every (topic, partition)."""
    topic = _topics(s)
    per = {(topic[kind], p): [RawRecord(topic[kind], p, i, k, v, 0)
                              for i, (k, v) in enumerate(recs)]
           for (kind, p), recs in w.records.items()}
    keys = sorted(per)
    share = max(1, batch_max // max(1, len(keys)))
    batches = []
    for start in range(0, max((len(v) for v in per.values()), default=0), share):
        batch = [r for k in keys for r in per[k][start:start + share]]
        if batch:
            batches.append(batch)
    return batches, {k: len(v) for k, v in per.items()}


def live_stream(customers: int, seed: int, start_ms: int, s: Settings, warm: int, n: int,
                next_offset: dict[tuple[str, int], int]
                ) -> tuple[list[RawRecord], list[RawRecord]]:
    """Fresh events of the same customers at wall-clock pace: ``warm`` at 7,200/s, then
    ``n`` at 5,000/s, numbered after the backlog's offsets."""
    topic = _topics(s)
    fresh = wl.live_records(warm + n, customers, seed + 7919, start_ms, s.partitions)
    first, nxt = wl.at_wall_pace(fresh[:warm], start_ms, WARM_RATE)
    second, _ = wl.at_wall_pace(fresh[warm:], nxt, LIVE_RATE)
    offsets = dict(next_offset)
    out = []
    for rec in first + second:
        key = (topic[rec.kind], rec.partition)
        off = offsets.get(key, 0)
        offsets[key] = off + 1
        out.append(RawRecord(key[0], rec.partition, off, rec.key, rec.value, 0))
    return out[:warm], out[warm:]


def _profile_meaning(blob: bytes) -> Any:
    """A stored profile as what it says, whatever the encoding of its label state."""
    p = Profile.from_bytes(blob)
    return dataclasses.replace(p, labels=LabelState.from_dict(p.labels))  # type: ignore[arg-type]


def digest(store: MemoryFeatureStore, published: Sequence[tuple[str, bytes | None, bytes]]
           ) -> str:
    """A hash of everything the batches wrote and published (profiles by their content)."""
    h = hashlib.blake2b(digest_size=8)
    for table in (store.customers, store.tables, store.meta):
        for key in sorted(table, key=repr):
            h.update(repr((key, table[key])).encode())
    for key in sorted(store.profiles, key=repr):
        h.update(repr((key, _profile_meaning(store.profiles[key]))).encode())
    for rec in published:
        h.update(repr(rec).encode())
    return h.hexdigest()


async def read_back(store: RedisFeatureStore, partitions: int) -> MemoryFeatureStore:
    """What a Redis store holds, as the in-memory twin would hold it after the same
    commits (for :func:`digest`; outboxes and logs are left out, as there)."""
    mem = MemoryFeatureStore()
    r, keys = store.r, store.keys
    for p in range(partitions):
        meta = await r.hgetall(keys.meta(p))
        if meta:
            mem.meta[p] = {k.decode(): int(v) for k, v in meta.items()
                           if k.decode() not in ("swept",)}
        ids = sorted(x.decode() for x in await r.smembers(keys.ids(p)))
        for cid in ids:
            blob = await r.get(keys.customer(p, cid))
            if blob is not None:
                mem.customers[(p, cid)] = blob
            prof = await r.get(keys.profile(p, cid))
            if prof is not None:
                mem.profiles[(p, cid)] = prof
        head = keys.table(p, "")
        async for key in r.scan_iter(match=f"{head}*", count=1000):
            name = key.decode()[len(head):]
            if ":" in name or name in ("meta", "outbox", "ids"):
                continue  # customers' keys (c:, s:) and the partition's own
            table = await r.hgetall(key)
            if table:
                mem.tables[(p, name)] = {k.decode(): int(v) for k, v in table.items()}
    return mem


async def _timed(bp: BatchProcessor, batches: Sequence[Sequence[RawRecord]], name: str,
                 prof: cProfile.Profile | None) -> Result:
    assert isinstance(bp.publisher, _Published)
    assert isinstance(bp.store, MemoryFeatureStore | RedisFeatureStore)
    await bp.drain()  # what the untimed batches commit and publish is not this part's
    bp.publisher.records.clear()
    applied = migrations = dead = 0
    spent = {"load": 0.0, "commit": 0.0}

    def on_redis(op: str, seconds: float, ok: bool) -> None:
        spent[op] = spent.get(op, 0.0) + seconds

    bp.on_redis = on_redis
    trips = bp.store.roundtrips
    w0, t0 = time.perf_counter(), time.process_time()
    if prof is not None:
        prof.enable()
    for batch in batches:
        stats = await bp.process(batch)
        applied += stats.applied
        migrations += stats.migrations
        dead += sum(stats.dead_letters.values())
    await bp.drain()
    if prof is not None:
        prof.disable()
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    trips = bp.store.roundtrips - trips
    bp.on_redis = None
    store = bp.store
    if isinstance(store, RedisFeatureStore):
        store = await read_back(store, bp.settings.partitions)
    return Result(name, sum(len(b) for b in batches), len(batches), cpu, applied,
                  migrations, len(bp.publisher.records), dead,
                  digest(store, bp.publisher.records), wall, spent["load"],
                  spent["commit"], trips)


async def run(events: int, customers: int, *, seed: int = 1, live: int = 0, warm: int = 0,
              live_batch: int = 120, models: bool = True,
              prof: cProfile.Profile | None = None, redis_url: str | None = None,
              background: bool = False, sketch_every: int = 1) -> Result:
    """Time the backlog or, with ``live``, the live stream after an untimed backlog;
    with ``redis_url``, against a Redis store on that server (its keys deleted after)."""
    if redis_url is None:
        return await _run(Settings(), MemoryFeatureStore(), events, customers, seed=seed,
                          live=live, warm=warm, live_batch=live_batch, models=models,
                          prof=prof, background=background, sketch_every=sketch_every)
    s = load_settings(redis_url=redis_url,
                      redis_prefix=f"profile-{hashlib.blake2b(os.urandom(8)).hexdigest()[:8]}:")
    client = redis_client(s)
    try:
        return await _run(s, RedisFeatureStore(client, s.redis_prefix), events, customers,
                          seed=seed, live=live, warm=warm, live_batch=live_batch,
                          models=models, prof=prof, background=background,
                          sketch_every=sketch_every)
    finally:
        await client.aclose()
        sync = redis_sync_client(s)
        try:
            delete_matching(sync, f"{s.redis_prefix}*")
        finally:
            sync.close()


async def _run(s: Settings, store: MemoryFeatureStore | RedisFeatureStore, events: int,
               customers: int, *, seed: int, live: int, warm: int, live_batch: int,
               models: bool, prof: cProfile.Profile | None, background: bool = False,
               sketch_every: int = 1) -> Result:
    w = wl.build(events, customers, seed, s.partitions)
    batches, offsets = backlog_batches(w, s, s.batch_max)
    warm_recs, live_recs = live_stream(customers, seed, w.last_ts + 1, s, warm, live, offsets)
    newest = max([w.last_ts, *(orjson.loads(r.value or b"{}").get("ts", 0)
                               for r in live_recs[-1:])])
    wall_s = newest / 1000 + 86_400.0  # a fixed wall clock: nothing is "from the future"
    served = build(customers=1000, days=90, seed=11, with_models=models)
    ctx = served.ctx
    scoring = _Scoring(s, store, ctx.catalogue, ctx.actions, models=ctx.models,
                       clv_model=ctx.clv, clock=lambda: wall_s,
                       personas=ctx.personas if models else None)
    scoring.every = sketch_every
    bp = BatchProcessor(s, store, _Published(), clock=lambda: wall_s, scoring=scoring,
                        background_publish=background, background_commit=background,
                        check_partitions=True)
    tune_gc(s)
    if not live:
        return await _timed(bp, batches, "backlog", prof)
    for batch in batches:
        await bp.process(batch)
    for k in range(0, len(warm_recs), s.batch_max):
        await bp.process(warm_recs[k:k + s.batch_max])
    scoring.every = LIVE_REFRESH_BATCHES
    live_batches = [live_recs[k:k + live_batch] for k in range(0, len(live_recs), live_batch)]
    return await _timed(bp, live_batches, "live", prof)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=60_000)
    p.add_argument("--customers", type=int, default=6_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--live", type=int, default=0,
                   help="time this many live events after the (untimed) backlog")
    p.add_argument("--warm", type=int, default=72_000,
                   help="live events at 7,200/s before the timed ones")
    p.add_argument("--live-batch", type=int, default=120)
    p.add_argument("--no-models", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile the timed part")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sort", default="tottime", choices=("tottime", "cumulative", "ncalls"),
                   help="order of the cProfile table")
    p.add_argument("--redis", metavar="URL", default=None,
                   help="run against a Redis store on this server instead of in memory")
    p.add_argument("--commit-in-background", action="store_true",
                   help="commit and publish each batch while the next one is loaded and "
                        "evaluated, as a worker does (SEGSTREAM_COMMIT_IN_BACKGROUND)")
    p.add_argument("--sketch-every", type=int, default=1, metavar="N",
                   help="re-read the RFM sketch every N backlog batches (a worker reads it "
                        "on a timer). Committing in the background, a re-read may or may "
                        "not see the commit in flight, so the digest of a run against Redis "
                        "equals the in-memory one's only when nothing is re-read: give a "
                        "number larger than the batches")
    a = p.parse_args(argv)
    prof = cProfile.Profile() if a.profile else None
    r = asyncio.run(run(a.events, a.customers, seed=a.seed, live=a.live, warm=a.warm,
                        live_batch=a.live_batch, models=not a.no_models, prof=prof,
                        redis_url=a.redis, background=a.commit_in_background,
                        sketch_every=a.sketch_every))
    print(f"{r.workload}: {r.events:,} events in {r.batches} batches, "
          f"{r.us_per_event:.1f} CPU us/event; {r.migrations:,} migrations, "
          f"{r.published:,} records published, {r.dead_letters} dead letters; "
          f"digest {r.digest}")
    if a.redis:
        print(f"  against Redis: {r.per_event(r.wall_s):.1f} wall us/event "
              f"({r.per_event(r.wall_s - r.cpu_s):.1f} more than CPU), of which loads "
              f"{r.per_event(r.load_s):.1f} and commits {r.per_event(r.commit_s):.1f}"
              f"{' (in the background)' if a.commit_in_background else ''}; "
              f"{r.roundtrips / max(1, r.batches):.2f} round trips per batch")
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(a.sort).print_stats(a.top)
        print(buf.getvalue())


if __name__ == "__main__":
    main()
