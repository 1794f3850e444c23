"""The worker's outbox publisher: records go out as one batch per topic-partition, keyed
records in the partition of the producer's partitioner and in their order; a record that
cannot be queued fails the publish in bounded time (its records stay in the outbox) and
missing topics are recreated, at most once per interval."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from stream import app as app_module
from stream.app import RECREATE_TOPICS_EVERY_S, FaustPublisher
from stream.errors import PublishRefused
from stream.pipeline import PartlyPublished
from stream.settings import load_settings

PARTITIONS = 6


class _Batch:
    """A record batch that holds ``room`` records (the first one always fits)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.rows: list[tuple[bytes | None, bytes]] = []
        self.closed = False

    def append(self, *, key: bytes | None, value: bytes, timestamp: Any) -> object | None:
        if self.closed or (self.rows and len(self.rows) >= self.room):
            self.closed = True
            return None
        self.rows.append((key, value))
        return object()


class _Kafka:
    """An aiokafka producer's batch interface; a topic in ``missing`` never gets metadata,
    and a topic in ``stuck`` never has room for a batch."""

    def __init__(self, missing: str = "", stuck: str = "", room: int = 1000,
                 refuse: Any = None, hang: str = "", most: int | None = None) -> None:
        self.missing, self.stuck, self.room = missing, stuck, room
        #: a topic whose batches are queued but never acknowledged (deleted under us)
        self.hang = hang
        #: the most records a batch may hold before the broker refuses it as too large
        self.most = most
        #: refuse(topic, partition, n): whether the n-th batch queued is refused
        self.refuse = refuse or (lambda topic, partition, n: False)
        self.queued: list[tuple[str, int, list[tuple[bytes | None, bytes]]]] = []
        self.refused: list[int] = []

    async def partitions_for(self, topic: str) -> set[int]:
        if topic == self.missing:
            await asyncio.Event().wait()
        return set(range(PARTITIONS))

    def create_batch(self) -> _Batch:
        return _Batch(self.room)

    async def send_batch(self, batch: _Batch, topic: str, *, partition: int
                         ) -> asyncio.Future[Any]:
        if topic == self.stuck:
            await asyncio.Event().wait()
        assert batch.rows, "an empty batch was queued"
        fut = asyncio.get_running_loop().create_future()
        if topic == self.hang:
            return fut
        if self.most is not None and len(batch.rows) > self.most:
            self.refused.append(len(self.queued) + len(self.refused))
            fut.set_exception(MessageSizeTooLargeError())
        elif self.refuse(topic, partition, len(self.queued) + len(self.refused)):
            self.refused.append(len(self.queued) + len(self.refused))
            fut.set_exception(ValueError("MessageSizeTooLargeError"))
        else:
            self.queued.append((topic, partition, list(batch.rows)))
            fut.set_result(None)
        return fut

    def values(self) -> list[bytes]:
        return [v for _, _, rows in self.queued for _, v in rows]


def _publisher(kafka: _Kafka, **kwargs: Any) -> FaustPublisher:
    app = SimpleNamespace(producer=SimpleNamespace(_ensure_producer=lambda: kafka,
                                                   partitioner=None))
    return FaustPublisher(app, load_settings(), **kwargs)  # type: ignore[arg-type]


def test_a_topic_without_metadata_fails_the_publish_and_topics_are_recreated() -> None:
    recreated: list[float] = []
    kafka = _Kafka(missing="segmentation-dlq")
    pub = _publisher(kafka, queue_timeout_s=0.2,
                     recreate=lambda s: recreated.append(time.time()))
    records = [("segment-migrations", b"k", b"1"), ("segmentation-dlq", b"k", b"2"),
               ("segment-migrations", b"k", b"3")]

    async def go() -> None:
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError, match="segmentation-dlq"):
            await pub.publish(records)
        assert time.perf_counter() - t0 < 5  # not the producer's 20-minute timeout
        with pytest.raises(TimeoutError):
            await pub.publish(records)
        # a long publish whose batches each queue at once is not cut short
        many = [("segment-migrations", b"k%d" % i, b"x") for i in range(2000)]
        await pub.publish(many)

    asyncio.run(go())
    # every topic's partitions are known before anything is queued: nothing of the
    # failed publishes went out, then all 2,000 records did
    assert kafka.values() == [b"x"] * 2000
    assert len(recreated) == 1  # the second failure came within RECREATE_TOPICS_EVERY_S
    assert RECREATE_TOPICS_EVERY_S >= 1


def test_a_batch_that_cannot_be_queued_fails_the_publish_in_bounded_time() -> None:
    kafka = _Kafka(stuck="segmentation-examples")
    pub = _publisher(kafka, queue_timeout_s=0.2, recreate=lambda s: None)

    async def go() -> None:
        t0 = time.perf_counter()
        with pytest.raises(PartlyPublished) as caught:
            await pub.publish([("segment-migrations", b"k", b"1"),
                               ("segmentation-examples", None, b"2")])
        assert time.perf_counter() - t0 < 5
        # the migration queued before the stuck batch went out: it is not sent again
        assert caught.value.delivered == [True, False]
        assert isinstance(caught.value.cause, TimeoutError)
        assert "segmentation-examples" in str(caught.value.cause)
        assert kafka.values() == [b"1"]

    asyncio.run(go())


_records = st.lists(
    st.tuples(st.sampled_from(["segment-migrations", "segmentation-examples"]),
              st.one_of(st.none(), st.sampled_from([b"c1", b"c2", b"c3", b"00042", b"zz"]))),
    max_size=60)


@settings(max_examples=60, deadline=None)
@given(_records, st.integers(1, 7))
def test_each_partition_gets_its_records_in_order_in_full_batches(
        spec: list[tuple[str, bytes | None]], room: int) -> None:
    records = [(topic, key, b"%d" % i) for i, (topic, key) in enumerate(spec)]
    kafka = _Kafka(room=room)
    asyncio.run(_publisher(kafka).publish(records))

    assert sorted(kafka.values()) == sorted(v for _, _, v in records)  # each one once
    by_partition: dict[tuple[str, int], list[bytes]] = {}
    keyless: dict[str, set[int]] = {}
    for topic, p, rows in kafka.queued:
        assert 1 <= len(rows) <= room
        for key, value in rows:
            by_partition.setdefault((topic, p), []).append(value)
            if key is None:
                keyless.setdefault(topic, set()).add(p)
            else:  # the Java client's default partition of the key
                assert p == (murmur2(key) & 0x7FFFFFFF) % PARTITIONS, (key, p)
    for (topic, p), values in by_partition.items():
        assert values == [v for t, k, v in records if t == topic and (
            (k is None and p in keyless.get(topic, set())) or
            (k is not None and (murmur2(k) & 0x7FFFFFFF) % PARTITIONS == p))]
    # only the last batch of a partition may have room left
    sizes: dict[tuple[str, int], list[int]] = {}
    for topic, p, rows in kafka.queued:
        sizes.setdefault((topic, p), []).append(len(rows))
    assert all(n == room for ns in sizes.values() for n in ns[:-1]), sizes
    assert all(len(ps) == 1 for ps in keyless.values()), keyless


def test_nothing_to_publish_needs_no_producer() -> None:
    app = SimpleNamespace(producer=None)
    asyncio.run(FaustPublisher(app, load_settings()).publish([]))  # type: ignore[arg-type]


def test_a_refused_topic_leaves_the_others_delivered() -> None:
    """A dead-letter topic refusing its records (its max.message.bytes) used to fail the
    whole publish, so the migrations Kafka took were sent again at every flush."""
    kafka = _Kafka(refuse=lambda topic, p, n: topic == "segmentation-dlq")
    records = [("segment-migrations", b"c1", b"m1"), ("segmentation-dlq", b"c1", b"d1"),
               ("segment-migrations", b"c2", b"m2"), ("segmentation-dlq", None, b"d2")]

    async def go() -> PartlyPublished:
        with pytest.raises(PartlyPublished) as caught:
            await _publisher(kafka).publish(records)
        return caught.value

    exc = asyncio.run(go())
    assert exc.delivered == [True, False, True, False]
    assert "MessageSizeTooLargeError" in repr(exc.cause)
    assert sorted(kafka.values()) == [b"m1", b"m2"]

    everything = _Kafka(refuse=lambda topic, p, n: True)
    with pytest.raises(ValueError, match="MessageSizeTooLarge"):  # nothing went out
        asyncio.run(_publisher(everything).publish(records))


@settings(max_examples=80, deadline=None)
@given(_records, st.integers(1, 4), st.sets(st.integers(0, 30), max_size=6))
def test_what_is_delivered_is_what_kafka_took_before_its_key_was_refused(
        spec: list[tuple[str, bytes | None]], room: int, refused: set[int]) -> None:
    """Batches refused at random: a record counts as delivered exactly when Kafka took
    it, and Kafka takes nothing of a partition after a batch of it was refused, so what
    goes out again later keeps each customer's order and nothing goes out twice."""
    records = [(topic, key, b"%d" % i) for i, (topic, key) in enumerate(spec)]
    kafka = _Kafka(room=room, refuse=lambda topic, p, n: n in refused)

    async def go() -> list[bool]:
        try:
            await _publisher(kafka).publish(records)
        except PartlyPublished as exc:
            return exc.delivered
        except ValueError:
            return [False] * len(records)
        return [True] * len(records)

    delivered = asyncio.run(go())
    taken = set(kafka.values())
    for (_, _, value), ok in zip(records, delivered, strict=True):
        # a record Kafka took but reported as not delivered would be sent again
        assert ok == (value in taken), (value, ok)
    for topic, key in {(t, k) for t, k, _ in records}:
        flags = [ok for (t, k, _), ok in zip(records, delivered, strict=True)
                 if (t, k) == (topic, key)]
        values = [v for t, k, v in records if (t, k) == (topic, key)]
        # a prefix of each key's records, and all of them up to its first refused one
        assert flags == sorted(flags, reverse=True), flags
        first_lost = next((v for v in values if v not in taken), None)
        want = values if first_lost is None else values[:values.index(first_lost)]
        assert [v for v, ok in zip(values, flags, strict=True) if ok] == want


def test_a_topic_that_never_acknowledges_fails_the_publish_in_bounded_time() -> None:
    """The migrations topic deleted under the worker, still in the producer's metadata: its
    batches were queued and waited for 20 minutes, holding every batch of the input."""
    recreated: list[float] = []
    kafka = _Kafka(hang="segment-migrations")
    pub = _publisher(kafka, delivery_timeout_s=0.3,
                     recreate=lambda s: recreated.append(time.time()))

    async def go() -> PartlyPublished:
        t0 = time.perf_counter()
        with pytest.raises(PartlyPublished) as caught:
            await pub.publish([("segment-migrations", b"c1", b"m1"),
                               ("segmentation-dlq", b"c1", b"d1")])
        assert time.perf_counter() - t0 < 5
        return caught.value

    exc = asyncio.run(go())
    assert exc.delivered == [False, True]
    assert isinstance(exc.cause, TimeoutError) and "segment-migrations" in str(exc.cause)
    assert len(recreated) == 1  # the engine's missing topics are created


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 200), most=st.integers(1, 40), keys=st.integers(1, 5))
def test_a_topic_refusing_batches_as_too_large_gets_smaller_ones_until_they_pass(
        n: int, most: int, keys: int) -> None:
    """An output topic whose max.message.bytes was lowered under the worker below a batch
    but above each record refused every flush for good; its batches now halve until they
    fit, within the one publish (it used to halve once per flush, five seconds apart),
    keeping each customer's order and sending nothing twice."""
    kafka = _Kafka(most=most)
    pub = _publisher(kafka)
    records = [("segment-migrations", b"c%d" % (i % keys), b"%d" % i) for i in range(n)]
    with patch.object(app_module.log, "warning") as warned:
        asyncio.run(pub.publish(records))  # no failure: everything went out
    assert sorted(kafka.values(), key=int) == [v for _, _, v in records]  # each once
    for key in {k for _, k, _ in records}:  # each customer's in order
        got = [v for _, _, rows in kafka.queued for k, v in rows if k == key]
        assert got == [v for _, k, v in records if k == key]
    assert all(len(rows) <= most for _, _, rows in kafka.queued)
    if kafka.refused:
        assert pub.batch_records["segment-migrations"] <= most
        text = " ".join(str(c.args[1]) for c in warned.call_args_list)
        assert "max.message.bytes" in text and "SEGSTREAM_KAFKA_PRODUCE_BATCH_BYTES" in text


class _TooLarge(_Kafka):
    """Refuses every batch of ``topic`` as too large, whatever it holds."""

    def __init__(self, topic: str) -> None:
        super().__init__()
        self.topic = topic

    async def send_batch(self, batch: _Batch, topic: str, *, partition: int
                         ) -> asyncio.Future[Any]:
        if topic != self.topic:
            return await super().send_batch(batch, topic, partition=partition)
        self.refused.append(len(batch.rows))
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(MessageSizeTooLargeError())
        return fut


def test_a_single_record_a_topic_refuses_fails_the_publish_naming_the_limit() -> None:
    """A record larger than its topic's max.message.bytes: once its batches are down to
    one record, the publish fails for it (it waits in the outbox, as what follows it of
    its partition) and the other topics' records are delivered."""
    kafka = _TooLarge("segment-migrations")
    records = [("segment-migrations", b"c1", b"m%d" % i) for i in range(5)]
    records.append(("segmentation-dlq", b"c1", b"d1"))

    async def go() -> PartlyPublished:
        with pytest.raises(PartlyPublished) as caught:
            await _publisher(kafka).publish(records)
        return caught.value

    exc = asyncio.run(go())
    assert exc.delivered == [False] * 5 + [True]
    assert kafka.refused == [5, 2, 1]  # halved within the publish, down to one record
    assert isinstance(exc.cause, PublishRefused)
    assert "waits in the outbox" in str(exc.cause)
    assert kafka.values() == [b"d1"]
