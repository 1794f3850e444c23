"""The inbox between the Kafka fetch and the ingest loop, and the consumer that fills it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from types import SimpleNamespace
from typing import Any, NamedTuple

import orjson
import pytest
from faust.transport.drivers import aiokafka as fa
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.app import Engine, _Consumer
from stream.inbox import Inbox
from stream.pipeline import RawRecord
from stream.settings import load_settings


class TP(NamedTuple):
    topic: str
    partition: int


A, B, C = TP("clickstream", 0), TP("clickstream", 1), TP("transactions", 0)


def recs(tp: TP, offsets: list[int]) -> list[RawRecord]:
    return [RawRecord(tp.topic, tp.partition, o, b"k", b"v", 0) for o in offsets]


class Acks:
    def __init__(self) -> None:
        self.calls: list[tuple[TP, int, int]] = []

    def __call__(self, tp: TP, first: int, last: int) -> None:
        self.calls.append((tp, first, last))


def inbox(capacity: int = 100) -> tuple[Inbox, Acks]:
    acks = Acks()
    box = Inbox(["clickstream", "transactions"], capacity, acks)
    box.assign([A, B, C])
    return box, acks


@st.composite
def fetches(draw: Any) -> list[tuple[TP, list[int]]]:
    """Fetches per partition with increasing offsets and random holes between them."""
    nxt = {tp: draw(st.integers(0, 50)) for tp in (A, B, C)}
    out = []
    for _ in range(draw(st.integers(1, 12))):
        tp = draw(st.sampled_from([A, B, C]))
        offsets = []
        for _ in range(draw(st.integers(1, 8))):
            nxt[tp] += draw(st.integers(0, 3))  # a skipped offset: a marker or compacted
            offsets.append(nxt[tp])
            nxt[tp] += 1
        out.append((tp, offsets))
    return out


@settings(max_examples=200, deadline=None)
@given(fetches(), st.lists(st.integers(1, 10), min_size=1, max_size=30))
def test_every_record_is_taken_once_in_order_and_acks_cover_exactly_the_fetched_range(
        fetched: list[tuple[TP, list[int]]], sizes: list[int]) -> None:
    box, acks = inbox(capacity=10_000)

    async def run() -> list[list[RawRecord]]:
        for tp, offsets in fetched:
            await box.put(tp, recs(tp, offsets))
        batches = []
        i = 0
        while box.size:
            max_ = sizes[i % len(sizes)]
            i += 1
            batch = box.take(max_)
            assert 1 <= len(batch.records) <= max_
            for r in batch.records:  # every record lies inside its batch's cover
                first, last = batch.covers[TP(r.topic, r.partition)]
                assert first <= r.offset <= last
            before = len(acks.calls)
            batches.append(batch.records)
            box.done(batch)
            assert len(acks.calls) - before == len(batch.covers)
        return batches

    batches = asyncio.run(run())
    taken = [r for b in batches for r in b]
    for tp in (A, B, C):
        put = [o for t, offs in fetched if t == tp for o in offs]
        assert [r.offset for r in taken if (r.topic, r.partition) == tp] == put
        covered = [o for t, first, last in acks.calls if t == tp
                   for o in range(first, last + 1)]
        if put:
            # From the first record fetched to the last, every offset exactly once,
            # holes included (they must not hold a commit back).
            assert covered == list(range(put[0], put[-1] + 1))
        else:
            assert covered == []


def test_a_batch_is_acked_only_when_done_and_only_for_partitions_still_assigned() -> None:
    box, acks = inbox()

    async def run() -> None:
        await box.put(A, recs(A, [3, 4]))
        await box.put(B, recs(B, [7]))
        batch = box.take(10)
        assert acks.calls == []
        box.revoke([B])
        box.done(batch)

    asyncio.run(run())
    assert acks.calls == [(A, 3, 4)]


def test_revoke_drops_what_waits_of_those_partitions_only() -> None:
    box, _ = inbox()

    async def run() -> None:
        await box.put(A, recs(A, [1, 2, 3]))
        await box.put(B, recs(B, [1, 2]))
        await box.put(A, recs(A, [4]))
        assert box.revoke([A]) == 4
        assert box.size == 2
        assert [(r.partition, r.offset) for r in box.take(10).records] == [(1, 1), (1, 2)]

    asyncio.run(run())


def test_records_already_put_are_not_put_twice_and_a_reassigned_partition_starts_afresh(
        ) -> None:
    box, acks = inbox()

    async def run() -> None:
        await box.put(A, recs(A, [10, 11]))
        await box.put(A, recs(A, [10, 11, 12]))  # fetched again after a seek
        batch = box.take(10)
        assert [r.offset for r in batch.records] == [10, 11, 12]
        box.done(batch)
        box.assign([A])  # after a rebalance Kafka may hand out any position again
        await box.put(A, recs(A, [5, 6]))
        batch = box.take(10)
        assert [r.offset for r in batch.records] == [5, 6]
        box.done(batch)

    asyncio.run(run())
    assert acks.calls == [(A, 10, 12), (A, 5, 6)]


def test_after_records_were_fetched_and_not_put_the_next_cover_skips_nothing() -> None:
    box, acks = inbox()

    async def run() -> None:
        await box.put(A, recs(A, [1, 2]))
        box.done(box.take(10))
        box.forget_position(A)  # offsets 3..9 were fetched and dropped
        await box.put(A, recs(A, [10, 11]))
        box.done(box.take(10))

    asyncio.run(run())
    assert acks.calls == [(A, 1, 2), (A, 10, 11)]  # never 3..9: they were not processed


def test_put_waits_while_the_inbox_is_full() -> None:
    box, _ = inbox(capacity=3)

    async def run() -> None:
        await box.put(A, recs(A, [1, 2, 3]))
        second = asyncio.ensure_future(box.put(A, recs(A, [4])))
        await asyncio.sleep(0.01)
        assert not second.done() and box.size == 3
        box.take(2)
        await asyncio.wait_for(second, 1)
        assert box.size == 2

    asyncio.run(run())


def test_a_full_inbox_makes_room_when_a_revoke_drops_records_and_the_waiting_put_keeps_nothing(
) -> None:
    """The rebalance that revoked A sends the consumer back to the committed offsets of
    every partition it keeps: B's records fetched before it would be fetched twice."""
    box, _ = inbox(capacity=2)

    async def run() -> None:
        await box.put(A, recs(A, [1, 2]))
        waiting = asyncio.ensure_future(box.put(B, recs(B, [1])))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        box.revoke([A])
        assert await asyncio.wait_for(waiting, 1) is False
        assert box.size == 0 and box.take(5).records == []
        assert await box.put(B, recs(B, [1])) is True  # fetched again after the seek
        assert [r.offset for r in box.take(5).records] == [1]

    asyncio.run(run())


def test_a_partition_revoked_and_assigned_back_while_a_put_waited_leaves_no_hole() -> None:
    """Without the drop, the stale records [3, 4] would be taken and the fetch after the
    seek (from the committed offset 1) would lose 1 and 2 as 'already put'."""
    box, acks = inbox(capacity=2)

    async def run() -> list[int]:
        await box.put(B, recs(B, [1, 2]))
        waiting = asyncio.ensure_future(box.put(A, recs(A, [3, 4])))
        await asyncio.sleep(0.01)
        box.revoke([A, B])
        box.assign([A, B])
        assert await asyncio.wait_for(waiting, 1) is False
        assert await box.put(A, recs(A, [1, 2, 3, 4])) is True
        batch = box.take(10)
        box.done(batch)
        return [r.offset for r in batch.records]

    assert asyncio.run(run()) == [1, 2, 3, 4]
    assert acks.calls == [(A, 1, 4)]


def test_batches_hand_over_at_once_when_kafka_holds_nothing_more() -> None:
    box, acks = inbox()

    async def run() -> None:
        await box.put(A, recs(A, [1, 2]))
        it = box.batches(100, within_s=5.0, backlog=lambda: 0)
        first = await asyncio.wait_for(it.__anext__(), 0.5)
        assert [r.offset for r in first] == [1, 2]
        assert acks.calls == []  # not before the next batch is asked for
        await box.put(A, recs(A, [3]))
        second = await asyncio.wait_for(it.__anext__(), 0.5)
        assert [r.offset for r in second] == [3]
        assert acks.calls == [(A, 1, 2)]
        await it.aclose()

    asyncio.run(run())


def test_batches_gather_while_kafka_holds_more_up_to_max() -> None:
    box, _ = inbox(capacity=1000)
    backlog = {"n": 5}

    async def feed() -> None:
        for o in range(2, 7):
            await asyncio.sleep(0.002)
            await box.put(A, recs(A, [o]))
            backlog["n"] -= 1

    async def run() -> list[int]:
        await box.put(A, recs(A, [1]))
        it = box.batches(4, within_s=5.0, backlog=lambda: backlog["n"])
        feeder = asyncio.ensure_future(feed())
        batch = await asyncio.wait_for(it.__anext__(), 2)
        await feeder
        await it.aclose()
        return [r.offset for r in batch]

    assert asyncio.run(run()) == [1, 2, 3, 4]  # full at max although more was coming


def test_batches_stop_gathering_after_within() -> None:
    box, _ = inbox()

    async def run() -> list[int]:
        await box.put(A, recs(A, [1]))
        it = box.batches(100, within_s=0.05, backlog=lambda: 10)  # Kafka never delivers
        batch = await asyncio.wait_for(it.__anext__(), 1)
        await it.aclose()
        return [r.offset for r in batch]

    assert asyncio.run(run()) == [1]


def _run_guarded(coro_fn: Any, stop: threading.Event, limit_s: float = 10.0) -> bool:
    """Run ``coro_fn()`` on an event loop in a thread; False if it did not end in time
    (then ``stop`` is set, which a spinning ``batches`` loop checks, and the thread ends)."""
    thread = threading.Thread(target=lambda: asyncio.run(coro_fn()), daemon=True)
    thread.start()
    thread.join(limit_s)
    ended = not thread.is_alive()
    stop.set()
    thread.join(limit_s)
    return ended


def test_after_a_revoke_emptied_the_inbox_the_ingest_loop_still_yields_to_the_event_loop(
) -> None:
    """A rebalance revoked the only partition with records waiting while a batch was being
    processed: asking for the next batch must wait, not spin without ever suspending
    (which froze the worker's event loop, and with it the rebalance's assignment)."""
    box, acks = inbox()
    stop = threading.Event()
    seen: dict[str, Any] = {}

    async def run() -> None:
        await box.put(A, recs(A, [1]))
        it = box.batches(100, within_s=5.0, backlog=lambda: 0, should_stop=stop.is_set)
        assert [r.offset for r in await it.__anext__()] == [1]  # being processed...
        await box.put(A, recs(A, [2]))  # ...when more arrives,
        assert box.revoke([A]) == 1  # and a rebalance takes the partition away
        nxt = asyncio.ensure_future(it.__anext__())
        turns = 0
        for _ in range(5):
            await asyncio.sleep(0.01)  # the event loop keeps turning
            turns += 1
        seen["turns"] = turns
        await box.put(B, recs(B, [7]))  # and new records still come through
        seen["next"] = [(r.partition, r.offset) for r in await asyncio.wait_for(nxt, 2)]
        await it.aclose()

    assert _run_guarded(run, stop), "batches() held the event loop after the revoke"
    assert seen == {"turns": 5, "next": [(1, 7)]}
    assert acks.calls == []  # the revoked partition's batch acks nothing


def test_a_revoke_while_a_batch_gathers_never_hands_over_an_empty_batch() -> None:
    box, _ = inbox()
    stop = threading.Event()
    got: list[list[tuple[int, int]]] = []
    revoked: list[TP] = []

    async def run() -> None:
        await box.put(A, recs(A, [1]))
        # Kafka reports more to come, so the batch gathers; after the revoke it does not.
        it = box.batches(100, within_s=5.0, backlog=lambda: 0 if revoked else 10,
                         should_stop=stop.is_set)
        nxt = asyncio.ensure_future(it.__anext__())
        await asyncio.sleep(0.02)
        box.revoke([A])
        revoked.append(A)
        await asyncio.sleep(0.1)  # the batch stops gathering with nothing left
        assert not nxt.done()
        await box.put(B, recs(B, [5]))
        got.append([(r.partition, r.offset) for r in await asyncio.wait_for(nxt, 2)])
        await it.aclose()

    assert _run_guarded(run, stop)
    assert got == [[(1, 5)]]


def test_a_batch_whose_processing_failed_is_never_acked() -> None:
    box, acks = inbox()

    async def run() -> None:
        await box.put(A, recs(A, [1, 2]))
        with pytest.raises(RuntimeError):
            async for _ in box.batches(100, 0.01, lambda: 0):
                raise RuntimeError("processing failed")

    asyncio.run(run())
    assert acks.calls == []


# -- the consumer ----------------------------------------------------------------------

def consumer_state(committed: dict[TP, int | None] | None = None) -> Any:
    return SimpleNamespace(
        _committed_offset=defaultdict(lambda: None, committed or {}),
        _acked=defaultdict(list), _acked_index=defaultdict(set), _gap=defaultdict(list),
        _n_acked=0, app=SimpleNamespace(monitor=SimpleNamespace(stream_inbound_time={})))


def test_acked_ranges_let_faust_commit_past_skipped_offsets() -> None:
    c = consumer_state({A: 100})
    # Offsets 103 and 107 were transaction markers: the inbox's covers include them.
    _Consumer.ack_range(c, A, 100, 105)
    _Consumer.ack_range(c, A, 106, 110)
    assert c._n_acked == 11
    assert fa.Consumer._new_offset(c, A) == 111  # the offset Faust commits


def test_processed_ranges_tell_faust_the_partition_is_moving() -> None:
    """Faust's event-path check reads when a stream last took an event of a partition;
    records taken through the inbox never told it, so under steady input a busy worker
    logged a 15-line ERROR per partition every few seconds ("Stream has not started
    processing"), from five minutes after its start."""
    c = consumer_state({A: 100})
    assert A not in c.app.monitor.stream_inbound_time
    before = time.monotonic()
    _Consumer.ack_range(c, A, 100, 105)
    assert before <= c.app.monitor.stream_inbound_time[A] <= time.monotonic()
    c.app.monitor = None  # a worker without Faust's monitor
    _Consumer.ack_range(c, A, 106, 110)
    assert c._n_acked == 11


def test_acked_ranges_below_the_committed_offset_count_nothing() -> None:
    c = consumer_state({A: 50})
    _Consumer.ack_range(c, A, 40, 49)
    assert c._acked[A] == [] and c._n_acked == 0
    _Consumer.ack_range(c, A, 45, 52)
    assert c._acked[A] == [50, 51, 52]


class _FakeKafkaConsumer:
    """aiokafka's consumer as ``_Consumer._fetch_again`` sees it on the consumer thread."""

    def __init__(self, assigned: set[TP]) -> None:
        self._coordinator = SimpleNamespace(generation=1)
        self.assigned = assigned
        self.seeks: list[tuple[TP, int]] = []

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    def seek(self, tp: Any, offset: int) -> None:
        assert tp in self.assigned
        self.seeks.append((TP(tp.topic, tp.partition), offset))


class _FakeThread:
    def __init__(self, kafka: _FakeKafkaConsumer) -> None:
        self.kafka = kafka

    def _ensure_consumer(self) -> _FakeKafkaConsumer:
        return self.kafka

    async def call_thread(self, fun: Any, *args: Any) -> Any:
        return await fun(*args)


class _FakeConsumer:
    """The state ``_Consumer.getmany`` reads, around a real inbox."""

    _fetch_again = _Consumer._fetch_again
    fetch_sizer = None  # fetches at Kafka's default minimum (tests/unit/test_fetch_size.py)

    def __init__(self, box: Inbox, records: dict[TP, list[Any]],
                 active: set[TP] | None = None) -> None:
        self.inbox = box
        self.records = records
        self.active = active
        self.flow_active = True
        self.should_stop = False
        self.app = SimpleNamespace(consumer_generation_id=1)
        self._buffered_partitions: set[TP] = set()
        self._read_offset: dict[TP, int] = {}
        self.seeks = 0
        self.kafka = _FakeKafkaConsumer({A, B, C, TP("examples", 0)})
        self._thread = _FakeThread(self.kafka)
        self.log = SimpleNamespace(warning=lambda *a: None, info=lambda *a: None)
        self.scheduler = SimpleNamespace(
            iterate=lambda recs: ((tp, r) for tp, rs in recs.items() for r in rs))

    async def _wait_next_records(self, timeout: float) -> Any:
        return self.records, self.active

    async def perform_seek(self) -> None:
        self.seeks += 1

    def _to_message(self, tp: TP, record: Any) -> Any:
        return ("message", tp, record.offset)


def kafka_records(tp: TP, offsets: list[int]) -> list[Any]:
    return [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=o, key=b"k",
                            value=b"v", timestamp=1000 + o) for o in offsets]


async def drain(consumer: _FakeConsumer) -> list[Any]:
    return [m async for m in _Consumer.getmany(consumer, 1.0)]  # type: ignore[arg-type]


def test_getmany_puts_each_input_partition_fetch_whole_and_yields_other_topics() -> None:
    box = Inbox(["clickstream"], 100, Acks())
    examples = TP("examples", 0)
    c = _FakeConsumer(box, {A: kafka_records(A, [4, 5, 6]),
                            examples: kafka_records(examples, [9]),
                            B: kafka_records(B, [1])})
    yielded = asyncio.run(drain(c))
    assert yielded == [(examples, ("message", examples, 9))]
    assert c._read_offset == {A: 6, B: 1}
    batch = box.take(10)
    assert [(r.partition, r.offset, r.timestamp_ms) for r in batch.records] == [
        (0, 4, 1004), (0, 5, 1005), (0, 6, 1006), (1, 1, 1001)]


def test_getmany_skips_partitions_no_longer_active_and_fetches_them_again() -> None:
    acks = Acks()
    box = Inbox(["clickstream"], 100, acks)
    box.assign([A])
    c = _FakeConsumer(box, {A: kafka_records(A, [1, 2])})

    async def run() -> None:
        await drain(c)
        box.done(box.take(10))
        c.records, c.active = {A: kafka_records(A, [3, 4])}, {B}  # A paused meanwhile
        await drain(c)
        assert box.size == 0
        assert c.kafka.seeks == [(A, 3)]  # the next fetch of A starts at 3 again
        c.records, c.active = {A: kafka_records(A, [3, 4, 5])}, None
        await drain(c)
        box.done(box.take(10))

    asyncio.run(run())
    assert acks.calls == [(A, 1, 2), (A, 3, 5)]


def test_getmany_with_flow_stopped_seeks_back_to_what_it_fetched_and_puts_nothing() -> None:
    """aiokafka's seek to the committed offsets leaves a partition nothing was committed for
    where it is: without the seek to the first record fetched, the records are lost."""
    box = Inbox(["clickstream"], 100, Acks())
    examples = TP("examples", 0)
    c = _FakeConsumer(box, {A: kafka_records(A, [0, 1]), B: kafka_records(B, [7]),
                            examples: kafka_records(examples, [3])})
    c.flow_active = False
    c.kafka.assigned.discard(B)  # a partition this worker no longer has: left alone
    assert asyncio.run(drain(c)) == []
    assert c.seeks == 1 and box.size == 0 and c._read_offset == {}
    assert sorted(c.kafka.seeks) == [(A, 0), (examples, 3)]


def test_getmany_fetches_again_what_it_could_not_put_when_the_flow_stopped_meanwhile(
) -> None:
    acks = Acks()
    box = Inbox(["clickstream"], 1, acks)
    box.assign([A, B])
    c = _FakeConsumer(box, {A: kafka_records(A, [5]), B: kafka_records(B, [8, 9])})

    async def run() -> None:
        await box.put(A, recs(A, [4]))  # full
        task = asyncio.ensure_future(drain(c))
        await asyncio.sleep(0.01)
        c.flow_active = False  # a rebalance begins; no new assignment yet
        box.done(box.take(10))
        await asyncio.wait_for(task, 1)

    asyncio.run(run())
    assert c.kafka.seeks == [(B, 8)]
    assert [r.offset for r in box.take(10).records] == [5]


def test_getmany_does_not_seek_under_a_newer_assignment() -> None:
    box = Inbox(["clickstream"], 100, Acks())
    c = _FakeConsumer(box, {A: kafka_records(A, [5])})
    c.flow_active = False
    c.kafka._coordinator.generation = 2  # the records were fetched under generation 1
    asyncio.run(drain(c))
    assert c.kafka.seeks == [] and c.seeks == 1


def test_getmany_stops_at_a_rebalance_that_began_while_the_inbox_was_full() -> None:
    acks = Acks()
    box = Inbox(["clickstream"], 1, acks)
    box.assign([A, B])
    c = _FakeConsumer(box, {A: kafka_records(A, [5]), B: kafka_records(B, [8])})

    async def run() -> None:
        await box.put(A, recs(A, [4]))  # full
        task = asyncio.ensure_future(drain(c))
        await asyncio.sleep(0.01)
        assert not task.done()
        c.app.consumer_generation_id = 2  # a rebalance assigned partitions anew
        c.kafka._coordinator.generation = 2
        box.done(box.take(10))  # room again
        await asyncio.wait_for(task, 1)
        # A's fetch went in; B's was dropped and its position is not claimed; the new
        # assignment positions B itself (no seek under it for records of the old one).
        assert [r.offset for r in box.take(10).records] == [5]
        assert B not in c._read_offset
        assert c.kafka.seeks == []
        await box.put(B, recs(B, [12]))
        box.done(box.take(10))

    asyncio.run(run())
    assert (B, 12, 12) in acks.calls and not any(t == B and f < 12 for t, f, _ in acks.calls)


def test_getmany_decodes_input_records_as_it_puts_them_with_the_engines_decoder() -> None:
    s = load_settings()
    decode = Engine(s).app.decode_input
    assert decode is not None
    click = orjson.dumps({"event_id": "e1", "customer_id": "k", "ts": 1_735_689_600_000,
                          "event_type": "login"})
    fetched = kafka_records(TP(s.clickstream_topic, 0), [4, 5])
    fetched[0].value = click
    box = Inbox([s.clickstream_topic], 100, Acks())
    c = _FakeConsumer(box, {TP(s.clickstream_topic, 0): fetched})
    c.app.decode_input = decode
    asyncio.run(drain(c))
    first, second = box.take(10).records
    assert (first.decoded.customer_id, first.decoded.event_id) == ("k", "e1")
    assert second.decoded.reason == "not_json"
