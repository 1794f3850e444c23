"""The outbox publisher against a real broker: order, partitioning, and progress while the
worker's event loop is busy evaluating."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
from kafka.admin import NewTopic

from stream import kafka as kafka_util
from stream.publisher import ThreadedPublisher
from stream.settings import load_settings

PARTITIONS = 3


@pytest.fixture()
def topic(services: dict[str, str]) -> tuple[str, object]:
    s = load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"])
    name = f"t-pub-{uuid.uuid4().hex[:8]}"
    a = kafka_util.admin(s)
    try:
        a.create_topics([NewTopic(name, PARTITIONS, 1)])
    finally:
        a.close()
    yield name, s
    a = kafka_util.admin(s)
    try:
        a.delete_topics([name])
    finally:
        a.close()


def read_back(s: object, topic: str, expected: int) -> list[tuple[int, int, bytes, bytes]]:
    """(partition, offset, key, value) of every record, from the beginning."""
    c = kafka_util.consumer(s, auto_offset_reset="earliest", enable_auto_commit=False,
                            consumer_timeout_ms=2000)
    try:
        c.subscribe([topic])
        out: list[tuple[int, int, bytes, bytes]] = []
        deadline = time.monotonic() + 60
        while len(out) < expected and time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                out.extend((m.partition, m.offset, m.key, m.value) for m in batch)
        return out
    finally:
        c.close()


def test_records_arrive_complete_in_order_and_by_key(topic: tuple[str, object]) -> None:
    name, s = topic
    keys = [f"c{i}".encode() for i in range(40)]
    sent = [(name, keys[i % len(keys)], f"{i}".encode()) for i in range(3000)]

    async def main() -> None:
        pub = ThreadedPublisher(s)  # type: ignore[arg-type]
        try:
            for k in range(0, len(sent), 700):  # one call per batch's outbox
                await pub.publish(sent[k:k + 700])
        finally:
            await pub.aclose()

    asyncio.run(main())
    got = read_back(s, name, len(sent))
    assert len(got) == len(sent)
    by_key: dict[bytes, list[int]] = {}
    partition_of: dict[bytes, set[int]] = {}
    for part, _off, key, value in sorted(got, key=lambda r: (r[0], r[1])):
        by_key.setdefault(key, []).append(int(value))
        partition_of.setdefault(key, set()).add(part)
    # every record, each key on one partition, in the order it was given
    assert all(len(p) == 1 for p in partition_of.values())
    assert len({p for ps in partition_of.values() for p in ps}) == PARTITIONS
    for key, values in by_key.items():
        assert values == [int(v) for _t, k, v in sent if k == key]


def test_publishing_goes_on_while_the_calling_loop_is_busy(topic: tuple[str, object]) -> None:
    """The worker's loop evaluates a batch without awaiting anything; the publish it
    started before must still reach the broker meanwhile."""
    name, s = topic

    async def main() -> None:
        pub = ThreadedPublisher(s)  # type: ignore[arg-type]
        try:
            await pub.publish([(name, b"warm", b"up")])  # producer connected
            done = pub.submit([(name, f"k{i}".encode(), b"x" * 500) for i in range(500)])
            deadline = time.monotonic() + 30
            while not done.done() and time.monotonic() < deadline:
                sum(range(10_000))  # CPU-bound, never yields to this loop
            assert done.done() and done.exception() is None
        finally:
            await pub.aclose()
        assert not any(t.name == "outbox-publisher" for t in threading.enumerate())

    asyncio.run(main())
    assert len(read_back(s, name, 501)) == 501


def test_an_unreachable_broker_fails_the_publish_and_a_later_one_may_succeed(
        topic: tuple[str, object]) -> None:
    name, s = topic
    bad = s.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})  # type: ignore[attr-defined]

    async def main() -> None:
        pub = ThreadedPublisher(bad)
        try:
            with pytest.raises(Exception):  # noqa: B017 - aiokafka's connection error
                await asyncio.wait_for(pub.publish([(name, b"k", b"v")]), 60)
            assert pub._producer is None  # not kept half-started: the next publish retries
            pub.settings = s  # type: ignore[assignment]
            await pub.publish([(name, b"k", b"v")])
        finally:
            await pub.aclose()

    asyncio.run(main())
    assert len(read_back(s, name, 1)) == 1
