"""The benchmark's input: synthetic events, serialised once, and a fast batch producer.

Events come from :func:`stream.synthetic.iter_events` in event-time order and are
serialised to bytes before anything is timed. The producer fills aiokafka record
batches per partition itself (with the Java client's murmur2 partitioner, so the two
input topics stay co-partitioned by customer), which is several times faster than
one ``send`` per record.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from stream import synthetic
from stream.errors import SegstreamError
from stream.kafka import aiokafka_config
from stream.settings import Settings

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
#: The newest event of the input is at least this far behind the wall clock: the engine
#: dead-letters an event more than ``SEGSTREAM_MAX_FUTURE_SKEW_S`` ahead of it (``from_future``),
#: and the latency phases continue the input's event time for a few minutes more.
PAST_MARGIN_MS = DAY_MS
#: About 11.5 events per customer over 60 days at the default persona mix.
EVENTS_PER_CUSTOMER_DAY = 11.5 / 60
BATCH_BYTES = 512 * 1024
MAX_IN_FLIGHT_BATCHES = 64


@dataclass(slots=True)
class Workload:
    """Serialised events grouped by input kind and partition, in event-time order."""

    partitions: int
    #: (kind, partition) -> [(key, value)]
    records: dict[tuple[str, int], list[tuple[bytes, bytes]]] = field(default_factory=dict)
    events: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    customers_seen: int = 0
    first_ts: int = -1
    last_ts: int = -1
    #: the earliest and the latest event time
    min_ts: int = 0
    max_ts: int = 0
    value_bytes: int = 0


@dataclass(frozen=True, slots=True)
class LiveRecord:
    """One serialised event of the live (latency) phase, in production order."""

    kind: str
    partition: int
    key: bytes
    value: bytes


def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partition of a key (murmur2, as the Java and aiokafka clients)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _dumps(event: dict[str, object]) -> bytes:
    # orjson's bytes keep a 4 KB buffer each; an exact copy keeps 1M of them in ~200 MB.
    return memoryview(orjson.dumps(event)).tobytes()


def _days_for(events: int, customers: int, slack: float) -> int:
    return max(1, math.ceil(events / max(1, customers) / EVENTS_PER_CUSTOMER_DAY * slack))


def _events(n: int, customers: int, seed: int, start_ms: int, id_tag: str = ""
            ) -> Iterator[tuple[str, dict[str, object]]]:
    """The first ``n`` synthetic events; later periods (new seed and ids) fill any shortfall."""
    for round_ in range(100):
        days = _days_for(n, customers, 1.15)
        tag = id_tag + (f"r{round_}-" if round_ else "")
        got = 0
        for kind, event in synthetic.iter_events(customers, days, seed + round_, start_ms):
            if tag:
                # Fresh ids: the engine deduplicates by event id.
                event["event_id"] = f"{tag}{event['event_id']}"
            yield kind, event
            got += 1
            if got >= n:
                return
        if got == 0:
            return
        n -= got
        start_ms += days * DAY_MS


def _weeks_back(excess_ms: int) -> int:
    # whole weeks keep the synthetic week's rhythm (days of the week, hours of the day)
    return math.ceil(excess_ms / WEEK_MS) * WEEK_MS if excess_ms > 0 else 0


def build(events: int, customers: int, seed: int, partitions: int,
          progress: Callable[[int], None] | None = None, now_ms: int | None = None
          ) -> Workload:
    """Generate and serialise ``events`` events over ``customers`` customers, all of them
    :data:`PAST_MARGIN_MS` or more before ``now_ms`` (default: the wall clock).

    The events start at :data:`synthetic.DEFAULT_START_MS`. Many events per customer take
    a long period, which can reach past that point: the same events are then generated
    again, starting as many whole weeks earlier as it takes.
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    w = _build(events, customers, seed, partitions, synthetic.DEFAULT_START_MS, progress)
    excess = w.max_ts - (now - PAST_MARGIN_MS)
    if excess > 0:
        w = _build(events, customers, seed, partitions,
                   synthetic.DEFAULT_START_MS - _weeks_back(excess), progress)
    if w.min_ts < 0 or w.max_ts > now - PAST_MARGIN_MS:
        years = (w.max_ts - w.min_ts) / (365.25 * DAY_MS)
        raise SegstreamError(
            f"--events {events:,} over --customers {customers:,}: "
            f"{events / customers:,.0f} events per customer take {years:,.0f} years of "
            "synthetic event time, more than lies between 1970 and now; "
            "give more customers or fewer events")
    return w


def _build(events: int, customers: int, seed: int, partitions: int, start_ms: int,
           progress: Callable[[int], None] | None) -> Workload:
    w = Workload(partitions)
    parts: dict[bytes, int] = {}
    seen: set[str] = set()
    for i, (kind, event) in enumerate(_events(events, customers, seed, start_ms), 1):
        cid = str(event["customer_id"])
        key = cid.encode()
        p = parts.get(key)
        if p is None:
            p = parts[key] = partition_of(key, partitions)
            seen.add(cid)
        value = _dumps(event)
        w.records.setdefault((kind, p), []).append((key, value))
        w.by_kind[kind] = w.by_kind.get(kind, 0) + 1
        w.value_bytes += len(value)
        ts = int(event["ts"])  # type: ignore[call-overload]
        if i == 1:
            w.first_ts = w.min_ts = w.max_ts = ts
        w.min_ts, w.max_ts = min(w.min_ts, ts), max(w.max_ts, ts)
        w.last_ts = ts
        if progress is not None and i % 10_000 == 0:
            progress(i)
    w.events = sum(w.by_kind.values())
    w.customers_seen = len(seen)
    return w


def live_records(n: int, customers: int, seed: int, start_ms: int, partitions: int
                 ) -> list[LiveRecord]:
    """``n`` fresh events (new ids) continuing in event time after ``start_ms``."""
    parts: dict[bytes, int] = {}
    out = []
    for kind, event in _events(n, customers, seed, start_ms, id_tag="live-"):
        key = str(event["customer_id"]).encode()
        p = parts.get(key)
        if p is None:
            p = parts[key] = partition_of(key, partitions)
        out.append(LiveRecord(kind, p, key, _dumps(event)))
    return out


def at_wall_pace(records: Sequence[LiveRecord], start_ms: int, rate: float
                 ) -> tuple[list[LiveRecord], int]:
    """``records`` with event times that advance as fast as they will be sent.

    Record ``i`` of a load offered at ``rate`` per second goes out ``i / rate`` seconds
    after the first, so its event time becomes ``start_ms + i * 1000 / rate``: a live
    stream whose event time keeps pace with the wall clock, as real traffic does.
    Returns the records and the event time after the last one.
    """
    out = []
    step = 1000.0 / rate
    for i, rec in enumerate(records):
        event = orjson.loads(rec.value)
        event["ts"] = start_ms + int(i * step)
        out.append(LiveRecord(rec.kind, rec.partition, rec.key, _dumps(event)))
    return out, start_ms + int(len(records) * step) + 1


async def produce(settings: Settings, w: Workload,
                  progress: Callable[[int], None] | None = None) -> float:
    """Write the workload to the input topics; returns events per second."""
    producer = AIOKafkaProducer(**aiokafka_config(settings), acks="all", linger_ms=5,
                                max_batch_size=BATCH_BYTES, max_request_size=4 * BATCH_BYTES)
    await producer.start()
    sent = 0
    start = time.perf_counter()
    try:
        in_flight: list[asyncio.Future[object]] = []
        for (kind, p), rows in sorted(w.records.items()):
            topic = settings.topic(kind)
            batch = producer.create_batch()
            count = 0
            for key, value in rows:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    in_flight.append(await producer.send_batch(batch, topic, partition=p))
                    sent += count
                    batch, count = producer.create_batch(), 0
                    batch.append(key=key, value=value, timestamp=None)
                count += 1
                if len(in_flight) >= MAX_IN_FLIGHT_BATCHES:
                    await asyncio.gather(*in_flight)
                    in_flight.clear()
                    if progress is not None:
                        progress(sent)
            in_flight.append(await producer.send_batch(batch, topic, partition=p))
            sent += count
        await asyncio.gather(*in_flight)
        if progress is not None:
            progress(sent)
    finally:
        await producer.stop()
    return sent / max(1e-9, time.perf_counter() - start)
