"""Prometheus metrics of the trigger consumer (``segstream triggers --metrics-port``).

The consumer is the last hop from a segment move to a campaign: an operator needs to see
it falling behind, a webhook slowing down or rejecting, and retries piling up, as the
worker's own ``/metrics`` shows the engine. Each scrape reads the counts from the run's
:class:`~stream.triggers.TriggerStats` (one set of books) and works out the lag from the
consumer's positions and the topic's high watermarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from stream.metrics import CONTENT_TYPE, no_created_series, sample_names
from stream.web import authorized

if TYPE_CHECKING:
    from stream.triggers import TriggerRunner

log = logging.getLogger(__name__)

#: The outcomes of the migrations the consumer read, and the counts they come from.
OUTCOMES = (
    ("posted", "posted"),
    ("rejected", "rejected"),
    ("duplicate", "duplicates"),
    ("holdout", "holdout"),
    ("no_action", "no_action"),
    ("forgotten", "forgotten"),
    ("tombstone", "tombstones"),
    ("malformed", "malformed"),
)
#: Seconds a scrape waits for one partition's position before leaving its lag out.
POSITION_WAIT_S = 1.0
#: Family name -> kind, as a scrape shows them (the alert rules may use only these and the
#: worker's).
METRIC_TYPES: dict[str, str] = {
    "segstream_triggers_migrations": "counter",
    "segstream_triggers_retries": "counter",
    "segstream_triggers_offset_commits": "counter",
    "segstream_triggers_consumer_lag": "gauge",
    "segstream_triggers_webhook_seconds": "histogram",
}
METRIC_NAMES: frozenset[str] = sample_names(METRIC_TYPES)


class TriggerMetrics:
    """The consumer's metrics in a registry of their own."""

    def __init__(self, runner: TriggerRunner, consumer: AIOKafkaConsumer | None = None) -> None:
        self.runner = runner
        self.consumer = consumer
        no_created_series()
        self.registry = CollectorRegistry()
        self.webhook_seconds = Histogram(
            "segstream_triggers_webhook_seconds",
            "Seconds from sending one POST to the webhook to its answer (or its failure), "
            "every attempt.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry)
        #: per partition of the migrations topic, records not handled yet (last scrape's)
        self.lags: dict[int, int] = {}
        self.registry.register(_Counts(self))

    def observe_request(self, seconds: float) -> None:
        self.webhook_seconds.observe(seconds)

    async def refresh_lags(self) -> None:
        """Per assigned partition: the topic's high watermark as the last fetch saw it,
        less the offset of the next record to handle (a batch under way counts from the
        record being handled, not from what was fetched)."""
        consumer = self.consumer
        if consumer is None:
            return
        lags: dict[int, int] = {}
        for tp in sorted(consumer.assignment(), key=lambda t: t.partition):
            high = consumer.highwater(tp)
            if high is None:
                continue  # nothing fetched for it yet
            pos = self.runner.position.get(tp)
            if pos is None:
                with contextlib.suppress(Exception):  # a rebalance, a broker away
                    pos = await asyncio.wait_for(consumer.position(tp), POSITION_WAIT_S)
            if pos is not None:
                lags[tp.partition] = max(0, int(high) - int(pos))
        self.lags = lags

    async def exposition(self) -> bytes:
        await self.refresh_lags()
        return generate_latest(self.registry)


class _Counts:
    """A collector: the run's counts and the last lags, as they are at the scrape."""

    def __init__(self, metrics: TriggerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        stats = self.metrics.runner.stats
        moved = CounterMetricFamily(
            "segstream_triggers_migrations",
            "Migrations the trigger consumer read, by what became of them: posted (the "
            "webhook accepted), rejected (a 4xx other than 408 and 429), duplicate (marked "
            "as sent already), holdout, no_action, forgotten (the customer erased since), "
            "tombstone, malformed.", labels=("outcome",))
        for outcome, attr in OUTCOMES:
            moved.add_metric((outcome,), getattr(stats, attr))
        yield moved
        yield CounterMetricFamily(
            "segstream_triggers_retries",
            "POSTs sent again after a connection error, a timeout, a 408, 429, 3xx or 5xx.",
            value=stats.retries)
        yield CounterMetricFamily(
            "segstream_triggers_offset_commits",
            "Offset commits of the migrations topic (each after a whole batch was handled).",
            value=stats.commits)
        lag = GaugeMetricFamily(
            "segstream_triggers_consumer_lag",
            "Migrations of an assigned partition not handled yet.", labels=("partition",))
        for partition, n in sorted(self.metrics.lags.items()):
            lag.add_metric((str(partition),), n)
        yield lag


async def serve(metrics: TriggerMetrics, host: str, port: int,
                token: str | None) -> web.AppRunner:
    """Serve ``GET /metrics`` on ``host:port``; with ``token``, only to
    ``Authorization: Bearer <token>``, as the worker's. Raises :class:`OSError` when the
    address cannot be bound."""
    expected = token.encode() if token else None

    async def handle(request: web.Request) -> web.StreamResponse:
        if expected is not None and not authorized(request, expected):
            return web.json_response({"error": "missing or invalid bearer token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="segstream"'})
        body = await metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("triggers: metrics on http://%s:%d/metrics", host, port)
    return runner
