"""End-to-end latency at a fixed offered load, with an engine worker running.

Fresh events are produced at ``rate`` per second (each record's Kafka timestamp is
its send time). Two latencies are measured per input record:

* ``migration``: migration record's Kafka timestamp minus the timestamp of the input
  record named by its ``"trigger": {"topic", "partition", "offset"}``; only inputs
  that caused a migration have one.
* ``watermark``: the first time the engine's committed Redis watermark of the
  record's partition covers its offset (polled every 10 ms, so up to 10 ms late)
  minus the record's timestamp; every input record has one.

The migration latency is the headline when migrations carry triggers; otherwise
the watermark latency is, and the result says which. Each phase also reports the
watermark latency by second of the phase (``watermark_by_second``: whether a tail is
spread out or a few stalls), the time from each record batch's timestamp to the
broker's acknowledgement by the same seconds (``ack_by_second``: a second whose
latency was spent before the engine could fetch its records) and this process's own
collector pauses (``load_generator_gc``; the collector is paused while offering, see
:func:`measure`).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.workload import LiveRecord, aiokafka_config
from features.store import Keys
from stream.app import watch_gc
from stream.redisconn import SyncRedis, redis_sync_client
from stream.settings import Settings

WATERMARK_POLL_S = 0.01
AFTER_DRAIN_S = 1.5


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """p50/p95/p99 (and max) of some latencies in ms, or None without samples."""
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1),
            "p99": round(float(p99), 1), "max": round(float(a.max()), 1)}


@dataclass
class LatencyResult:
    """Latencies of one offered load."""

    offered_eps: float
    achieved_eps: float
    produced: int
    method: str
    latency_ms: dict[str, float] | None
    watermark_ms: dict[str, float] | None
    migration_ms: dict[str, float] | None
    migrations: int
    migrations_with_trigger: int
    unprocessed: int
    drain_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "offered_eps": round(self.offered_eps, 1),
            "achieved_eps": round(self.achieved_eps, 1),
            "produced": self.produced,
            "method": self.method,
            **(self.latency_ms or {}),
            "watermark_ms": self.watermark_ms,
            "migration_ms": self.migration_ms,
            "migrations": self.migrations,
            "migrations_with_trigger": self.migrations_with_trigger,
            "unprocessed": self.unprocessed,
            "drain_s": round(self.drain_s, 2),
            **self.extra,
        }


class _Watch:
    """Watermark history per input partition and migrations seen, gathered concurrently."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.keys = Keys(s.redis_prefix)
        self.topics = list(s.input_topics)
        self.hist: dict[tuple[str, int], tuple[list[float], list[int]]] = {
            (t, p): ([], []) for t in self.topics for p in range(s.partitions)
        }
        self.migrations: list[tuple[tuple[str, int, int] | None, int]] = []
        self.stop = asyncio.Event()
        self.halt = threading.Event()

    def poll_watermarks(self, r: SyncRedis) -> None:
        """Record when each partition's committed watermark moves, until :attr:`halt`.

        Run in a thread of its own: on the event loop that also produces, the poll was
        held up as the producer finished a phase (122 ms in one run) and recorded the
        coverage of the records sent just before as that much later than the engine
        committed them (their migrations were out 20 to 40 ms after them).
        """
        fields = [f"wm:{t}" for t in self.topics]
        while not self.halt.is_set():
            pipe = r.pipeline(transaction=False)
            for p in range(self.s.partitions):
                pipe.hmget(self.keys.meta(p), fields)
            rows = pipe.execute()
            now_ms = time.time() * 1000
            for p, row in enumerate(rows):
                for t, v in zip(self.topics, row, strict=True):
                    wm = -1 if v is None else int(v)
                    times, wms = self.hist[(t, p)]
                    if not wms or wm > wms[-1]:
                        times.append(now_ms)  # first: a reader bisects ``wms``
                        wms.append(wm)
            self.halt.wait(WATERMARK_POLL_S)

    def covered(self, tp: tuple[str, int], offset: int) -> float | None:
        """When the watermark of ``tp`` first reached ``offset`` (epoch ms)."""
        times, wms = self.hist[tp]
        i = bisect_left(wms, offset)
        return times[i] if i < len(wms) else None

    async def migrations_from(self, consumer: AIOKafkaConsumer) -> None:
        while not self.stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            for recs in batches.values():
                for rec in recs:
                    trig = None
                    try:
                        t = orjson.loads(rec.value).get("trigger")
                        if isinstance(t, dict):
                            trig = (str(t["topic"]), int(t["partition"]), int(t["offset"]))
                    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError,
                            ValueError):
                        pass
                    self.migrations.append((trig, rec.timestamp))


async def _offer(producer: AIOKafkaProducer, s: Settings, records: Sequence[LiveRecord],
                 rate: float, acks: list[tuple[float, float]] | None = None
                 ) -> tuple[list[tuple[str, int, int, int, int]], float]:
    """Send at ``rate`` per second; returns the record batches sent, as ``(topic,
    partition, first offset, records, timestamp ms)``, and the seconds it took.

    Records due in one tick go out as one record batch per partition (built here, as
    the Python producer's per-record ``send`` costs more CPU than the load needs),
    stamped with the tick's wall-clock time, which becomes their Kafka timestamp.
    Each acknowledged batch appends ``(timestamp ms, ms from it to the broker's
    acknowledgement)`` to ``acks``: at most the part of a record's latency spent before
    the engine could fetch it (the broker appended the batch before its acknowledgement
    reached this process).
    """
    pending: list[tuple[asyncio.Future[Any], str, int, int, int]] = []

    def track(fut: asyncio.Future[Any], ts: int) -> asyncio.Future[Any]:
        def acked(f: asyncio.Future[Any]) -> None:
            if acks is not None and not f.cancelled() and f.exception() is None:
                acks.append((ts, time.time() * 1000 - ts))

        fut.add_done_callback(acked)
        return fut

    start = time.monotonic()
    sent = 0
    while sent < len(records):
        due = min(len(records), int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            now_ms = int(time.time() * 1000)
            groups: dict[tuple[str, int], list[LiveRecord]] = {}
            for rec in records[sent:due]:
                groups.setdefault((s.topic(rec.kind), rec.partition), []).append(rec)
            for (topic, p), recs in groups.items():
                batch, count = producer.create_batch(), 0
                for rec in recs:
                    if batch.append(key=rec.key, value=rec.value, timestamp=now_ms) is None:
                        pending.append((track(await producer.send_batch(
                            batch, topic, partition=p), now_ms), topic, p, count, now_ms))
                        batch, count = producer.create_batch(), 0
                        batch.append(key=rec.key, value=rec.value, timestamp=now_ms)
                    count += 1
                pending.append((track(await producer.send_batch(batch, topic, partition=p),
                                      now_ms), topic, p, count, now_ms))
            sent = due
        await asyncio.sleep(0.002)
    await asyncio.gather(*(f for f, *_ in pending))
    produce_s = max(1e-9, time.monotonic() - start)
    return [(topic, p, fut.result().offset, count, ts)
            for fut, topic, p, count, ts in pending], produce_s


def _each_record(batches: Sequence[tuple[str, int, int, int, int]]
                 ) -> list[tuple[str, int, int, int]]:
    """``(topic, partition, offset, timestamp ms)`` of every record of ``batches``."""
    return [(topic, p, base + i, ts) for topic, p, base, count, ts in batches
            for i in range(count)]


class _GcPauses:
    """This process's garbage-collection pauses while offering: a pause of the load
    generator between stamping records and sending them counts as the engine's latency."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []  # (end epoch ms, ms, generation)

    def observe(self, generation: int, seconds: float) -> None:
        """One collection, as :func:`stream.app.watch_gc` reports it."""
        self.pauses.append((time.time() * 1000, seconds * 1000, generation))

    def summary(self, since_ms: float) -> dict[str, Any]:
        ms = [p for _, p, _ in self.pauses]
        return {"collections": len(ms), "pause_ms_total": round(sum(ms), 1),
                "pause_ms_max": round(max(ms, default=0.0), 1),
                "long": [{"second": int((end - since_ms) // 1000), "ms": round(p, 1),
                          "generation": g} for end, p, g in self.pauses if p >= 20.0]}


async def measure(s: Settings, records: Sequence[LiveRecord], rate: float, seconds: float,
                  drain_timeout: float = 120.0) -> LatencyResult:
    """Offer ``rate`` events/s for ``seconds`` to a running engine; measure latencies."""
    # This process holds the whole generated workload: a full collection traverses it
    # for 200+ ms (measured: two such pauses in every 15 s phase at 1,000,000 events),
    # stalling the producer between stamping records and sending them, and the watermark
    # poll. The heap is frozen and the collector paused while offering, so the phase
    # measures the engine; the pauses left are reported with the result.
    gc.collect()
    gc.freeze()
    gc.disable()
    pauses = _GcPauses()
    hook = watch_gc(pauses.observe)
    try:
        return await _measure(s, records, rate, seconds, drain_timeout, pauses)
    finally:
        gc.callbacks.remove(hook)
        gc.enable()
        gc.unfreeze()


async def _measure(s: Settings, records: Sequence[LiveRecord], rate: float, seconds: float,
                   drain_timeout: float, pauses: _GcPauses) -> LatencyResult:
    cfg = aiokafka_config(s)
    producer = AIOKafkaProducer(**cfg, acks="all", linger_ms=1)
    consumer = AIOKafkaConsumer(**cfg, group_id=None, enable_auto_commit=False)
    r = redis_sync_client(s)
    watch = _Watch(s)
    poller = threading.Thread(target=watch.poll_watermarks, args=(r,), daemon=True,
                              name="watermark-poll")
    await producer.start()
    await consumer.start()
    tasks: list[asyncio.Task[None]] = []
    try:
        await consumer.topics()  # metadata of every topic, the migrations topic included
        parts = consumer.partitions_for_topic(s.migrations_topic) or range(s.partitions)
        mig_tps = [TopicPartition(s.migrations_topic, p) for p in sorted(parts)]
        consumer.assign(mig_tps)
        await consumer.seek_to_end(*mig_tps)
        for tp in mig_tps:
            await consumer.position(tp)
        poller.start()
        tasks = [asyncio.create_task(watch.migrations_from(consumer))]
        await asyncio.sleep(0.2)

        n = min(len(records), int(rate * seconds))
        offer_ms = time.time() * 1000
        acks: list[tuple[float, float]] = []
        batches, produce_s = await _offer(producer, s, records[:n], rate, acks)
        # Per partition only, until every record is covered; per record comes after.
        last: dict[tuple[str, int], int] = {}
        for topic, p, base, count, _ in batches:
            last[(topic, p)] = max(last.get((topic, p), -1), base + count - 1)
        t_end = time.monotonic()
        while time.monotonic() - t_end < drain_timeout:
            if all(watch.covered(tp, off) is not None for tp, off in last.items()):
                break
            await asyncio.sleep(0.05)
        drain_s = time.monotonic() - t_end
        await asyncio.sleep(AFTER_DRAIN_S)
    finally:
        watch.stop.set()
        watch.halt.set()
        if poller.is_alive():
            poller.join()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()
        await consumer.stop()
        r.close()

    sent_ms = _each_record(batches)
    sent_at = {(topic, p, off): ts for topic, p, off, ts in sent_ms}
    wm_lat: list[float] = []
    unprocessed = 0
    for topic, p, off, ts in sent_ms:
        at = watch.covered((topic, p), off)
        if at is None:
            unprocessed += 1
        else:
            wm_lat.append(at - ts)
    mig_lat = [ts - sent_at[trig] for trig, ts in watch.migrations
               if trig is not None and trig in sent_at]
    with_trigger = sum(1 for trig, _ in watch.migrations if trig is not None)
    method = "migration_trigger" if mig_lat else "watermark"
    covered = [(ts, at - ts) for topic, p, off, ts in sent_ms
               if (at := watch.covered((topic, p), off)) is not None]
    return LatencyResult(
        offered_eps=rate, achieved_eps=n / produce_s, produced=n, method=method,
        latency_ms=percentiles(mig_lat) if mig_lat else percentiles(wm_lat),
        watermark_ms=percentiles(wm_lat), migration_ms=percentiles(mig_lat),
        migrations=len(watch.migrations), migrations_with_trigger=with_trigger,
        unprocessed=unprocessed, drain_s=drain_s,
        extra={"watermark_by_second": by_second(covered),
               "ack_by_second": by_second(acks, start=min((ts for ts, _ in covered),
                                                          default=None)),
               "load_generator_gc": pauses.summary(offer_ms)},
    )


def by_second(samples: Sequence[tuple[float, float]], start: float | None = None
              ) -> list[dict[str, float]]:
    """Latencies grouped by the second of the phase their input was sent in: whether a
    tail is spread over the phase or comes from a few stalls. ``samples`` are
    ``(sent epoch ms, latency ms)``; seconds count from ``start`` (by default the
    first sample's), so two series of one phase can be set side by side.

    >>> by_second([(1000.0, 5.0), (1500.0, 7.0), (2100.0, 300.0)])[1]
    {'second': 1, 'n': 1, 'p50': 300.0, 'p99': 300.0, 'max': 300.0}
    """
    if not samples:
        return []
    if start is None:
        start = min(ts for ts, _ in samples)
    groups: dict[int, list[float]] = {}
    for ts, lat in samples:
        groups.setdefault(int((ts - start) // 1000), []).append(lat)
    out = []
    for sec in sorted(groups):
        pct = percentiles(groups[sec])
        assert pct is not None
        out.append({"second": sec, "n": len(groups[sec]), "p50": pct["p50"],
                    "p99": pct["p99"], "max": pct["max"]})
    return out
