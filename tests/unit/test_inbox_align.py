"""The inbox's alignment of catch-up on event time (stream.inbox, SEGSTREAM_ALIGN_WAIT_S).

A batch takes no record newer than the smallest newest event time fetched among the
partitions Kafka still holds records of; what waits past that cut keeps its partition's
order, pauses the partition's fetching, and is taken unaligned only when a partition's
fetch does not come within ``align_wait_s`` or the inbox is full.
"""

from __future__ import annotations

import asyncio
from itertools import pairwise
from typing import Any, NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from features.events import ClickEvent
from stream.inbox import Inbox
from stream.pipeline import RawRecord
from stream.schemas import Rejection


class TP(NamedTuple):
    topic: str
    partition: int


A, B, C = TP("clickstream", 0), TP("clickstream", 1), TP("transactions", 0)
TPS = (A, B, C)


def rec(tp: TP, offset: int, ts: int | None) -> RawRecord:
    decoded: Any = (Rejection("invalid_json", "not JSON") if ts is None
                    else ClickEvent(f"e{offset}", "c", ts, "page_view", None, None))
    return RawRecord(tp.topic, tp.partition, offset, b"k", b"v", 0, decoded)


class World:
    """Kafka as the inbox sees it: per partition its log end, and the flow calls."""

    def __init__(self, ends: dict[TP, int | None]) -> None:
        self.ends = ends
        self.read: dict[TP, int] = {}
        self.paused: set[TP] = set()
        self.flows: list[tuple[set[TP], set[TP]]] = []
        self.now = 0.0

    def lag(self, tp: TP) -> int | None:
        end = self.ends.get(tp)
        if end is None:
            return None
        return max(0, end - self.read.get(tp, 0))

    def flow(self, pause: set[TP], resume: set[TP]) -> None:
        self.flows.append((set(pause), set(resume)))
        assert not pause & self.paused, "paused twice"
        assert resume <= self.paused, "resumed without a pause"
        self.paused = (self.paused | pause) - resume

    def clock(self) -> float:
        return self.now


def make(world: World, capacity: int = 10_000, wait: float = 2.0) -> tuple[Inbox, list]:
    acks: list[tuple[TP, int, int]] = []
    box = Inbox(["clickstream", "transactions"], capacity,
                lambda tp, a, b: acks.append((tp, a, b)), lag=world.lag,
                align_wait_s=wait, flow=world.flow, clock=world.clock)
    box.assign(TPS)
    return box, acks


async def put(box: Inbox, world: World, tp: TP, records: list[RawRecord]) -> None:
    await box.put(tp, records)
    world.read[tp] = records[-1].offset + 1


def test_a_partition_ahead_waits_for_the_one_behind_and_is_paused_meanwhile() -> None:
    world = World({A: 10, C: 10, B: 0})  # B: Kafka holds nothing of it

    async def run() -> None:
        box, _ = make(world, capacity=12)  # a partition pauses at one record waiting
        await put(box, world, C, [rec(C, 0, 100), rec(C, 1, 500), rec(C, 2, 900)])
        await put(box, world, A, [rec(A, 0, 50), rec(A, 1, 300)])
        # A and C both have more in Kafka; A has fetched up to 300: C's 500 waits.
        assert box.cut() == 300
        batch = box.take(100)
        assert [(r.topic, r.offset) for r in batch.records] == [
            ("transactions", 0), ("clickstream", 0), ("clickstream", 1)]
        assert batch.covers == {C: (0, 0), A: (0, 1)}
        assert world.paused == {C}
        # A's next fetch passes 500: C's 500 goes, its 900 waits (offsets stay in order).
        await put(box, world, A, [rec(A, 2, 600)])
        batch = box.take(100)
        assert [(r.topic, r.offset) for r in batch.records] == [
            ("transactions", 1), ("clickstream", 2)]
        assert world.paused == {C}
        # A reaches its log end: nothing holds C back any more, and C is fetched again.
        world.ends[A] = 3
        batch = box.take(100)
        assert [(r.topic, r.offset) for r in batch.records] == [("transactions", 2)]
        assert world.paused == set()
        assert box.size == 0 and box.unaligned == 0

    asyncio.run(run())


def test_records_without_an_event_time_never_wait_but_keep_their_partitions_order() -> None:
    world = World({A: 10, C: 10, B: 0})

    async def run() -> None:
        box, _ = make(world)
        await put(box, world, A, [rec(A, 0, 10)])
        await put(box, world, C, [rec(C, 0, None), rec(C, 1, 50), rec(C, 2, None)])
        batch = box.take(100)
        # The rejection before C's 50 goes; the one after it waits behind it.
        assert [(r.topic, r.offset) for r in batch.records] == [
            ("clickstream", 0), ("transactions", 0)]

    asyncio.run(run())


def test_an_unknown_lag_holds_the_others_back_only_for_align_wait_after_assignment() -> None:
    world = World({A: 10, B: 0, C: None})  # C: no fetch answered yet

    async def run() -> None:
        box, _ = make(world, wait=2.0)
        await put(box, world, A, [rec(A, 0, 10)])
        assert box.take(100).records == []  # C may still bring something older
        world.now = 2.5
        assert [r.offset for r in box.take(100).records] == [0]

    asyncio.run(run())


def test_without_lag_or_with_no_wait_nothing_is_aligned() -> None:
    world = World({A: 10, B: 10, C: 10})

    async def run() -> None:
        box, _ = make(world, wait=0.0)
        await put(box, world, B, [rec(B, 0, 10)])
        await put(box, world, A, [rec(A, 0, 900)])
        assert box.cut() is None
        assert len(box.take(100).records) == 2
        assert world.flows == []

    asyncio.run(run())


def test_a_batch_waits_for_the_fetch_behind_then_takes_unaligned_after_align_wait() -> None:
    world = World({A: 10, B: 0, C: 10})

    async def run() -> None:
        box, _ = make(world, wait=0.2)
        box._clock = __import__("time").monotonic  # real time for the batch loop
        box._since = {tp: box._clock() for tp in TPS}
        await put(box, world, A, [rec(A, 0, 10)])
        await put(box, world, C, [rec(C, 0, 5), rec(C, 1, 500)])
        it = box.batches(100, within_s=0.01, backlog=lambda: 1)
        first = await asyncio.wait_for(it.__anext__(), 1)
        assert [(r.topic, r.offset) for r in first] == [
            ("clickstream", 0), ("transactions", 0)]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        second = await asyncio.wait_for(it.__anext__(), 2)  # A's fetch never comes
        waited = loop.time() - t0
        assert [(r.topic, r.offset) for r in second] == [("transactions", 1)]
        assert waited >= 0.15
        assert box.unaligned == 1
        await it.aclose()

    asyncio.run(run())


def test_a_full_inbox_takes_unaligned_at_once() -> None:
    world = World({A: 10, B: 0, C: 10})

    async def run() -> None:
        box, _ = make(world, capacity=3, wait=60.0)
        await put(box, world, A, [rec(A, 0, 10)])
        await put(box, world, C, [rec(C, 0, 500), rec(C, 1, 600)])
        it = box.batches(100, within_s=0.01, backlog=lambda: 1)
        first = await asyncio.wait_for(it.__anext__(), 1)
        assert len(first) == 1
        await put(box, world, C, [rec(C, 2, 700)])  # full again, everything past the cut
        second = await asyncio.wait_for(it.__anext__(), 1)  # not 60 s
        assert [r.offset for r in second] == [0, 1, 2]
        await it.aclose()

    asyncio.run(run())


def test_a_revoke_and_reassignment_resume_a_paused_partition() -> None:
    world = World({A: 10, B: 0, C: 10})

    async def run() -> None:
        box, _ = make(world, capacity=12)
        await put(box, world, A, [rec(A, 0, 10)])
        await put(box, world, C, [rec(C, 0, 500)])
        box.take(100)
        assert world.paused == {C}
        box.assign([C])  # given back by a rebalance: nothing of it waits here any more
        assert world.paused == set()
        assert box.size == 1  # (the same fetch is dropped only by a revoke)
        box.revoke([C])
        assert box.size == 0

    asyncio.run(run())


@st.composite
def logs(draw: Any) -> dict[TP, list[int | None]]:
    """Per partition a log of event times (None: a record that fails to decode)."""
    out = {}
    out_of_order = draw(st.booleans())
    for tp in TPS:
        t = draw(st.integers(0, 100))
        times: list[int | None] = []
        for _ in range(draw(st.integers(0, 25))):
            if draw(st.integers(0, 9)) == 0:
                times.append(None)
                continue
            t += draw(st.integers(-5 if out_of_order else 0, 40))
            times.append(t)
        out[tp] = times
    return out


@settings(max_examples=300, deadline=None)
@given(logs(), st.sampled_from([12, 30, 1_000]), st.data())
def test_catch_up_takes_every_record_once_in_order_and_never_past_the_cut(
        log: dict[TP, list[int | None]], capacity: int, data: st.DataObject) -> None:
    """Random fetches and batches over partitions that all start behind: every record is
    taken once, per partition in offset order, acks cover exactly what was fetched, a
    paused partition is never fetched, and every record taken aligned is at most the
    newest event time every partition still behind had fetched."""
    world = World({tp: len(times) for tp, times in log.items()})
    box, acks = make(world, capacity=capacity)
    fetched_ts: dict[TP, list[int]] = {tp: [] for tp in TPS}
    taken: list[RawRecord] = []
    monotone = all(
        all(a <= b for a, b in pairwise(ts))
        for ts in ([t for t in times if t is not None] for times in log.values()))

    async def fetch(fetchable: list[TP]) -> None:
        tp = data.draw(st.sampled_from(fetchable))
        start = world.read.get(tp, 0)
        times = log[tp][start:start + data.draw(st.integers(1, 6))]
        await put(box, world, tp, [rec(tp, start + i, ts) for i, ts in enumerate(times)])
        fetched_ts[tp].extend(ts for ts in times if ts is not None)

    async def run() -> None:
        while box.size or any(world.read.get(tp, 0) < len(log[tp]) for tp in TPS):
            fetchable = [tp for tp in TPS if tp not in world.paused
                         and world.read.get(tp, 0) < len(log[tp])
                         and box.size < box.capacity]  # else put() waits for room
            if fetchable and data.draw(st.booleans()):
                await fetch(fetchable)
                continue
            behind = [tp for tp in TPS if world.read.get(tp, 0) < len(log[tp])]
            bound = min((max(fetched_ts[tp], default=-10**18) for tp in behind),
                        default=None)
            batch = box.take(data.draw(st.integers(1, 8)))
            for r in batch.records:
                ts = getattr(r.decoded, "ts_ms", None)
                assert bound is None or ts is None or ts <= bound, (r, bound)
            got = [t for r in batch.records if (t := getattr(r.decoded, "ts_ms", None)) is not None]
            if got and monotone:
                # A batch smaller than what may go takes the oldest events first.
                waiting = [t for c in box._chunks for r in c.records
                           if (t := getattr(r.decoded, "ts_ms", None)) is not None]
                assert max(got) <= min(waiting, default=max(got)), (got, waiting)
            if not batch.records:
                if fetchable:  # the batch loop waits for a fetch of a partition behind
                    await fetch(fetchable)
                    continue
                # Nothing can come (the inbox is full, or every partition behind is
                # paused): the batch loop takes unaligned.
                assert box.size
                batch = box.take(8, aligned=False)
            taken.extend(batch.records)
            box.done(batch)

    asyncio.run(run())
    for tp in TPS:
        assert [r.offset for r in taken if (r.topic, r.partition) == tp] == list(
            range(len(log[tp])))
        covered = [o for t, a, b in acks if t == tp for o in range(a, b + 1)]
        assert covered == list(range(len(log[tp])))
    assert world.paused == set()
