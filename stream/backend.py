"""The worker's implementation of the HTTP API backend and its metrics upkeep."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from features.state import iso
from stream import queries
from stream.metrics import EngineMetrics
from stream.pipeline import BatchStats, OutboxRecord
from stream.redact import describe
from stream.web import is_outage

if TYPE_CHECKING:
    from stream.app import Engine

log = logging.getLogger(__name__)

#: Samples of history kept for the dashboard (one every STATS_INTERVAL_S).
HISTORY = 180
STATS_INTERVAL_S = 2.0
#: API requests reading Redis at once; more wait their turn. The worker's client holds at
#: most its pool's connections (redis-py refuses one more at once rather than wait), and
#: the batches, sweeps and outbox share them: hundreds of clients at once used to take
#: them all, so requests answered 503 and commits failed while Redis was healthy.
API_READS = 16

#: Seconds a worker's batch commits may keep failing before ``/readyz`` says it is not
#: ready, while Redis still answers pings: a Redis out of memory (``noeviction``), a
#: replica left read-only after a failover, a disk error stopping writes (``MISCONF``) or
#: an ACL narrowed under the worker. Shorter failures are a blip the retries ride out.
COMMITS_FAILING_S = 30.0
#: Seconds the outbox of one of a worker's partitions may keep records that Kafka did not
#: take before ``/readyz`` says it is not ready: an output topic deleted or refusing its
#: records (``max.message.bytes``, an ACL), or brokers that take nothing. Migrations then
#: wait in the stored outbox (``segstream_outbox_pending``) and go out once Kafka takes them.
PUBLISHES_FAILING_S = 30.0


class EngineBackend:
    """Answers the API from Redis and keeps the dashboard's recent history in memory."""

    def __init__(self, engine: Engine, metrics: EngineMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.throughput: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self.segment_history: dict[str, collections.deque[dict[str, Any]]] = {}
        self.model_history: dict[str, collections.deque[dict[str, Any]]] = {}
        self.flows: dict[str, dict[tuple[str | None, str], int]] = {}
        self._counts = {"events": 0, "migrations": 0, "dlq": 0}
        self._last: tuple[float, dict[str, int]] | None = None
        self.lags: dict[tuple[str, int], int] = {}
        self.segment_sizes: dict[str, dict[str, int]] = {}
        self.actions_rows: list[dict[str, Any]] = []
        self._reads = asyncio.Semaphore(API_READS)
        #: monotonic time of the first failed commit since the last one that succeeded
        self._commits_failing_since: float | None = None
        self.clock: Any = time.monotonic

    # -- hooks called by the engine ------------------------------------------------------
    def on_batch(self, records_by_topic: dict[str, int], stats: BatchStats,
                 seconds: float, wait_s: float | None = None) -> None:
        for topic, n in records_by_topic.items():
            self.metrics.events_in(topic, n)
        self._counts["events"] += stats.records
        for reason, n in stats.dead_letters.items():
            self.metrics.dead_letter(reason, n)
            self._counts["dlq"] += n
        self.metrics.skipped("duplicate", stats.duplicates)
        self.metrics.skipped("below_watermark", stats.skipped_below_watermark)
        self.metrics.observe_batch(stats.records, seconds, stats.conflicts, wait_s)

    def on_redis(self, op: str, seconds: float, ok: bool) -> None:
        self.metrics.observe_redis(seconds, op)
        if not ok:
            self.metrics.redis_error(op)
        if op == "commit":
            if ok:
                self._commits_failing_since = None
            elif self._commits_failing_since is None:
                self._commits_failing_since = self.clock()

    def on_published(self, records: Sequence[OutboxRecord]) -> None:
        topic = self.engine.settings.migrations_topic
        wall_ms = time.time() * 1000
        latencies: list[float] = []
        moves: dict[tuple[str, str | None, str], int] = {}
        for rec in records:
            if rec.topic != topic:
                continue
            move = rec.move
            if move is None:  # written before outbox records carried their move
                m = orjson.loads(rec.value)
                move = (m["scheme"], m["from_segment"], m["to_segment"])
            moves[move] = moves.get(move, 0) + 1
            if rec.ingested_ms:
                latencies.append((wall_ms - rec.ingested_ms) / 1000)
        self.metrics.observe_latencies(latencies)
        # Counted once per move: a labelled counter's lookup costs more than its increment.
        for (scheme, frm, to), n in moves.items():
            self.metrics.migration(scheme, frm, to, count=n)
            flows = self.flows.setdefault(scheme, {})
            flows[(frm, to)] = flows.get((frm, to), 0) + n
            self._counts["migrations"] += n

    # -- periodic upkeep -----------------------------------------------------------------
    async def sample(self) -> None:
        """Refresh gauges and append one history sample.

        The worker's own figures (lag, partitions, throughput, readiness, model quality)
        come first: a Redis outage fails the reads after them, and must not freeze them
        (readiness then reads 0, as ``/readyz`` says).
        """
        e = self.engine
        store, r = e.store, e.redis
        if store is None or r is None:
            return
        s = e.settings
        t = time.time()
        self.lags = e.consumer_lags()
        self.metrics.set_lags(self.lags)
        owned = e.owned_partitions()
        self.metrics.set_partitions_assigned(len(owned))
        self.metrics.set_fetch_min_bytes(e.fetch_min_bytes())
        counts = dict(self._counts)
        if self._last is not None:
            dt = max(1e-6, t - self._last[0])
            prev = self._last[1]
            self.throughput.append({
                "t": int(t * 1000),
                "events_in_per_s": (counts["events"] - prev["events"]) / dt,
                "migrations_per_s": (counts["migrations"] - prev["migrations"]) / dt,
                "dlq_per_s": (counts["dlq"] - prev["dlq"]) / dt,
                "lag": sum(self.lags.values()),
            })
        self._last = (t, counts)
        for name, q in e.model_quality().items():
            self.metrics.set_model_quality(name, q)
            self.model_history.setdefault(name, collections.deque(maxlen=HISTORY)).append(
                {"t": int(t * 1000), "auc": q.get("auc"), "log_loss": q.get("log_loss")})
        # Scrapers see readiness without anyone probing /readyz.
        ready, _ = await self.ready()
        self.metrics.set_worker_state(ready=ready)
        try:
            await self._sample_redis(s, store, r, owned, t)
        except Exception:
            self.metrics.set_worker_state(ready=False)
            raise

    async def _sample_redis(self, s: Any, store: Any, r: Any, owned: list[int],
                            t: float) -> None:
        with self.metrics.redis_call("read"):
            seg = await queries.segments_doc(s, r, store, self._schemes())
            acts = await queries.actions_doc(s, store)
        self.segment_sizes = seg["schemes"]
        self.actions_rows = acts["actions"]
        self.metrics.set_segment_sizes(self.segment_sizes)
        self.metrics.set_action_lift(self.actions_rows)
        now = await store.now()
        if now >= 0:
            self.metrics.set_engine_now(now)
        # Only the owned partitions, so that summing over workers counts each record once.
        with self.metrics.redis_call("read"):
            async with r.pipeline(transaction=False) as pipe:
                for p in owned:
                    pipe.hlen(store.keys.outbox(p))
                pending = await pipe.execute() if owned else []
        self.metrics.set_outbox_pending(sum(int(n) for n in pending))
        for scheme, sizes in self.segment_sizes.items():
            self.segment_history.setdefault(scheme, collections.deque(maxlen=HISTORY)).append(
                {"t": int(t * 1000), "sizes": dict(sizes)})

    def _schemes(self) -> Any:
        """The live catalogue's schemes (None before the runtime is up: all of them)."""
        runtime = getattr(self.engine, "runtime", None)
        return runtime.catalogue.schemes if runtime is not None else None

    # -- ApiBackend ------------------------------------------------------------------------
    async def customer(self, customer_id: str) -> dict[str, Any] | None:
        e = self.engine
        e.ensure()
        assert e.store is not None and e.redis is not None
        async with self._reads:
            return await queries.customer_doc(e.settings, e.redis, e.store, e.runtime,
                                              customer_id)

    async def segments(self) -> dict[str, Any]:
        e = self.engine
        e.ensure()
        assert e.store is not None and e.redis is not None
        async with self._reads:
            return await queries.segments_doc(e.settings, e.redis, e.store, self._schemes())

    async def migrations(self, since: str | None, limit: int) -> dict[str, Any]:
        e = self.engine
        e.ensure()
        assert e.redis is not None
        async with self._reads:
            return await queries.migrations_doc(e.settings, e.redis, since, limit)

    async def actions(self) -> dict[str, Any]:
        e = self.engine
        e.ensure()
        assert e.store is not None
        async with self._reads:
            return await queries.actions_doc(e.settings, e.store)

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "app_id": self.engine.settings.app_id}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        e = self.engine
        checks: dict[str, Any] = {}
        try:
            e.ensure()
            assert e.redis is not None
            async with self._reads:
                checks["redis"] = bool(await e.redis.ping())
        except Exception as exc:
            checks["redis"] = False
            checks["redis_error"] = type(exc).__name__
        checks["kafka"] = e.kafka_connected()
        owned = e.owned_partitions()
        checks["partitions_assigned"] = len(owned)
        ok = bool(checks["redis"] and checks["kafka"] and checks["partitions_assigned"] > 0)
        since = self._commits_failing_since
        failing = 0.0 if since is None else self.clock() - since
        if failing >= COMMITS_FAILING_S:
            # Redis may answer pings and reads while refusing every write.
            checks["commits_failing_s"] = round(failing, 1)
            ok = False
        processor = e.processor
        publishing = processor.publish_failing_s(owned) if processor is not None else 0.0
        if publishing >= PUBLISHES_FAILING_S:
            # Kafka answers (the consumer fetches) while an output topic takes nothing.
            checks["publishes_failing_s"] = round(publishing, 1)
            ok = False
        return ok, checks

    async def stats(self) -> dict[str, Any]:
        e = self.engine
        try:
            async with self._reads:
                now = await e.store.now() if e.store is not None else -1
        except Exception as exc:
            if not is_outage(exc):
                raise
            # Everything else here is the worker's own: the dashboard keeps its charts
            # through an outage (``/readyz`` reports it); only the engine time is unknown.
            log.warning("stats without the engine time: %s", describe(exc))
            now = -1
        return {
            "as_of": iso(now) if now >= 0 else None,
            "generated_at": iso(int(time.time() * 1000)),
            "throughput": list(self.throughput),
            "lag": {"total": sum(self.lags.values()),
                    "partitions": [{"topic": t, "partition": p, "lag": n}
                                   for (t, p), n in sorted(self.lags.items())]},
            "segments": self.segment_sizes,
            "segment_history": {k: list(v) for k, v in self.segment_history.items()},
            "flows": {scheme: [{"from": f, "to": t, "count": n}
                               for (f, t), n in sorted(rows.items(), key=lambda kv: -kv[1])]
                      for scheme, rows in self.flows.items()},
            "models": [{"model": name, "version": q.get("version"), "auc": q.get("auc"),
                        "log_loss": q.get("log_loss"), "examples": q.get("examples", 0),
                        "drift_alarms": q.get("drift_alarms", 0),
                        "history": list(self.model_history.get(name, ()))}
                       for name, q in e.model_quality().items()],
            "actions": self.actions_rows,
        }
