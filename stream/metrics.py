"""Prometheus metrics of one worker, in a registry of their own.

The engine calls the method-style helpers; ``/metrics`` serves :meth:`EngineMetrics.render`.
Every family carries the ``segstream_`` prefix; :data:`METRIC_NAMES` lists every sample name a
scrape can show, so alert rules and dashboards can be checked against it.

>>> m = EngineMetrics()
>>> m.events_in("clickstream", 3)
>>> m.migration("rfm", "Loyal", "At Risk", latency_s=0.12)
>>> body, content_type = m.render()
>>> b'segstream_events_in_total{topic="clickstream"} 3.0' in body
True
>>> b"segstream_migrations_total" in body and content_type.startswith("text/plain")
True
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import metrics as _prom_metrics

PREFIX = "segstream_"
# The classic text format every Prometheus 2.x and 3.x server parses; ``generate_latest`` writes
# exactly this (names are plain ASCII, so the 1.0.0 escaping rules change nothing).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# End-to-end latency runs from a few milliseconds (hot path) to seconds (batching) and, while
# an output topic refuses records or a backlog is worked off, minutes to hours; the buckets
# are fine enough for p50/p95/p99 anywhere between 5 ms and 10 s, and a delay of an hour
# still reads as an hour, not as the largest bucket.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 2400.0,
    3600.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 50000)
BATCH_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
LOOP_LAG_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
STAGE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
GC_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
REDIS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)

# (kind, name without prefix, help, labels)
_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("counter", "events_in", "Records consumed from the input topics.", ("topic",)),
    ("counter", "dlq_records",
     "Records judged dead letters, by reason (published to the dead-letter topic through "
     "the outbox).", ("reason",)),
    ("counter", "events_skipped",
     "Input records not applied: a duplicate of an event applied before (same event_id "
     "within the allowed lateness), or a redelivery at or below the partition's watermark "
     "(already applied).", ("reason",)),
    ("counter", "events_unaligned",
     "Input records a batch took past the event-time cut of the catch-up alignment "
     "(SEGSTREAM_ALIGN_WAIT_S): a partition behind whose fetch did not come in time, or a "
     "full inbox.", ()),
    ("gauge", "input_partitions_paused",
     "Input partitions whose fetching is paused because many of their records wait past "
     "the event-time cut (the others are behind).", ()),
    ("counter", "publish_failures",
     "Outbox records a publish to Kafka failed to deliver (they stay in the outbox and are "
     "published again).", ()),
    ("histogram", "batch_size", "Records per micro-batch.", ()),
    ("histogram", "batch_seconds", "Seconds to process one micro-batch.", ()),
    ("histogram", "batch_wait_seconds",
     "Seconds from the oldest record's Kafka timestamp to the start of its micro-batch "
     "(produce, fetch, waiting and gathering).", ()),
    ("histogram", "event_loop_lag_seconds",
     "Seconds later than asked that the worker's event loop woke a periodic check "
     "(code holding the loop delays everything else).", ()),
    ("histogram", "batch_stage_seconds",
     "Seconds each stage of a micro-batch took: decode, refresh (scoring inputs), load, "
     "evaluate, publish_wait (the previous batch's background work: its publish, and its "
     "commit when committing in the background), commit (when committing in the "
     "background, from sending it to its answer, overlapping the next batch), and publish "
     "when the outbox is not published in the background.", ("stage",)),
    ("histogram", "gc_pause_seconds",
     "Seconds each garbage collection held the worker's process, by the oldest generation "
     "it collected (0 young ... 2 full).", ("generation",)),
    ("histogram", "sweep_step_seconds",
     "Seconds each timer-sweep step held the worker (load, evaluate and commit of a chunk "
     "of customers); batches wait for a step in progress.", ()),
    ("counter", "sweep_customers", "Customers re-evaluated by timer sweeps.", ()),
    ("counter", "commit_conflicts",
     "Partition commits refused by the version fence (another owner moved on).", ()),
    ("histogram", "migration_latency_seconds",
     "Seconds from event ingestion (Kafka record timestamp) to migration publish.", ()),
    ("gauge", "consumer_lag", "Records behind the log end, per partition.",
     ("topic", "partition")),
    ("histogram", "redis_roundtrip_seconds", "Seconds per Redis round trip.", ("op",)),
    ("counter", "redis_errors", "Failed Redis round trips.", ("op",)),
    ("gauge", "segment_customers",
     "Customers in each segment, deployment-wide (every worker exports the same count: "
     "aggregate with max, not sum).", ("scheme", "segment")),
    ("counter", "migrations", "Segment migrations published.",
     ("scheme", "from_segment", "to_segment")),
    ("gauge", "model_auc", "Rolling (prequential) ROC AUC per model.", ("model",)),
    ("gauge", "model_log_loss", "Rolling (prequential) log loss per model.", ("model",)),
    ("gauge", "model_examples", "Labelled examples a model has learned from.", ("model",)),
    ("counter", "model_drift_alarms", "Drift alarms raised per model.", ("model",)),
    ("gauge", "model_version", "Version number of the model in use.", ("model",)),
    ("gauge", "action_exposures", "Customers exposed per action, segment and arm, deployment-wide.",
     ("action", "segment", "arm")),
    ("gauge", "action_conversions", "Conversions per action, segment and arm, deployment-wide.",
     ("action", "segment", "arm")),
    ("gauge", "action_lift",
     "Relative lift of the treated arm over the holdout per action and segment, "
     "deployment-wide.",
     ("action", "segment")),
    ("gauge", "action_uplift",
     "Absolute uplift (treated rate minus holdout rate) per action and segment, "
     "deployment-wide.",
     ("action", "segment")),
    ("gauge", "engine_now_seconds",
     "Engine event time (largest accepted event ts), epoch s; NaN until the first event.", ()),
    ("gauge", "outbox_pending",
     "Records in the outbox of this worker's partitions not yet acknowledged by Kafka: "
     "migrations, dead letters and learner examples.", ()),
    ("gauge", "worker_up", "1 while the worker process runs.", ()),
    ("gauge", "worker_ready", "1 when Kafka and Redis are reachable and partitions assigned.", ()),
    ("gauge", "partitions_assigned", "Input partitions assigned to this worker.", ()),
    ("gauge", "rules_info",
     "The segment catalogue and the actions file this worker evaluates with: one series "
     "of value 1 whose labels are their versions (workers showing different versions run "
     "different rules).", ("catalogue", "actions")),
    ("counter", "rules_reload_failures",
     "Edits of the segment catalogue or the actions file refused at reload (the rules "
     "loaded before keep running; the worker's log names the error).", ()),
    ("gauge", "kafka_fetch_min_bytes",
     "fetch.min.bytes the worker's consumer asks the broker for: it follows the input rate "
     "when SEGSTREAM_KAFKA_FETCH_COALESCE_MS is set, else 1.", ()),
)

_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}

#: Family name (as configured) -> kind: ``counter``, ``gauge`` or ``histogram``.
METRIC_TYPES: dict[str, str] = {PREFIX + name: kind for kind, name, _, _ in _FAMILIES}


def sample_names(types: Mapping[str, str]) -> frozenset[str]:
    """Every sample name a scrape of these families can show (``_total`` for counters,
    ``_bucket``/``_sum``/``_count`` for histograms, the plain name for gauges)."""
    return frozenset(family + suffix for family, kind in types.items()
                     for suffix in _SUFFIXES[kind])


#: Every sample name a scrape of the worker can show.
METRIC_NAMES: frozenset[str] = sample_names(METRIC_TYPES)

ARMS = ("treated", "holdout")

#: Every reason a record is dead-lettered for (``Rejection`` in stream/schemas.py and
#: stream/pipeline.py), every reason one is skipped, and the Redis round trips timed.
DLQ_REASONS = ("not_utf8", "not_json", "empty", "invalid_schema", "too_large", "key_mismatch",
               "currency", "unknown_topic", "too_late", "from_future", "wrong_partition",
               "processing_error")
SKIP_REASONS = ("duplicate", "below_watermark")
REDIS_OPS = ("load", "commit", "read")


def no_created_series() -> None:
    # ``*_created`` series double the series count and nothing here reads them.
    _prom_metrics.disable_created_metrics()  # type: ignore[no-untyped-call]


def observe_many(hist: Any, values: Sequence[float]) -> None:
    """``hist.observe(v)`` for every value, with one increment per bucket touched.

    ``Histogram.observe`` takes two locks per value (the sum's and a bucket's); a batch
    publishes hundreds of migrations at once. The values land in the buckets ``observe``
    puts them in (the first upper bound not below the value); a client without the
    internals read here observes them one by one.
    """
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets) or any(
            v != v for v in values):
        for v in values:
            hist.observe(v)
        return
    if not values:
        return
    check = getattr(hist, "_raise_if_not_observable", None)
    if check is not None:
        check()  # a labelled histogram's parent takes no observations, as observe() says
    counts = [0] * len(bounds)
    acc = 0.0
    for v in values:
        i = bisect_left(bounds, v)
        if i < len(counts):  # past the last bound (never: it is +Inf) observe counts nowhere
            counts[i] += 1
        acc += v
    total.inc(acc)
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


class EngineMetrics:
    """Every metric the engine exposes, owned by a private registry."""

    def __init__(self) -> None:
        no_created_series()
        self.registry = CollectorRegistry(auto_describe=True)
        self._m: dict[str, Any] = {}
        buckets = {
            "batch_size": BATCH_SIZE_BUCKETS,
            "batch_seconds": BATCH_SECONDS_BUCKETS,
            "batch_wait_seconds": LATENCY_BUCKETS,
            "event_loop_lag_seconds": LOOP_LAG_BUCKETS,
            "gc_pause_seconds": GC_BUCKETS,
            "batch_stage_seconds": STAGE_BUCKETS,
            "sweep_step_seconds": STAGE_BUCKETS,
            "migration_latency_seconds": LATENCY_BUCKETS,
            "redis_roundtrip_seconds": REDIS_BUCKETS,
        }
        for kind, name, doc, labels in _FAMILIES:
            full = PREFIX + name
            if kind == "counter":
                self._m[name] = Counter(full, doc, labels, registry=self.registry)
            elif kind == "gauge":
                self._m[name] = Gauge(full, doc, labels, registry=self.registry)
            else:
                self._m[name] = Histogram(
                    full, doc, labels, buckets=buckets[name], registry=self.registry
                )
        self._drift_seen: dict[str, float] = {}
        #: collections noted by :meth:`observe_gc`, not yet in the histogram
        self._gc_pending: deque[tuple[int, float]] = deque(maxlen=100_000)
        self._labels_set: dict[str, set[tuple[str, ...]]] = {}
        self._m["worker_up"].set(1)
        # Unknown until the first event: 0 would read as 1970 (56 years behind the clock).
        self._m["engine_now_seconds"].set(float("nan"))

    def prime(self, input_topics: Iterable[str]) -> None:
        """Export every label value known in advance at 0. A labelled counter's series
        otherwise appears at its first increment, which Prometheus takes as its starting
        value: a first burst of 300 dead letters of a new reason showed as no increase at
        all, to the DLQ-rate alert and the dashboard."""
        for topic in input_topics:
            self._m["events_in"].labels(topic)
        for reason in DLQ_REASONS:
            self._m["dlq_records"].labels(reason)
        for reason in SKIP_REASONS:
            self._m["events_skipped"].labels(reason)
        for op in REDIS_OPS:
            self._m["redis_errors"].labels(op)
            self._m["redis_roundtrip_seconds"].labels(op)

    # -- ingestion -------------------------------------------------------------------------
    def events_in(self, topic: str, n: int = 1) -> None:
        """Count ``n`` records consumed from ``topic``."""
        if n:
            self._m["events_in"].labels(topic).inc(n)

    def dead_letter(self, reason: str, n: int = 1) -> None:
        """Count ``n`` records sent to the DLQ for ``reason``."""
        if n:
            self._m["dlq_records"].labels(reason).inc(n)

    def observe_batch(self, n: int, seconds: float, conflicts: int = 0,
                      wait_s: float | None = None) -> None:
        """Record one micro-batch of ``n`` records that took ``seconds``, started
        ``wait_s`` after its oldest record's Kafka timestamp."""
        self._take_gc()
        self._m["batch_size"].observe(n)
        self._m["batch_seconds"].observe(seconds)
        if wait_s is not None:
            # A producer clock ahead of this host's can make it negative: count it as 0.
            self._m["batch_wait_seconds"].observe(max(0.0, wait_s))
        if conflicts:
            self.commit_conflicts(conflicts)

    def commit_conflicts(self, n: int) -> None:
        """Count commits refused by the version fence outside a batch's own stats (the
        background commit of a batch)."""
        self._m["commit_conflicts"].inc(n)

    def observe_loop_lag(self, seconds: float) -> None:
        """Record how late the event loop ran a periodic check (``stream.watchdog``)."""
        self._m["event_loop_lag_seconds"].observe(max(0.0, seconds))

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one stage of a micro-batch (``BatchProcessor.on_stage``)."""
        self._m["batch_stage_seconds"].labels(stage).observe(max(0.0, seconds))

    def observe_sweep_step(self, customers: int, seconds: float) -> None:
        """Record one timer-sweep step over ``customers`` that held the worker ``seconds``."""
        self._m["sweep_step_seconds"].observe(max(0.0, seconds))
        if customers:
            self._m["sweep_customers"].inc(customers)

    def observe_gc(self, generation: int, seconds: float) -> None:
        """Note one garbage collection of ``generation`` that took ``seconds``.

        Safe to call from :data:`gc.callbacks`: a collection can start anywhere, even while
        this thread holds a metric's lock for a scrape, so it only appends to a queue
        (no lock); the histogram takes the queue at the next batch or scrape.
        """
        self._gc_pending.append((generation, seconds))

    def _take_gc(self) -> None:
        pending = self._gc_pending
        hist = self._m["gc_pause_seconds"]
        while pending:
            generation, seconds = pending.popleft()
            hist.labels(str(generation)).observe(max(0.0, seconds))

    # -- migrations ------------------------------------------------------------------------
    def migration(
        self, scheme: str, frm: str | None, to: str, latency_s: float | None = None,
        count: int = 1,
    ) -> None:
        """Count ``count`` published migrations of one move; ``latency_s`` is one
        ingestion-to-publish time, observed once (see :meth:`observe_latency`)."""
        self._m["migrations"].labels(scheme, frm or "", to).inc(count)
        if latency_s is not None and latency_s >= 0:
            self._m["migration_latency_seconds"].observe(latency_s)

    def observe_latency(self, seconds: float) -> None:
        """Record one ingestion-to-publish latency without counting a migration."""
        if seconds >= 0:
            self._m["migration_latency_seconds"].observe(seconds)

    def observe_latencies(self, seconds: Iterable[float]) -> None:
        """:meth:`observe_latency` of each value (negative and NaN ones are left out)."""
        observe_many(self._m["migration_latency_seconds"], [s for s in seconds if s >= 0])

    # -- Kafka -----------------------------------------------------------------------------
    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        """Set the lag of one partition."""
        self._m["consumer_lag"].labels(topic, str(partition)).set(max(0, lag))
        self._labels_set.setdefault("consumer_lag", set()).add((topic, str(partition)))

    def set_lags(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Replace the lag of every partition; partitions not given are dropped."""
        rows: dict[tuple[str, ...], float] = {(t, str(p)): max(0, v) for (t, p), v in lags.items()}
        self._replace("consumer_lag", rows)

    def set_partitions_assigned(self, n: int) -> None:
        """Set the number of input partitions this worker owns."""
        self._m["partitions_assigned"].set(n)

    def set_fetch_min_bytes(self, n: int) -> None:
        """Set the minimum fetch size the worker's consumer asks for now."""
        self._m["kafka_fetch_min_bytes"].set(n)

    # -- Redis -----------------------------------------------------------------------------
    def observe_redis(self, seconds: float, op: str = "commit") -> None:
        """Record one Redis round trip of ``seconds``."""
        self._m["redis_roundtrip_seconds"].labels(op).observe(seconds)

    def redis_error(self, op: str = "commit") -> None:
        """Count one failed Redis round trip."""
        self._m["redis_errors"].labels(op).inc()

    @contextmanager
    def redis_call(self, op: str = "commit") -> Iterator[None]:
        """Time a Redis round trip; an exception counts as an error and propagates."""
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self.redis_error(op)
            raise
        finally:
            self.observe_redis(time.perf_counter() - start, op)

    # -- segments, models, actions ---------------------------------------------------------
    def set_segment_sizes(self, sizes: Mapping[str, Mapping[str, int]]) -> None:
        """Replace the segment populations: ``{scheme: {segment: count}}``."""
        rows: dict[tuple[str, ...], float] = {
            (s, seg): n for s, segs in sizes.items() for seg, n in segs.items()
        }
        self._replace("segment_customers", rows)

    def set_model_quality(self, model: str, quality: Mapping[str, Any]) -> None:
        """Publish a model's quality.

        Keys used (all optional): ``auc``, ``log_loss``, ``examples``, ``version`` and
        ``drift_alarms`` (a running total; the counter follows it).
        """
        for key, name in (("auc", "model_auc"), ("log_loss", "model_log_loss"),
                          ("examples", "model_examples"), ("version", "model_version")):
            value = _number(quality.get(key))
            if value is not None:
                self._m[name].labels(model).set(value)
            elif key in ("auc", "log_loss") and key in quality:
                # Unknown right now (e.g. one class in the window): NaN, never a stale value.
                self._m[name].labels(model).set(math.nan)
        total = _number(quality.get("drift_alarms"))
        counter = self._m["model_drift_alarms"].labels(model)
        if total is not None:
            delta = total - self._drift_seen.get(model, 0.0)
            if delta > 0:
                counter.inc(delta)
            self._drift_seen[model] = max(total, self._drift_seen.get(model, 0.0))

    def drift_alarm(self, model: str) -> None:
        """Count one drift alarm of ``model``."""
        self._m["model_drift_alarms"].labels(model).inc()
        self._drift_seen[model] = self._drift_seen.get(model, 0.0) + 1

    def set_action_lift(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Replace action results from ``GET /actions`` rows.

        Rows are flat as ``segstream actions --json`` prints them (``treated_exposed``,
        ``holdout_converted``, ``uplift``, ``relative_lift``, ...); rows with nested arms
        (``treated: {"exposed", "converted"}``, ``lift``) are read too.
        """
        exposures: dict[tuple[str, ...], float] = {}
        conversions: dict[tuple[str, ...], float] = {}
        lift: dict[tuple[str, ...], float] = {}
        uplift: dict[tuple[str, ...], float] = {}
        for row in rows:
            key = (str(row["action_id"]), str(row.get("segment") or ""))
            for arm in ARMS:
                exposed, converted = _arm(row, arm)
                exposures[(*key, arm)] = exposed
                conversions[(*key, arm)] = converted
            for value, dst in ((row.get("relative_lift", row.get("lift")), lift),
                               (row.get("uplift"), uplift)):
                number = _number(value)
                if number is not None:
                    dst[key] = number
        self._replace("action_exposures", exposures)
        self._replace("action_conversions", conversions)
        self._replace("action_lift", lift)
        self._replace("action_uplift", uplift)

    # -- engine state ----------------------------------------------------------------------
    def set_engine_now(self, now_ms: int | None) -> None:
        """Set the engine's event time (epoch milliseconds)."""
        if now_ms is not None:
            self._m["engine_now_seconds"].set(now_ms / 1000.0)

    def skipped(self, reason: str, n: int) -> None:
        """Count ``n`` input records not applied for ``reason``."""
        if n:
            self._m["events_skipped"].labels(reason).inc(n)

    def observe_inbox(self, unaligned: int, paused: int) -> None:
        """Count ``unaligned`` more records taken past the cut; ``paused`` partitions now."""
        if unaligned:
            self._m["events_unaligned"].inc(unaligned)
        self._m["input_partitions_paused"].set(paused)

    def publish_failed(self, n: int) -> None:
        """Count ``n`` outbox records a publish failed to deliver."""
        if n:
            self._m["publish_failures"].inc(n)

    def set_outbox_pending(self, n: int) -> None:
        """Set the number of outbox records not yet acknowledged by Kafka."""
        self._m["outbox_pending"].set(n)

    def set_rules(self, catalogue: str, actions: str) -> None:
        """Set the versions of the catalogue and the actions file in use."""
        self._replace("rules_info", {(catalogue, actions): 1.0})

    def rules_reload_failed(self) -> None:
        """Count an edit of the rules refused at reload."""
        self._m["rules_reload_failures"].inc()

    def set_worker_state(self, *, up: bool = True, ready: bool) -> None:
        """Set the worker's liveness and readiness."""
        self._m["worker_up"].set(1 if up else 0)
        self._m["worker_ready"].set(1 if ready else 0)

    # -- exposition ------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        self._take_gc()
        return generate_latest(self.registry), CONTENT_TYPE

    def _replace(self, name: str, rows: Mapping[tuple[str, ...], float]) -> None:
        # Label sets that disappear (revoked partitions, emptied segments) must stop
        # being exported, not linger at their last value.
        metric = self._m[name]
        for stale in self._labels_set.get(name, set()) - set(rows):
            metric.remove(*stale)
        for labels, value in rows.items():
            metric.labels(*labels).set(value)
        self._labels_set[name] = set(rows)


def _arm(row: Mapping[str, Any], arm: str) -> tuple[float, float]:
    """``(exposed, converted)`` of one arm of an action row, flat or nested."""
    nested = row.get(arm)
    stats = nested if isinstance(nested, Mapping) else {}
    exposed = row.get(f"{arm}_exposed", stats.get("exposed"))
    converted = row.get(f"{arm}_converted", stats.get("converted"))
    return _number(exposed) or 0.0, _number(converted) or 0.0


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN is "unknown"
