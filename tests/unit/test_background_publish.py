"""A batch's outbox published while the next batch is loaded and evaluated.

The worker lets :meth:`BatchProcessor.process` return once a batch is committed, and
publishes its outbox in the background (``background_publish=True``). These tests hold
what that must not change: every committed outbox record is published, a partition's
records reach the publisher in the order they were committed (first deliveries; a
failed publish may send some again later), nothing published stays in the stored
outbox, and a batch's commit never overtakes the previous batch's publish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from features.store import MemoryFeatureStore, StoreUnavailable
from stream.pipeline import BatchProcessor, PartlyPublished, RawRecord, encode_outbox
from stream.settings import load_settings

WALL = 1_800_000_000.0


class Gate:
    """A publisher that waits for ``open`` and can be told to fail its next calls."""

    def __init__(self, fail: Sequence[bool] = ()) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.open = asyncio.Event()
        self.open.set()
        self.fail = list(fail)
        self.calls = 0
        self.started = 0

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        self.started += 1
        await self.open.wait()
        fail = self.fail[self.calls] if self.calls < len(self.fail) else False
        self.calls += 1
        if fail:
            raise ConnectionError("broker unavailable")
        self.sent.extend(records)


def bad(offset: int, part: int = 0) -> RawRecord:
    """A malformed input: its dead letter is the batch's outbox record."""
    return RawRecord("transactions", part, offset, b"k", b"not json %d" % offset)


def offsets(sent: Sequence[tuple[str, bytes | None, bytes]], part: int = 0) -> list[int]:
    docs = [orjson.loads(v) for _, _, v in sent]
    return [d["offset"] for d in docs if d["partition"] == part]


def first_seen(xs: list[int]) -> list[int]:
    seen: set[int] = set()
    return [x for x in xs if not (x in seen or seen.add(x))]  # type: ignore[func-returns-value]


def make(publisher: Gate) -> tuple[BatchProcessor, MemoryFeatureStore]:
    store = MemoryFeatureStore()
    bp = BatchProcessor(load_settings(), store, publisher, clock=lambda: WALL,
                        background_publish=True)
    return bp, store


def test_process_returns_before_its_publish_and_the_next_commit_waits_for_it() -> None:
    async def main() -> None:
        gate = Gate()
        bp, store = make(gate)
        gate.open.clear()  # the broker is slow
        await bp.process([bad(0), bad(1)])
        assert gate.sent == [] and len(store.outboxes[0]) == 2  # committed, not yet sent
        nxt = asyncio.ensure_future(bp.process([bad(2)]))
        await asyncio.sleep(0.01)
        # evaluated, but its commit waits behind the previous batch's publish
        assert not nxt.done() and len(store.outboxes[0]) == 2
        gate.open.set()
        await nxt
        await bp.drain()
        assert offsets(gate.sent) == [0, 1, 2]
        assert not store.outboxes.get(0)

    asyncio.run(main())


def test_a_failed_background_publish_goes_out_first_with_the_next_batch() -> None:
    async def main() -> None:
        gate = Gate(fail=[True])
        bp, store = make(gate)
        failed: list[int] = []
        bp.on_publish_failed = failed.append  # segstream_publish_failures_total
        await bp.process([bad(0), bad(1)])
        await bp.process([bad(2)])
        await bp.drain()
        assert offsets(gate.sent) == [0, 1, 2]
        assert not store.outboxes.get(0)
        assert failed == [2]

    asyncio.run(main())


def test_a_cancelled_background_publish_leaves_its_records_for_the_next_flush() -> None:
    async def main() -> None:
        gate = Gate()
        bp, store = make(gate)
        await bp.process([bad(0)])
        await bp.drain()  # partition 0 is now known to hold nothing unpublished
        gate.open.clear()
        await bp.process([bad(1)])
        assert bp._publishing is not None
        bp._publishing.cancel()  # as a worker stop cancels it
        await bp.drain()
        gate.open.set()
        await bp.process([bad(2)])
        await bp.drain()
        assert offsets(gate.sent) == [0, 1, 2]
        assert not store.outboxes.get(0)

    asyncio.run(main())


def test_a_partition_marked_dirty_during_a_publish_stays_dirty() -> None:
    """Reassigned while a publish runs, a partition may hold what another owner left in
    its outbox: the publish ending must not declare it clean."""

    async def main() -> None:
        gate = Gate()
        bp, store = make(gate)
        await bp.process([bad(0)])
        await bp.drain()
        gate.open.clear()
        await bp.process([bad(1)])
        await asyncio.sleep(0.01)  # the publish is under way, partition 0 taken as clean
        assert gate.started == 2
        # another owner's unpublished record, and the reassignment that reveals it
        store.outboxes[0]["dlq:transactions:7"] = encode_outbox(
            bp.settings.dlq_topic, b"k", orjson.dumps({"partition": 0, "offset": 7}),
            order=(store.meta[0]["ver"], 0))
        bp.mark_dirty([0])
        gate.open.set()
        await bp.drain()
        await bp.process([bad(2)])
        await bp.drain()
        assert offsets(gate.sent) == [0, 1, 7, 2]
        assert not store.outboxes.get(0)

    asyncio.run(main())


def test_a_timed_out_drain_does_not_cancel_the_publish() -> None:
    async def main() -> None:
        gate = Gate()
        bp, store = make(gate)
        gate.open.clear()
        await bp.process([bad(0)])
        task = bp._publishing
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bp.drain(), 0.01)
        assert task is not None and not task.done()
        gate.open.set()
        await bp.flush_outbox([0])  # waits for the publish still running
        assert offsets(gate.sent) == [0]
        assert not store.outboxes.get(0)

    asyncio.run(main())


def test_a_publish_that_could_not_read_the_outbox_leaves_every_partition_dirty() -> None:
    async def main() -> None:
        gate = Gate()
        bp, store = make(gate)
        await bp.process([bad(0, 0), bad(0, 1)])
        await bp.drain()
        bp.mark_dirty([1])  # partition 1 is read back, partition 0 published as committed
        original = store.outbox_pending

        async def unavailable(partitions: Any) -> Any:
            store.outbox_pending = original  # type: ignore[method-assign]
            raise StoreUnavailable("redis read failed")

        store.outbox_pending = unavailable  # type: ignore[method-assign]
        await bp.process([bad(1, 0), bad(1, 1)])
        await bp.drain()
        assert gate.sent == [gate.sent[0], gate.sent[1]]  # nothing of the failed publish
        await bp.process([bad(2, 0)])
        await bp.drain()
        assert offsets(gate.sent, 0) == [0, 1, 2]
        assert not store.outboxes.get(0)

    asyncio.run(main())


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=4),
                        min_size=1, max_size=8),
       fail=st.lists(st.booleans(), max_size=12),
       commit_fails=st.lists(st.booleans(), max_size=8))
def test_every_committed_record_is_published_in_commit_order(
        batches: list[list[int]], fail: list[bool], commit_fails: list[bool]) -> None:
    """Batches over three partitions, with publishes that fail and commits that time out
    after being applied: in the end each partition's records were first published in
    offset order, none is missing, and the stored outbox is empty."""

    async def main() -> None:
        gate = Gate(fail=fail)
        bp, store = make(gate)
        next_offset = [0, 0, 0]
        for k, parts in enumerate(batches):
            recs = []
            for p in parts:
                recs.append(bad(next_offset[p], p))
                next_offset[p] += 1
            store.fail_next_commit_after_apply = k < len(commit_fails) and commit_fails[k]
            await bp.process(recs)
        await bp.drain()
        gate.fail = []
        await bp.flush_outbox([0, 1, 2])  # the periodic flush
        for p in range(3):
            assert first_seen(offsets(gate.sent, p)) == list(range(next_offset[p]))
            assert not store.outboxes.get(p)

    asyncio.run(main())


class PartlyRefusing(Gate):
    """A publisher that, when told to, refuses the records whose offsets it names and
    delivers the others, as a broker refusing one topic's or one record's batch does:
    like the worker's publisher, a record after a refused one of the same topic and key
    is not delivered either."""

    def __init__(self, refuse: Sequence[frozenset[int] | None]) -> None:
        super().__init__()
        self.refuse = list(refuse)
        self.not_delivered = 0

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        refuse = self.refuse[self.calls] if self.calls < len(self.refuse) else None
        self.calls += 1
        if not refuse:
            self.sent.extend(records)
            return
        blocked: set[tuple[str, bytes | None]] = set()
        delivered = []
        for topic, key, value in records:
            if orjson.loads(value)["offset"] in refuse:
                blocked.add((topic, key))
            ok = (topic, key) not in blocked
            delivered.append(ok)
            if ok:
                self.sent.append((topic, key, value))
        self.not_delivered += delivered.count(False)
        if any(delivered):
            raise PartlyPublished(delivered, ValueError("MessageSizeTooLargeError"))
        raise ValueError("MessageSizeTooLargeError")


def keyed(offset: int, part: int) -> RawRecord:
    """A malformed input whose dead letter is keyed by one of two customers."""
    return RawRecord("transactions", part, offset, b"c%d" % (offset % 2), b"bad %d" % offset)


@settings(max_examples=80, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=4),
                        min_size=1, max_size=8),
       refuse=st.lists(st.one_of(st.none(), st.frozensets(st.integers(0, 9), max_size=4)),
                       max_size=12))
def test_records_a_publish_delivered_are_not_sent_again(
        batches: list[list[int]], refuse: list[frozenset[int] | None]) -> None:
    """A topic or a record that Kafka refuses used to send every record of the same flush
    again at every flush (migrations repeated every 5 s while one dead letter was too
    large for its topic). Now each record reaches the topic exactly once, each
    customer's in the order they were committed, and the outbox ends empty."""

    async def main() -> None:
        gate = PartlyRefusing(refuse)
        bp, store = make(gate)
        failed: list[int] = []
        published: list[Any] = []
        bp.on_publish_failed = failed.append
        bp.on_published = published.extend
        next_offset = [0, 0, 0]
        for parts in batches:
            recs = []
            for p in parts:
                recs.append(keyed(next_offset[p], p))
                next_offset[p] += 1
            await bp.process(recs)
        await bp.drain()
        gate.refuse = []
        await bp.flush_outbox([0, 1, 2])
        sent = [(orjson.loads(v), k) for _, k, v in gate.sent]
        for p in range(3):
            for key in (b"c0", b"c1"):
                got = [d["offset"] for d, k in sent if d["partition"] == p and k == key]
                want = [o for o in range(next_offset[p]) if b"c%d" % (o % 2) == key]
                assert got == want, (p, key, got, want)
            assert not store.outboxes.get(p)
        assert len(published) == len(gate.sent)  # counted as published once each
        # segstream_publish_failures_total counts what was refused, not the whole flush
        assert sum(failed) == gate.not_delivered

    asyncio.run(main())


def test_how_long_a_partitions_outbox_kept_undelivered_records_is_known() -> None:
    """``/readyz`` turns 503 once a partition's outbox has kept records Kafka would not
    take for 30 s. The count runs per partition: another partition publishing everything
    does not end it, and a partition's count ends only once it delivered all it held."""

    async def main() -> None:
        clock = [100.0]
        # call 1 refuses offset 0 (partition 0's dead letter) and delivers partition 1's;
        # call 2 delivers; call 3 refuses offset 0 again (nothing delivered at all)
        gate = PartlyRefusing([frozenset({0}), None, frozenset({0}), None])
        bp, store = make(gate)
        bp.monotonic = lambda: clock[0]
        assert bp.publish_failing_s([0, 1]) == 0.0
        await bp.process([keyed(0, 0), keyed(1, 1)])
        await bp.drain()
        assert store.outboxes.get(0) and not store.outboxes.get(1)
        clock[0] = 130.0
        assert bp.publish_failing_s([0, 1]) == 30.0
        await bp.process([keyed(2, 1)])  # partition 1 alone, delivered
        await bp.drain()
        assert gate.calls == 2 and bp.publish_failing_s([0, 1]) == 30.0
        clock[0] = 140.0
        await bp.flush_outbox([0, 1])  # refused again: the count goes on from 100
        assert gate.calls == 3 and store.outboxes.get(0)
        assert bp.publish_failing_s([0, 1]) == 40.0
        await bp.flush_outbox([0, 1])  # delivered
        assert not store.outboxes.get(0)
        assert bp.publish_failing_s([0, 1]) == 0.0

        # A whole publish failing starts a count for every partition it held.
        gate.refuse = [frozenset({3, 4})]
        gate.calls = 0
        await bp.process([keyed(3, 0), keyed(4, 1)])
        await bp.drain()
        clock[0] = 150.0
        assert bp.publish_failing_s([0, 1]) == 10.0
        # partition 1 is no longer this processor's: its count is forgotten
        assert bp.publish_failing_s([0]) == 10.0
        await bp.flush_outbox([0])
        assert store.outboxes.get(1), "partition 1's records wait for its next owner"
        assert bp.publish_failing_s([0, 1]) == 0.0

    asyncio.run(main())
