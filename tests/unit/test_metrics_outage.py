"""The worker's own gauges during a Redis outage, and the gauges' values before any event."""
from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from stream.backend import EngineBackend
from stream.metrics import EngineMetrics
from stream.settings import load_settings


class _Down:
    """A Redis client and store whose every call fails, as during an outage."""

    def __getattr__(self, name: str) -> Any:
        async def fail(*_a: Any, **_k: Any) -> Any:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379")

        return fail


class _Engine:
    def __init__(self) -> None:
        self.settings = load_settings()
        self.store = _Down()
        self.redis = _Down()
        self.lags = {("clickstream", 0): 2_000, ("transactions", 0): 5}
        self.processor: Any = None

    def ensure(self) -> None:
        pass

    def kafka_connected(self) -> bool:
        return True

    def consumer_lags(self) -> dict[tuple[str, int], int]:
        return dict(self.lags)

    def owned_partitions(self) -> list[int]:
        return [0]

    def fetch_min_bytes(self) -> int:
        return 1

    def model_quality(self) -> dict[str, Any]:
        return {}


def _value(metrics: EngineMetrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    assert v is not None, name
    return v


def test_a_redis_outage_does_not_freeze_lag_and_readiness() -> None:
    """worker_ready stayed 1 and consumer_lag at its last value while Redis was down: the
    Redis reads came first and their failure skipped every later gauge."""
    metrics = EngineMetrics()
    backend = EngineBackend(_Engine(), metrics)  # type: ignore[arg-type]
    metrics.set_worker_state(ready=True)
    with pytest.raises(RedisConnectionError):
        asyncio.run(backend.sample())
    assert _value(metrics, "segstream_worker_ready") == 0
    assert _value(metrics, "segstream_consumer_lag", topic="clickstream", partition="0") == 2_000
    assert _value(metrics, "segstream_partitions_assigned") == 1
    assert backend.lags == {("clickstream", 0): 2_000, ("transactions", 0): 5}


def test_engine_time_is_unknown_not_1970_before_the_first_event() -> None:
    metrics = EngineMetrics()
    assert math.isnan(_value(metrics, "segstream_engine_now_seconds"))
    metrics.set_engine_now(1_735_689_600_000)
    assert _value(metrics, "segstream_engine_now_seconds") == 1_735_689_600


def test_failed_publishes_are_counted() -> None:
    metrics = EngineMetrics()
    metrics.publish_failed(40)
    metrics.publish_failed(0)
    assert _value(metrics, "segstream_publish_failures_total") == 40


def test_skipped_records_are_counted_by_reason() -> None:
    from stream.pipeline import BatchStats

    metrics = EngineMetrics()
    backend = EngineBackend(_Engine(), metrics)  # type: ignore[arg-type]
    backend.on_batch({"clickstream": 10}, BatchStats(records=10, applied=6, duplicates=3,
                                                     skipped_below_watermark=1), 0.01)
    assert _value(metrics, "segstream_events_skipped_total", reason="duplicate") == 3
    assert _value(metrics, "segstream_events_skipped_total", reason="below_watermark") == 1


class _Up(_Engine):
    """Redis answers pings (reads work) whatever its commits do."""

    def __init__(self) -> None:
        super().__init__()

        class _Ping:
            async def ping(self) -> bool:
                return True

        self.redis = _Ping()  # type: ignore[assignment]


def test_commits_refused_while_redis_answers_pings_make_the_worker_unready() -> None:
    """A Redis that refuses writes (out of memory, read-only, an ACL narrowed) answered
    pings, so /readyz and segstream_worker_ready said ready while no batch committed."""
    from stream.backend import COMMITS_FAILING_S

    clock = [1_000.0]
    backend = EngineBackend(_Up(), EngineMetrics())  # type: ignore[arg-type]
    backend.clock = lambda: clock[0]
    ready, checks = asyncio.run(backend.ready())
    assert ready and "commits_failing_s" not in checks

    backend.on_redis("commit", 0.01, False)
    clock[0] += COMMITS_FAILING_S / 2
    backend.on_redis("commit", 0.01, False)
    backend.on_redis("load", 0.01, True)  # a read that works does not end it
    ready, _ = asyncio.run(backend.ready())
    assert ready, "a short failure is retried, not reported"

    clock[0] += COMMITS_FAILING_S / 2
    ready, checks = asyncio.run(backend.ready())
    assert not ready and checks["redis"] is True
    assert checks["commits_failing_s"] == pytest.approx(COMMITS_FAILING_S)

    backend.on_redis("commit", 0.01, True)
    ready, checks = asyncio.run(backend.ready())
    assert ready and "commits_failing_s" not in checks
    # the next failure starts its own count
    backend.on_redis("commit", 0.01, False)
    clock[0] += COMMITS_FAILING_S - 1
    assert asyncio.run(backend.ready())[0]


class _Failing:
    """A processor whose outbox has kept undelivered records for ``seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.asked: list[list[int]] = []

    def publish_failing_s(self, partitions: Any) -> float:
        self.asked.append(list(partitions))
        return self.seconds


def test_publishes_failing_while_kafka_answers_make_the_worker_unready() -> None:
    """An output topic deleted or refusing every record (or brokers that take nothing)
    left /readyz at 200 while migrations piled up in the outbox: the consumer still
    fetched, so Kafka counted as connected."""
    from stream.backend import PUBLISHES_FAILING_S

    engine = _Up()
    engine.processor = _Failing()
    backend = EngineBackend(engine, EngineMetrics())  # type: ignore[arg-type]
    engine.processor.seconds = PUBLISHES_FAILING_S - 0.5
    ready, checks = asyncio.run(backend.ready())
    assert ready and "publishes_failing_s" not in checks
    assert engine.processor.asked == [[0]], "asked about the owned partitions"
    engine.processor.seconds = PUBLISHES_FAILING_S
    ready, checks = asyncio.run(backend.ready())
    assert not ready and checks["kafka"] is True and checks["redis"] is True
    assert checks["publishes_failing_s"] == pytest.approx(PUBLISHES_FAILING_S)
    engine.processor.seconds = 0.0
    assert asyncio.run(backend.ready())[0]
