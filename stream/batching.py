"""Micro-batches from a Faust stream, as large as the input waiting for the worker.

Faust's ``Stream.take_events(max, within)`` hands a batch over after a fixed ``within``.
It gathers one event per event-loop turn and nothing while a batch is processed, so a
short ``within`` caps every batch at what Faust delivers in that time (a few hundred
events) however far behind the worker is, and a long one delays every event when input
is sparse. :func:`take_batches` hands a batch over as soon as it is *drained*: it holds
every record delivered so far and Kafka has none waiting beyond them (:class:`Drained`).
A worker that keeps up therefore processes each event almost at once, and one that is
behind gathers batches of up to ``max`` records, which share their Redis round trips and
evaluate each customer once for all of its events in the batch. ``within`` still bounds
how long one batch gathers.

Acknowledgement is as in ``take_events``: a batch's events are acked only once the
consumer of the batch asks for the next one, so Kafka offsets never pass an event whose
batch was not processed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any

from mode.utils.aiter import aiter
from mode.utils.futures import notify

#: How often a gathering batch checks whether anything is left to gather.
POLL_S = 0.005


@dataclass
class Drained:
    """Whether everything the worker could gather now is in the batch.

    True when no record waits in the stream's queue and ``backlog()`` (records Kafka
    holds for the worker's partitions beyond the last one delivered) is zero.
    """

    stream: Any
    backlog: Callable[[], int]

    def __call__(self) -> bool:
        queue = getattr(self.stream.channel, "queue", None)
        if queue is not None and not queue.empty():
            return False
        return self.backlog() <= 0


def assigned_positions(app: Any, topics: Collection[str]
                       ) -> list[tuple[Any, int | None, int | None, int | None]]:
    """``(tp, high watermark, committed offset, last delivered offset)`` per assigned partition.

    Only partitions of ``topics``; the high watermark is as of the consumer's latest fetch.
    Before the consumer runs or is assigned, the partitions read so far (often none).
    """
    out: list[tuple[Any, int | None, int | None, int | None]] = []
    try:
        consumer = app.consumer
        read, committed = consumer._read_offset, consumer._committed_offset
        for tp in app.assignor.assigned_actives():
            if tp.topic in topics:
                out.append((tp, consumer.highwater(tp), committed.get(tp), read.get(tp)))
    except Exception:  # not started or not assigned yet
        return out
    return out


def kafka_backlog(app: Any, topics: Collection[str]) -> int:
    """Records of ``app``'s assigned partitions of ``topics`` that it has not delivered yet.

    The partition's high watermark minus the offset after the last record delivered to the
    streams (the committed offset before any). Partitions not fetched yet count nothing.
    """
    return sum(partition_lag(high, committed, last) or 0
               for _, high, committed, last in assigned_positions(app, topics))


def partition_lag(high: int | None, committed: int | None, last: int | None) -> int | None:
    """Records of a partition Kafka holds past the last one delivered (the committed offset
    before any); None when not known yet (no fetch answered, or no position)."""
    if high is None:
        return None
    pos = last + 1 if last is not None else committed
    if pos is None:
        return 0 if high <= 0 else None
    return max(0, int(high) - int(pos))


async def take_batches(stream: Any, max_: int, within_s: float, drained: Callable[[], bool]
                       ) -> AsyncIterator[list[Any]]:
    """Lists of at most ``max_`` events of ``stream``.

    A batch is handed over when it holds ``max_`` events, or holds at least one and either
    ``drained()`` or it has gathered for ``within_s`` seconds. While a batch is out, the
    stream adds nothing to the next one; its events are acked when the next batch is asked
    for (or the iteration ends).
    """
    events: list[Any] = []
    full, arrived = asyncio.Event(), asyncio.Event()
    taken = asyncio.Event()
    reading: asyncio.Future[None] | None = None

    async def gather(value: Any) -> Any:
        # Runs in the stream's passive drainer, once per event.
        try:
            while reading is not None:  # a batch is out: wait until it was processed
                await reading
            event = stream.current_event
            if event is None:
                raise RuntimeError("a batched stream has no current event")
            if not events:
                arrived.set()
            events.append(event)
            if len(events) >= max_:
                full.set()
                taken.clear()
                await stream.wait(taken)  # never more than max_ per batch
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stream.log.exception("error adding to a micro-batch: %r", exc)
            await stream.crash(exc)
        return value

    acks = stream.enable_acks
    stream.enable_acks = False  # acked below, once the batch was processed
    stream.add_processor(gather)
    stream._enable_passive(aiter(stream.channel))
    clock = time.monotonic
    try:
        while not stream.should_stop:
            if not events:
                await stream.wait_for_stopped(arrived)
                continue
            # (A wait's "stopped" also means its timeout: the stream is asked instead.)
            deadline = clock() + within_s
            while not (full.is_set() or stream.should_stop) and clock() < deadline \
                    and not drained():
                await stream.wait_for_stopped(full, timeout=POLL_S)
            arrived.clear()
            if stream.should_stop:
                break  # unacked: redelivered to whoever consumes next
            batch = list(events)
            reading = done = stream.loop.create_future()
            try:
                yield batch
            finally:
                for event in batch:
                    await stream.ack(event)
                del events[:len(batch)]
                reading = None
                notify(done)
                full.clear()
                taken.set()
    finally:
        stream.enable_acks = acks
        stream._processors.remove(gather)
