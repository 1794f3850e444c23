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
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stream.pipeline import RawRecord

#: How often a gathering batch checks whether anything is left to gather.
POLL_S = 0.005


@dataclass(slots=True)
class _Chunk:
    """Records of one partition from one fetch, still waiting; they cover offsets
    ``start`` (inclusive) up to the last record's."""

    tp: Any
    records: list[RawRecord]
    start: int


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
                 ack: Callable[[Any, int, int], None]) -> None:
        if capacity < 1:
            raise ValueError("an inbox needs room for at least one record")
        self.topics = frozenset(topics)
        self.capacity = capacity
        self._ack = ack
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
        for tp in tps:
            if tp.topic in self.topics:
                self._owned.add(tp)
                self._last.pop(tp, None)

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
        self._chunks.append(_Chunk(tp, own, start))
        self.size += len(records)
        self._arrived.set()
        return True

    def take(self, max_: int) -> Batch:
        """Up to ``max_`` waiting records, oldest fetch first (a chunk may be split)."""
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
            if not batch.records:
                continue  # a revoke dropped everything while the batch gathered
            yield batch.records
            self.done(batch)
