"""Micro-batching (``stream.batching``): sizes, hand-over moments and acknowledgement order.

``take_batches`` uses a small part of a Faust stream: a processor called once per event by
the stream's passive drainer, ``current_event``, ``wait``/``wait_for_stopped`` and
``ack``. :class:`Feed` provides exactly that part over a list of arrival times, so these
tests check the batching logic itself; the worker's integration and fault tests run it on
a real Faust stream and broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.batching import Drained, assigned_positions, kafka_backlog, take_batches


class _Queue:
    def __init__(self) -> None:
        self.items = 0

    def empty(self) -> bool:
        return self.items == 0


class _Channel:
    def __init__(self) -> None:
        self.queue = _Queue()

    def __aiter__(self) -> _Channel:
        return self


class Feed:
    """A stream whose events arrive at given offsets (seconds) from the start."""

    def __init__(self, arrivals: list[float]) -> None:
        self.arrivals = arrivals
        self.channel = _Channel()
        self.current_event: int | None = None
        self.enable_acks = True
        self.should_stop = False
        self._processors: list[Callable[[Any], Awaitable[Any]]] = []
        self.acked: list[int] = []
        self.delivered = 0
        self.loop = asyncio.get_running_loop()
        self.log = self
        self.task: asyncio.Task[None] | None = None

    # -- what take_batches uses --------------------------------------------------------
    def add_processor(self, fn: Callable[[Any], Awaitable[Any]]) -> None:
        self._processors.append(fn)

    def _enable_passive(self, channel: Any) -> None:
        self.task = asyncio.ensure_future(self._drain())

    async def wait(self, event: asyncio.Event) -> None:
        await event.wait()

    async def wait_for_stopped(self, event: asyncio.Event, timeout: float | None = None
                               ) -> bool:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return True  # as mode: a timeout also reads "stopped"
        return False

    async def ack(self, event: int) -> None:
        self.acked.append(event)

    def exception(self, *args: Any) -> None:
        raise AssertionError(args)

    async def crash(self, exc: BaseException) -> None:
        raise AssertionError(exc)

    # -- the passive drainer -----------------------------------------------------------
    async def _drain(self) -> None:
        start = time.monotonic()
        for i, at in enumerate(self.arrivals):
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.channel.queue.items = 1  # the event sits in the stream's queue
            await asyncio.sleep(0)
            self.channel.queue.items = 0
            self.current_event = i
            self.delivered = i + 1
            for fn in self._processors:
                await fn(i)
            await asyncio.sleep(0)  # Faust takes a loop turn per event

    def pending(self) -> int:
        """Events not yet delivered to the stream (what Kafka would still hold)."""
        return len(self.arrivals) - self.delivered


async def _collect(feed: Feed, max_: int, within: float, drained: Callable[[], bool],
                   work: float = 0.0) -> list[tuple[list[int], float, list[int]]]:
    """(batch, seconds since start at hand-over, acks before it was handed over) each."""
    out = []
    start = time.monotonic()
    n = len(feed.arrivals)
    seen = 0
    async for batch in take_batches(feed, max_, within, drained):
        out.append((batch, time.monotonic() - start, list(feed.acked)))
        if work:
            await asyncio.sleep(work)  # processing, with awaits as the engine's has
        seen += len(batch)
        if seen >= n:
            break
    feed.should_stop = True
    return out


def _run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), max_=st.integers(1, 120), burst=st.booleans(),
       work=st.sampled_from([0.0, 0.003]))
def test_every_event_once_in_order_and_acked_only_after_its_batch(n: int, max_: int,
                                                                  burst: bool,
                                                                  work: float) -> None:
    arrivals = [0.0] * n if burst else [i * 0.0005 for i in range(n)]

    async def go() -> tuple[Feed, list[tuple[list[int], float, list[int]]]]:
        feed = Feed(arrivals)
        return feed, await _collect(feed, max_, 0.05, lambda: feed.pending() == 0, work)

    feed, batches = _run(go())
    flat = [e for b, _, _ in batches for e in b]
    assert flat == list(range(n))
    assert all(1 <= len(b) <= max_ for b, _, _ in batches)
    for k, (_, _, acked_before) in enumerate(batches):
        # Nothing of this batch or a later one was acked before the batch was handed over,
        # and every earlier batch was acked by then.
        assert set(acked_before) == {e for b, _, _ in batches[:k] for e in b}
    # The last batch is acked once the iteration ends.
    assert feed.acked == list(range(n))


def test_a_drained_batch_is_handed_over_at_once() -> None:
    """A few events and nothing more waiting: no waiting for the window."""
    async def go() -> list[tuple[list[int], float, list[int]]]:
        feed = Feed([0.0, 0.0, 0.0])
        return await _collect(feed, 1000, 5.0, lambda: feed.pending() == 0)

    batches = _run(go())
    assert [b for b, _, _ in batches] == [[0, 1, 2]]
    assert batches[0][1] < 0.5  # the window is 5 s


def test_while_records_wait_the_batch_keeps_gathering() -> None:
    """Records still waiting in Kafka keep the batch open (up to the window)."""
    arrivals = [i * 0.002 for i in range(100)]  # 0.2 s of steady input

    async def go() -> list[tuple[list[int], float, list[int]]]:
        feed = Feed(arrivals)
        # Everything was produced at once: Kafka holds the rest until it is delivered.
        return await _collect(feed, 1000, 5.0, lambda: feed.pending() == 0)

    batches = _run(go())
    assert [len(b) for b, _, _ in batches] == [100]


def test_the_window_bounds_a_batch_that_never_drains() -> None:
    arrivals = [i * 0.01 for i in range(60)]  # 0.6 s

    async def go() -> list[tuple[list[int], float, list[int]]]:
        feed = Feed(arrivals)
        return await _collect(feed, 1000, 0.1, lambda: False)

    batches = _run(go())
    assert len(batches) >= 4  # about 0.6 s / 0.1 s
    assert all(len(b) <= 15 for b, _, _ in batches)


def test_a_full_batch_is_handed_over_without_waiting() -> None:
    async def go() -> list[tuple[list[int], float, list[int]]]:
        feed = Feed([0.0] * 50)
        return await _collect(feed, 10, 5.0, lambda: False)

    batches = _run(go())
    assert [len(b) for b, _, _ in batches] == [10] * 5
    assert batches[-1][1] < 1.0


def test_drained_reads_the_stream_queue_then_the_backlog() -> None:
    async def go() -> list[bool]:
        feed = Feed([])
        backlog = [0]
        d = Drained(feed, lambda: backlog[0])
        out = [d()]
        backlog[0] = 5
        out.append(d())
        backlog[0] = 0
        feed.channel.queue.items = 1
        out.append(d())
        return out

    assert _run(go()) == [True, False, False]


class _TP:
    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition


class _App:
    """The consumer positions ``kafka_backlog`` reads, as Faust keeps them."""

    def __init__(self, rows: dict[_TP, tuple[int | None, int | None, int | None]]) -> None:
        self.rows = rows
        self.consumer = self
        self._committed_offset = {tp: c for tp, (_, c, _) in rows.items() if c is not None}
        self._read_offset = {tp: r for tp, (_, _, r) in rows.items() if r is not None}
        self.assignor = self

    def assigned_actives(self) -> set[_TP]:
        return set(self.rows)

    def highwater(self, tp: _TP) -> int | None:
        return self.rows[tp][0]


def test_backlog_counts_undelivered_records_of_the_input_partitions() -> None:
    a, b, c, d, other = (_TP("in", 0), _TP("in", 1), _TP("in", 2), _TP("in", 3),
                         _TP("examples", 0))
    app = _App({
        a: (100, 40, 89),     # delivered up to 89: 90..99 wait -> 10
        b: (50, 20, None),    # nothing delivered yet: from the committed offset -> 30
        c: (None, 5, 7),      # not fetched yet: nothing known -> 0
        d: (10, None, None),  # no position at all -> 0
        other: (1000, 0, None),
    })
    assert kafka_backlog(app, {"in"}) == 40
    assert {tp.partition for tp, *_ in assigned_positions(app, {"in"})} == {0, 1, 2, 3}
    assert kafka_backlog(object(), {"in"}) == 0  # not started: nothing known to wait
