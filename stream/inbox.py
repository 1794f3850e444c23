"""Input records handed from the Kafka fetch to the ingest loop a fetch at a time.

A Faust stream moves every record through the conductor, the topic's queue, the
stream's iterator and an ack chain, one event loop turn each: ``segstream bench``
measured that path (Faust's own floor, F) at 31 to 39 CPU µs per record, and the
engine only batched the records again after it. Taking the records a fetch at a
time lifted the engine's throughput from about 4,900 to about 12,000 events/s in
the same benchmark run on 60,000 events (docs/performance.md, "The inbox and the
learner process").

The worker's consumer instead puts what one fetch returned for an input partition
into an :class:`Inbox` as one chunk, and the ingest loop takes micro-batches out of
it (:meth:`Inbox.batches`). Nothing else changes: the consumer still fetches,
pauses, seeks and commits as Faust does, and offsets still only move past a record
once its batch was processed, because a batch's offsets are acked into the
consumer's own bookkeeping (the lists Faust's ``Consumer.ack`` fills) only after
the ingest loop asks for the next batch. What a fetch returned for a partition
covers every offset from the one after the partition's previous record to its own
last record: offsets Kafka skipped (transaction markers, compacted records) are
acked with their neighbours, so they never hold a commit back.

Records of a revoked partition still waiting here are dropped (their new owner
fetches them again from the committed offset), and a batch finishing after its
partition was revoked acks nothing for it.

**Catch-up is aligned on event time** (``align_wait_s`` > 0, ``SEGSTREAM_ALIGN_WAIT_S``).
Kafka hands out each partition's records at its own pace: while a backlog is worked off,
a fetch can bring a week of purchases and an hour of clicks, and a batch would then
evaluate customers at an engine time ahead of their own clicks still unread. As Kafka
Streams does for the partitions of one task, a batch only takes a partition's records up
to the *cut*: the smallest event time fetched so far among the partitions that still
have records in Kafka (a partition Kafka has nothing more of does not hold the others
back). What lies beyond the cut waits, a partition prefix at a time (offsets still move
in order), and a partition with many records waiting past the cut (:meth:`Inbox.pause_at`)
is paused (``flow``) so its fetches stop until the others have caught up, which bounds
what waits. A batch smaller than what may go takes the oldest events first. A partition
whose fetch does not come (a broker down) holds the others back at most
``align_wait_s``: then the batch takes what waits, unaligned; so does a full inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from bisect import bisect_right
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from stream.pipeline import RawRecord

#: How often a gathering batch checks whether anything is left to gather.
POLL_S = 0.005

#: The cut while a partition behind has fetched nothing yet: every event waits.
_NOTHING = -(1 << 63)
#: The cut when no partition is behind.
_EVERYTHING = (1 << 63) - 1


@dataclass(slots=True)
class _Chunk:
    """Records of one partition from one fetch, still waiting; they cover offsets
    ``start`` (inclusive) up to the last record's."""

    tp: Any
    records: list[RawRecord]
    start: int
    #: per record, the newest event time up to it (records without one: the smallest
    #: int); computed when the chunk is put (with the alignment on), dropped when it is split
    run: list[int] | None = None

    def newest(self) -> list[int]:
        run = self.run
        if run is None:
            low = _NOTHING
            times = [low if (ts := getattr(r.decoded, "ts_ms", None)) is None else ts
                     for r in self.records]
            run = self.run = list(accumulate(times, max))
        return run


@dataclass(slots=True)
class Batch:
    """Records taken together, and per partition the offsets they cover (first, last)."""

    records: list[RawRecord] = field(default_factory=list)
    covers: dict[Any, tuple[int, int]] = field(default_factory=dict)


class Inbox:
    """Fetched input records waiting for the ingest loop, in fetch order.

    ``ack(tp, first, last)`` is called once a batch was processed, for each partition
    it held that is still assigned: it should mark those offsets as done for the
    consumer's commits.
    """

    def __init__(self, topics: Collection[str], capacity: int,
                 ack: Callable[[Any, int, int], None], *,
                 lag: Callable[[Any], int | None] | None = None,
                 align_wait_s: float = 0.0,
                 flow: Callable[[set[Any], set[Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``lag(tp)``: records of ``tp`` Kafka holds beyond the last one put here (None:
        not known yet); with ``align_wait_s`` > 0 it turns on the alignment on event time.
        ``flow(pause, resume)`` pauses and resumes the fetching of those partitions."""
        if capacity < 1:
            raise ValueError("an inbox needs room for at least one record")
        if align_wait_s < 0:
            raise ValueError("align_wait_s must be 0 (off) or positive")
        self.topics = frozenset(topics)
        self.capacity = capacity
        self._ack = ack
        self._lag = lag
        self.align_wait_s = align_wait_s if lag is not None else 0.0
        self._flow = flow
        self._clock = clock
        #: per partition: the newest event time put here since it was assigned
        self._front: dict[Any, int] = {}
        #: per partition: when it was assigned (an unknown lag holds others back that long)
        self._since: dict[Any, float] = {}
        #: partitions paused because their records wait past the cut
        self._paused: set[Any] = set()
        #: since when takes have found only records past the cut (None: they take some)
        self._held_since: float | None = None
        #: records taken past the cut (a fetch that did not come, or a full inbox)
        self.unaligned = 0
        self._chunks: deque[_Chunk] = deque()
        self.size = 0
        #: per partition: the last offset put here (the next chunk covers from after it)
        self._last: dict[Any, int] = {}
        self._owned: set[Any] = set()
        self._arrived = asyncio.Event()
        #: counts assignments and revokes: a put that waited for room across one drops its records
        self._epoch = 0
        self._room = asyncio.Event()
        self._room.set()

    def owns(self, tp: Any) -> bool:
        """Whether ``tp`` is assigned to this worker (and not revoked since)."""
        return tp in self._owned

    def assign(self, tps: Iterable[Any]) -> None:
        """These partitions are now this worker's (they start from wherever Kafka puts them)."""
        self._epoch += 1
        now = self._clock()
        resume = set()
        for tp in tps:
            if tp.topic in self.topics:
                self._owned.add(tp)
                self._last.pop(tp, None)
                self._front.pop(tp, None)
                self._since[tp] = now
                if tp in self._paused:
                    resume.add(tp)
        if resume:
            # Faust keeps a partition paused across a rebalance that gives it back; what
            # held it here was dropped with the revoke.
            self._paused -= resume
            self._set_flow(set(), resume)

    def forget_position(self, tp: Any) -> None:
        """Records of ``tp`` were fetched and not put here: the next chunk covers only
        its own offsets, never the ones skipped."""
        self._last.pop(tp, None)

    def revoke(self, tps: Iterable[Any]) -> int:
        """These partitions left: drop what waits of them; returns how many records."""
        self._epoch += 1
        gone = {tp for tp in tps if tp.topic in self.topics}
        if not gone:
            return 0
        self._owned.difference_update(gone)
        for tp in gone:
            self._last.pop(tp, None)
            self._front.pop(tp, None)
            self._since.pop(tp, None)
        self._paused -= gone
        kept: deque[_Chunk] = deque()
        dropped = 0
        for chunk in self._chunks:
            if chunk.tp in gone:
                dropped += len(chunk.records)
            else:
                kept.append(chunk)
        self._chunks = kept
        self.size -= dropped
        if not kept:
            self._arrived.clear()
        self._update_room()
        return dropped

    async def put(self, tp: Any, records: Sequence[RawRecord]) -> bool:
        """Add one partition's fetched records (in offset order); waits while the inbox
        is full. Records at or below the last offset already put are ignored. A list given
        here is kept as it is (not copied): the caller hands it over.

        Returns False, keeping nothing, when partitions were assigned or revoked while it
        waited for room: a rebalance happened, the consumer goes back to the committed
        offsets, and records fetched before it must not be taken (a revoked partition's
        would be processed by a worker that no longer owns it; one that came back would
        leave a hole between its committed offset and these records)."""
        epoch = self._epoch
        while self.size >= self.capacity:
            self._room.clear()
            await self._room.wait()
        if self._epoch != epoch:
            return False
        last = self._last.get(tp)
        # Only a fetch after a seek back repeats offsets: the usual one is taken as it is.
        if last is not None and records and records[0].offset <= last:
            records = [r for r in records if r.offset > last]
        if not records:
            return True
        start = records[0].offset if last is None else last + 1
        self._last[tp] = records[-1].offset
        # A chunk is split in place by take(): keep a list of our own.
        own = records if isinstance(records, list) else list(records)
        chunk = _Chunk(tp, own, start)
        self._chunks.append(chunk)
        if self.align_wait_s:
            # The chunk's running newest event time, which take() needs anyway.
            newest = chunk.newest()[-1]
            if newest != _NOTHING and newest > self._front.get(tp, _NOTHING):
                self._front[tp] = newest
        self.size += len(records)
        self._arrived.set()
        return True

    @property
    def paused(self) -> int:
        """Input partitions paused now because their records wait past the cut."""
        return len(self._paused)

    def cut(self) -> int | None:
        """The newest event time a batch may take now (None: any).

        The smallest newest event time fetched among the assigned partitions that Kafka
        still holds records of; a partition whose lag is not known yet counts (as having
        fetched nothing) for ``align_wait_s`` after its assignment, and not after it.
        """
        if not self.align_wait_s or self._lag is None:
            return None
        lag, front, since = self._lag, self._front, self._since
        limit = self._clock() - self.align_wait_s
        cut: int | None = None
        for tp in self._owned:
            behind = lag(tp)
            if behind is None:
                if since.get(tp, limit) <= limit:
                    continue
            elif behind <= 0:
                continue
            ts = front.get(tp)
            if ts is None:
                return _NOTHING
            if cut is None or ts < cut:
                cut = ts
        return cut

    def take(self, max_: int, aligned: bool = True) -> Batch:
        """Up to ``max_`` waiting records, oldest fetch first (a chunk may be split); with
        ``aligned``, only each partition's records up to :meth:`cut` (see the module)."""
        if not (aligned and self.align_wait_s):
            batch = self._take_all(max_)
            if self._paused:
                resume, self._paused = self._paused, set()
                self._set_flow(set(), resume)
            return batch
        cut = self.cut()
        if cut is None:
            cut = _EVERYTHING  # nothing behind: still the oldest events first
        # Per partition, the prefix of what waits up to the cut (a partition's chunks in
        # order, none after one that stops short).
        items: list[tuple[_Chunk, int]] = []
        held: set[Any] = set()
        total = 0
        for chunk in self._chunks:
            if chunk.tp in held:
                continue
            n = bisect_right(chunk.newest(), cut)
            if n < len(chunk.records):
                held.add(chunk.tp)
            if n:
                items.append((chunk, n))
                total += n
        if total > max_:
            # More than a batch: take the oldest events first, up to a time that leaves
            # at most max_ (a partition's order still decides where its prefix ends).
            cut = self._cut_for(items, max_, cut)
        batch = Batch()
        taken: dict[int, int] = {}
        stopped: set[Any] = set()
        room = max_
        for chunk, n in items:
            tp = chunk.tp
            if tp in stopped or room <= 0:
                continue
            run = chunk.newest()
            k = min(bisect_right(run, cut, 0, n), room)
            if k < len(chunk.records):
                stopped.add(tp)
            if not k:
                continue
            part = chunk.records[:k]
            first = chunk.start
            chunk.start = part[-1].offset + 1
            batch.records.extend(part)
            prev = batch.covers.get(tp)
            batch.covers[tp] = (prev[0] if prev else first, part[-1].offset)
            taken[id(chunk)] = k
            room -= k
        if taken:
            kept: deque[_Chunk] = deque()
            for chunk in self._chunks:
                k = taken.get(id(chunk), 0)
                if k == len(chunk.records):
                    continue
                if k:
                    del chunk.records[:k]
                    chunk.run = None
                kept.append(chunk)
            self._chunks = kept
            self.size -= len(batch.records)
            if not kept:
                self._arrived.clear()
            self._update_room()
        if held or self._paused:
            # A partition is paused once many of its records wait past the cut, and
            # fetched again once few do: a live partition a few records ahead keeps
            # its fetches (pausing it would only make it fall behind).
            waiting: dict[Any, int] = {}
            for chunk in self._chunks:
                waiting[chunk.tp] = waiting.get(chunk.tp, 0) + len(chunk.records)
            high = self.pause_at()
            pause = {tp for tp in held - self._paused if waiting.get(tp, 0) >= high}
            resume = {tp for tp in self._paused
                      if tp not in held or waiting.get(tp, 0) < high // 2}
        else:
            pause = resume = set()
        if pause or resume:
            self._paused = (self._paused | pause) - resume
            self._set_flow(pause, resume)
        return batch

    def pause_at(self) -> int:
        """Records of one partition waiting past the cut that pause its fetching: a
        quarter of the inbox shared among the partitions assigned."""
        return max(1, self.capacity // (4 * max(1, len(self._owned))))

    @staticmethod
    def _cut_for(items: list[tuple[_Chunk, int]], max_: int, cut: int) -> int:
        """The newest event time up to which the prefixes of ``items`` (cut at ``cut``)
        hold at most ``max_`` records; the oldest such time when none does (ties)."""

        def count(c: int) -> int:
            total = 0
            stopped: set[Any] = set()
            for chunk, n in items:
                if chunk.tp in stopped:
                    continue
                k = bisect_right(chunk.newest(), c, 0, n)
                total += k
                if k < len(chunk.records):
                    stopped.add(chunk.tp)
            return total

        lo = min(chunk.newest()[0] for chunk, _ in items)  # count(lo) >= 1
        if count(lo) > max_:
            return lo
        hi = cut  # count(hi) > max_
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if count(mid) <= max_:
                lo = mid
            else:
                hi = mid
        return lo

    def _take_all(self, max_: int) -> Batch:
        batch = Batch()
        chunks = self._chunks
        while chunks and len(batch.records) < max_:
            chunk = chunks[0]
            room = max_ - len(batch.records)
            if len(chunk.records) <= room:
                chunks.popleft()
                part = chunk.records
            else:
                part = chunk.records[:room]
                del chunk.records[:room]
                chunk.run = None
            first = chunk.start
            chunk.start = part[-1].offset + 1
            batch.records.extend(part)
            prev = batch.covers.get(chunk.tp)
            batch.covers[chunk.tp] = (prev[0] if prev else first, part[-1].offset)
        self.size -= len(batch.records)
        if not chunks:
            self._arrived.clear()
        self._update_room()
        return batch

    def _set_flow(self, pause: set[Any], resume: set[Any]) -> None:
        if self._flow is not None:
            self._flow(pause, resume)

    def done(self, batch: Batch) -> None:
        """The batch was processed: ack its offsets of partitions still assigned."""
        for tp, (first, last) in batch.covers.items():
            if tp in self._owned:
                self._ack(tp, first, last)

    def _update_room(self) -> None:
        if self.size < self.capacity:
            self._room.set()

    async def batches(self, max_: int, within_s: float, backlog: Callable[[], int],
                      should_stop: Callable[[], bool] = lambda: False
                      ) -> AsyncIterator[list[RawRecord]]:
        """Micro-batches of at most ``max_`` records.

        A batch is handed over when it could hold ``max_`` records, or holds at least
        one and either Kafka has nothing more for this worker's partitions
        (``backlog() <= 0``) or it has gathered for ``within_s``. Its offsets are acked
        when the next batch is asked for; a batch the caller did not finish (it raised,
        or was cancelled) is never acked, so its records are fetched again after a
        restart or a rebalance.
        """
        if max_ < 1:
            raise ValueError("a batch holds at least one record")
        clock = time.monotonic
        while not should_stop():
            if not self.size:
                # Cleared first: a set event returns from wait() without ever suspending,
                # and this loop would then hold the event loop (and the rebalance) forever.
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = clock() + within_s
            while self.size < max_ and clock() < deadline and backlog() > 0 \
                    and not should_stop():
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), POLL_S)
            if should_stop():
                return
            batch = self.take(max_)
            if not batch.records and self.size:
                # Everything waiting lies past the cut: wait for the partitions behind,
                # at most align_wait_s, and not at all when nothing more can come in.
                now = clock()
                if self._held_since is None:
                    self._held_since = now
                if self.size < self.capacity and now - self._held_since < self.align_wait_s:
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), POLL_S)
                    continue
                batch = self.take(max_, aligned=False)
                self.unaligned += len(batch.records)
            self._held_since = None
            if not batch.records:
                continue  # a revoke dropped everything while the batch gathered
            yield batch.records
            self.done(batch)
