"""The Faust app: topics, the ingest agent and its timers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import faust
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from faust import transport
from faust.transport.drivers import aiokafka as fa
from faust.types import TP

from features.store import RedisFeatureStore
from stream import native
from stream.backend import STATS_INTERVAL_S, EngineBackend
from stream.batching import assigned_positions, kafka_backlog, partition_lag
from stream.clvfit import refit_clv_in_child
from stream.delivery import Delivery, EagerDelivery
from stream.errors import PublishRefused, SegstreamError
from stream.fetch_size import FetchSizer
from stream.inbox import Inbox
from stream.learner import Learner
from stream.metrics import EngineMetrics
from stream.pipeline import (
    BatchProcessor,
    PartlyPublished,
    PipelineFailed,
    RawRecord,
    record_decoder,
)
from stream.redisconn import redis_client
from stream.runtime import ScoringRuntime, load_rules
from stream.settings import Settings
from stream.sweep import Sweeper
from stream.watchdog import LoopWatchdog
from stream.web import add_routes

log = logging.getLogger(__name__)

OUTBOX_FLUSH_INTERVAL_S = 5.0
#: The longest a rebalance or a stop waits for the last batch's outbox publish.
DRAIN_TIMEOUT_S = 10.0
SWEEP_CHECK_S = 1.0
#: Without a batch for this long the worker counts as idle and sweeps at once.
IDLE_S = 1.0


class _ConsumerThread(fa.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        wait_ms = getattr(self.app, "fetch_max_wait_ms", None)
        if wait_ms is not None:
            # Read by AIOKafkaConsumer.start() when it builds its fetcher.
            consumer._fetch_max_wait_ms = wait_ms
        return consumer


class _Consumer(EagerDelivery, fa.Consumer):
    #: where records of the input topics go, a fetch at a time (set by the engine);
    #: without one, every record goes through Faust's conductor and streams
    inbox: Inbox | None = None
    #: the fetches' minimum size, from the input rate (None: Kafka's default, one byte)
    fetch_sizer: FetchSizer | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inbox = getattr(self.app, "inbox", None)
        coalesce_ms = getattr(self.app, "fetch_coalesce_ms", None)
        if coalesce_ms:
            self.fetch_sizer = FetchSizer(coalesce_ms)
        deliver = self.callback
        self.callback = lambda message: Delivery(deliver(message))

    def ack_range(self, tp: Any, first: int, last: int) -> None:
        """Offsets ``first``..``last`` of ``tp`` were processed: what ``ack`` records for
        each delivered message, for the whole range at once (commits take it from here)."""
        committed = self._committed_offset[tp]
        if committed is not None:
            first = max(first, committed)
        if first <= last:
            self._acked[tp].extend(range(first, last + 1))
            self._n_acked += last - first + 1
        monitor = self.app.monitor
        if monitor is not None:
            # What Faust's streams note for each event they take: without it, Faust's
            # check of the event path took a busy worker (input arriving all the time)
            # for a stalled one and logged a 15-line ERROR per partition every few
            # seconds, from 5 minutes after the start.
            monitor.stream_inbound_time[tp] = time.monotonic()

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        """Faust's ``getmany``, except that what a fetch returned for a partition of an
        input topic goes to the inbox in one piece instead of record by record."""
        inbox = self.inbox
        if inbox is None:
            async for item in super().getmany(timeout):
                yield item
            return
        records, active = await self._wait_next_records(timeout)
        generation = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            # As Faust does: go back to the committed offsets before fetching again, and
            # first to what this fetch returned where nothing was committed yet.
            for tp in records:
                inbox.forget_position(tp)
            await self._fetch_again(records, generation, "the flow stopped")
            try:
                await self.perform_seek()
            except Exception as exc:
                self.log.warning("seek to committed offsets failed: %r", exc)
            return
        others = {}
        decode = getattr(self.app, "decode_input", None)
        input_tps = [tp for tp in records if tp.topic in inbox.topics]
        sizer, fetched = self.fetch_sizer, 0
        for i, tp in enumerate(input_tps):
            recs = records[tp]
            if not (active is None or tp in active or tp in self._buffered_partitions):
                inbox.forget_position(tp)
                await self._fetch_again({tp: recs}, generation, "partition paused")
                continue
            # Decoded here, as fetched: the ingest loop's batch then only applies them,
            # and this runs while it waits for Redis (see stream.pipeline.decode_record).
            if decode is None:
                raw = [RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
                       for r in recs]
            else:
                raw = [RawRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp,
                                 decode(r.topic, r.key, r.value)) for r in recs]
            kept = await inbox.put(tp, raw)
            if (not kept or not self.flow_active
                    or self.app.consumer_generation_id != generation):
                # A rebalance began while the inbox had no room: what this fetch returned
                # for the partitions not put is dropped, and fetched again.
                rest = {t: records[t] for t in input_tps[i if not kept else i + 1:]}
                rest.update((t, r) for t, r in records.items() if t.topic not in inbox.topics)
                for t in records:
                    inbox.forget_position(t)
                await self._fetch_again(rest, generation, "a rebalance began")
                return
            self._read_offset[tp] = recs[-1].offset
            if sizer is not None:
                fetched += sum([len(r.value) for r in recs if r.value is not None])
        if sizer is not None and sizer.observe(fetched, self._input_brokers):
            self.set_fetch_min_bytes(sizer.min_bytes)
        for tp, recs in records.items():
            if tp.topic not in inbox.topics:
                others[tp] = recs
        to_message = self._to_message
        for tp, record in self.scheduler.iterate(others):
            if not self.flow_active or self.app.consumer_generation_id != generation:
                break
            if active is None or tp in active or tp in self._buffered_partitions:
                yield tp, to_message(tp, record)

    def _input_brokers(self) -> int:
        """Brokers leading the input partitions assigned to this worker (at least 1)."""
        inbox = self.inbox
        try:
            cluster = self._thread._consumer._client.cluster
            leaders = {cluster.leader_for_partition(TopicPartition(tp.topic, tp.partition))
                       for tp in self.assignment()
                       if inbox is not None and tp.topic in inbox.topics}
        except Exception:  # not started, or no metadata yet
            return 1
        return max(1, len(leaders - {None, -1}))

    def fetcher(self) -> Any:
        """The consumer thread's aiokafka fetcher (None before the consumer started)."""
        return getattr(getattr(self._thread, "_consumer", None), "_fetcher", None)

    def set_fetch_min_bytes(self, n: int) -> None:
        """The minimum size of the next fetches (read by the consumer thread as it builds
        each fetch request)."""
        fetcher = self.fetcher()
        if fetcher is not None:
            fetcher._fetch_min_bytes = n

    async def _fetch_again(self, dropped: Mapping[Any, Sequence[Any]], generation: int,
                           why: str) -> None:
        """Records a fetch returned and the inbox did not take: make the next fetch of each
        partition start at the first of them again.

        Faust only seeks back to the committed offsets, and aiokafka's ``seek_to_committed``
        leaves a partition where it is when nothing was committed for it yet (offset None or
        0): the records would then be skipped for good. A fetch that began before a
        rebalance can return, during it, records of partitions the new assignment just
        gave this worker (aiokafka re-reads the active set Faust passes it while it waits).

        The seek runs on the consumer's own thread, and only if the assignment is still the
        one the records were fetched under: a newer one positions every partition itself.
        """
        firsts = {tp: recs[0].offset for tp, recs in dropped.items() if recs}
        if not firsts:
            return
        thread = self._thread

        async def seek() -> list[tuple[Any, int]]:
            consumer = thread._ensure_consumer()
            if consumer._coordinator.generation != generation:
                return []
            assigned = consumer.assignment()
            done = []
            for tp, offset in firsts.items():
                ktp = TopicPartition(tp.topic, tp.partition)
                if ktp in assigned:
                    consumer.seek(ktp, offset)
                    done.append((tp, offset))
            return done

        try:
            done = await thread.call_thread(seek)
        except Exception as exc:
            self.log.warning("seek back to %d fetched partitions failed: %r", len(firsts), exc)
            return
        for tp, _ in done:
            self._read_offset.pop(tp, None)
        if done:
            self.log.info("%s: %d fetched input records not taken; fetching them again (%s)",
                          why, sum(len(dropped[tp]) for tp, _ in done),
                          ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in done))

    async def perform_seek(self) -> None:
        """Faust's seek to the committed offsets, then back to where the state store's
        watermarks say the engine's state ends, where that is earlier.

        The state store's watermark is the engine's real commit; Kafka's committed offset
        only follows it. A store that lost recent writes (a Redis restored from an older
        AOF or snapshot, a failover to a lagging replica, a server restarted empty) has
        watermarks behind Kafka's offsets, and the events in between were never applied to
        what it now holds: resuming at Kafka's offsets lost them for good. Reading them
        again is safe, as every record at or below a watermark is skipped.
        """
        await super().perform_seek()
        stored = getattr(self.app, "stored_positions", None)
        inbox = self.inbox
        if stored is None or inbox is None:
            return
        try:
            positions = await stored()
        except Exception as exc:
            self.log.warning("could not compare the state store's watermarks with the "
                             "committed offsets: %r", exc)
            return
        held = getattr(self.app, "held_positions", None)
        if held is not None:
            # What the store holds now for the partitions assigned: the idle and per-batch
            # checks of a lost store then cover a worker that has not committed yet (just
            # started, or just given the partitions), not only what it committed itself.
            held({(tp.topic, tp.partition): positions[(tp.topic, tp.partition)]
                  for tp in self.assignment()
                  if tp.topic in inbox.topics and positions.get((tp.topic, tp.partition), 0) > 0})
        back: dict[Any, int] = {}
        for tp in self.assignment():
            if tp.topic not in inbox.topics:
                continue
            nxt = positions.get((tp.topic, tp.partition))
            committed = self._committed_offset.get(tp)
            if nxt is not None and committed is not None and nxt < committed:
                back[tp] = nxt
        if not back:
            return
        thread = self._thread

        async def seek() -> None:
            consumer = thread._ensure_consumer()
            for tp, offset in back.items():
                consumer.seek(TopicPartition(tp.topic, tp.partition), offset)

        await thread.call_thread(seek)
        for tp, offset in back.items():
            self._read_offset[tp] = offset or None
            inbox.forget_position(tp)
        self.log.warning(
            "the state store holds less than Kafka's committed offsets cover (it lost "
            "writes): reading again from %s",
            ", ".join(f"{tp.topic}[{tp.partition}]@{o} (committed {self._committed_offset[tp]})"
                      for tp, o in sorted(back.items())))

    def _new_consumer_thread(self) -> fa.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(fa.Transport):
    Consumer = _Consumer


class LeanApp(faust.App):
    """A Faust app without Faust's default ``Monitor`` sensor, and fetches that return soon.

    The Monitor updates its statistics four times per event (message in, stream event in
    and out, message out) and nothing reads them: the engine keeps its own metrics
    (:mod:`stream.metrics`). ``app.monitor`` still exists; it just stays empty.

    Faust's Kafka consumer asks the broker to hold a fetch for up to 1.5 s while the
    partitions it names have no new records. The client sends one fetch per broker at a
    time, naming only partitions it holds no records of, so a fetch that names just a
    quiet partition (the learner's examples topic between two batches) kept every input
    partition on that broker waiting: ``segstream bench`` measured a median end-to-end
    latency of 1.5 s at 1,000 events/s. ``fetch_max_wait_ms`` bounds that wait (the
    median became 28 ms); an idle worker then sends a fetch per broker that often.

    Its consumer hands each fetched record to the streams without making four tasks per
    record (:mod:`stream.delivery`).
    """

    #: set before the worker starts: its consumer puts input records there (:mod:`stream.inbox`)
    inbox: Inbox | None = None
    #: set with the inbox: decodes an input record as it is fetched, (topic, key, value)
    decode_input: Callable[[str, bytes | None, bytes | None], Any] | None = None
    #: set before the worker starts: per input (topic, partition) the offset after the
    #: state store's watermark (the consumer seeks back there after a rebalance)
    stored_positions: Callable[[], Awaitable[dict[tuple[str, int], int]]] | None = None
    #: called with the positions after the store's watermarks of the partitions just assigned
    held_positions: Callable[[dict[tuple[str, int], int]], None] | None = None

    def __init__(self, *args: Any, fetch_max_wait_ms: int | None = None,
                 fetch_coalesce_ms: int | None = None, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.fetch_coalesce_ms = fetch_coalesce_ms
        if kwargs.get("datadir"):
            # Faust makes the app's own directory at start, but not its parents.
            Path(kwargs["datadir"]).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Any:
        url = self.conf.broker_consumer[0]
        if transport.by_url(url) is fa.Transport:
            return _Transport(self.conf.broker_consumer, self)
        return super()._new_transport()

    def on_init_dependencies(self) -> Iterable[Any]:
        deps = super().on_init_dependencies()
        if self.monitor in set(self.sensors):
            self.sensors.remove(self.monitor)
        return deps


def check_worker_host(settings: Settings) -> None:
    """Refuse, naming the setting, a listen address the worker's web server cannot bind and
    a data directory it cannot write, before anything starts (they failed later as
    tracebacks that named neither)."""
    import errno
    import socket
    import tempfile

    from stream.errors import SettingsError

    host, port = settings.web_host, settings.web_port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise SettingsError(f"SEGSTREAM_WEB_HOST: cannot listen on {host!r}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    family, kind, proto, _, addr = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            # As the server binds: a port still in TIME_WAIT is free to it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as exc:
        which = "SEGSTREAM_WEB_PORT" if exc.errno in (errno.EADDRINUSE, errno.EACCES) \
            else "SEGSTREAM_WEB_HOST"
        raise SettingsError(f"{which}: cannot listen on {host}:{port}: "
                            f"{exc.strerror or exc}") from None
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=settings.data_dir):
            pass
    except OSError as exc:
        raise SettingsError(f"SEGSTREAM_DATA_DIR: cannot write to {settings.data_dir}: "
                            f"{exc.strerror or exc}") from None


def use_event_loop(settings: Settings) -> None:
    """Select the worker's event loop (``SEGSTREAM_EVENT_LOOP``) before anything makes one.

    Faust's stream takes one event loop turn per event, so the loop's own cost per turn is
    part of every event's; ``segstream bench`` measured the Faust floor about 10 % higher
    with uvloop than with asyncio's loop.
    """
    if settings.event_loop == "uvloop":
        import mode.loop

        mode.loop.use("uvloop")
    else:
        asyncio.set_event_loop_policy(None)  # the standard library's


#: Most records one fetch hands to the streams.
POLL_RECORDS = 2_000


def stream_buffering(settings: Settings) -> dict[str, int]:
    """Faust's stream buffer and fetch size (the worker's and the bench floor's).

    Faust stops fetching a partition once its stream's buffer is 80 % full, but still
    pushes every record the last fetch returned, and a record that finds the buffer full
    waits for room (a blocked put, a wake-up and a ``wait_first`` per record). A fetch
    returned up to a megabyte per partition, thousands of records, against the 820 left
    above that mark in a 4,096-record buffer, so while a backlog was worked off nearly
    every record waited. With fetches of at most :data:`POLL_RECORDS` and a buffer at
    least eight times that, what a fetch returns fits in the room above the mark.
    """
    poll = min(settings.batch_max, POLL_RECORDS)
    return {"stream_buffer_maxsize": max(8 * poll, 2 * settings.batch_max),
            "broker_max_poll_records": poll}


def tune_gc(settings: Settings) -> None:
    """Fit the garbage collector to micro-batches (``SEGSTREAM_GC_THRESHOLD``, ``_GC_FREEZE``).

    Call once the worker is assembled, before it runs. With Python's defaults a young
    collection ran every 700 net allocations, so the objects of a batch in flight were
    promoted to the old generation and every few batches a full collection scanned all
    of them plus every module, Faust and River object: about a quarter of the worker's
    CPU time in ``segstream bench``. Reference counting frees a batch's objects when it
    ends; the collector is only needed for reference cycles.
    """
    gc.collect()
    if settings.gc_freeze:
        gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(settings.gc_threshold, older, oldest)


def watch_gc(observe: Callable[[int, float], None]) -> Callable[[str, dict[str, Any]], None]:
    """Report every garbage collection of this process: ``observe(generation, seconds)``.

    A collection runs inside whatever allocation triggered it and holds the interpreter
    (the ingest agent, the event loop and every timer) until it ends, so its pauses add to
    the latency of whatever batch is in flight. Returns the callback installed in
    :data:`gc.callbacks` (remove it to stop).
    """
    started = [0.0]
    clock = time.perf_counter

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = clock()
        else:
            observe(int(info.get("generation", 0)), clock() - started[0])

    gc.callbacks.append(on_gc)
    return on_gc


#: The longest one record's send may wait to be queued (for its topic's metadata or for
#: room in the producer's buffer) before the publish fails and its records stay in the
#: outbox. The producer's own limit is Faust's request timeout, 20 minutes, which every
#: batch waited out while an output topic was missing.
PUBLISH_QUEUE_TIMEOUT_S = 15.0
#: The longest a publish waits for Kafka to acknowledge what it queued. What is not
#: acknowledged by then counts as not delivered (it stays in the outbox and goes out again:
#: at least once, under its stable id). A topic deleted under a running worker, still in
#: the producer's metadata, held every batch for the producer's 20-minute request timeout.
PUBLISH_DELIVERY_TIMEOUT_S = 60.0
#: Least time between two attempts of a worker to recreate missing output topics.
RECREATE_TOPICS_EVERY_S = 10.0


_DEFAULT_PARTITIONER = DefaultPartitioner()


class FaustPublisher:
    """Publishes outbox records with the app's producer and waits for every ack.

    The records go out as one record batch per topic-partition, built here and handed to
    the app's aiokafka producer (``send_batch``): a ``send`` per record, with its future
    and Faust's sensor hooks, cost about three times the CPU per record. Keyed records
    take the partition of the producer's default partitioner (murmur2 of the key, as the
    Java client), so a customer's records stay in one partition and in their order;
    records without a key (the training examples) go to one partition per publish.

    A partition whose batch cannot even be queued within :data:`PUBLISH_QUEUE_TIMEOUT_S`
    fails the publish (the records stay in the outbox for the next flush), and the worker
    then creates any of the engine's topics that are missing: an output topic deleted while
    the worker ran (the dead-letter topic, say) held every batch of every partition behind
    a publish that waited for its metadata for 20 minutes, and then again.
    """

    def __init__(self, app: faust.App, settings: Settings | None = None,
                 queue_timeout_s: float = PUBLISH_QUEUE_TIMEOUT_S,
                 recreate: Callable[[Settings], None] | None = None,
                 delivery_timeout_s: float = PUBLISH_DELIVERY_TIMEOUT_S) -> None:
        self.app = app
        self.settings = settings
        self.queue_timeout_s = queue_timeout_s
        self.delivery_timeout_s = delivery_timeout_s
        self._recreate = recreate
        self._recreated_at = -RECREATE_TOPICS_EVERY_S
        #: per topic, the most records a batch holds after the topic refused a batch as
        #: too large (its max.message.bytes lowered under the worker): halved at each
        #: refusal, down to one record a batch, within the publish that met it
        self.batch_records: dict[str, int] = {}

    def _kafka(self) -> Any:
        """The app's started aiokafka producer."""
        return self.app.producer._ensure_producer()

    def _partitioner(self) -> Callable[[bytes, list[int], list[int]], int]:
        """The partitioner the app's producer was given (Faust's default is aiokafka's)."""
        return getattr(self.app.producer, "partitioner", None) or _DEFAULT_PARTITIONER

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        if not records:
            return
        kafka = self._kafka()
        partitioner = self._partitioner()
        loop = asyncio.get_running_loop()
        topic = records[0][0]
        failure: BaseException | None = None
        #: per topic-partition, the indexes of its records, in order
        groups: dict[tuple[str, int], list[int]] = {}
        try:
            # one deadline moved forward per wait: no task per send on the hot path
            async with asyncio.timeout(None) as deadline:
                partitions: dict[str, tuple[list[int], int]] = {}
                for i, (topic, key, _) in enumerate(records):
                    known = partitions.get(topic)
                    if known is None:
                        deadline.reschedule(loop.time() + self.queue_timeout_s)
                        every = sorted(await kafka.partitions_for(topic))
                        known = partitions[topic] = (every, random.choice(every))
                    every, keyless = known
                    p = keyless if key is None else partitioner(key, every, every)
                    groups.setdefault((topic, p), []).append(i)
        except Exception as exc:
            failure = self._unqueued(topic, exc)
            await self._recreate_missing_topics(topic)
            raise failure from None
        delivered = [False] * len(records)
        # Rounds: each queues the next batch of every partition whose batches so far were
        # all acknowledged, then waits for them. A partition whose batch was refused gets
        # nothing more: a later batch Kafka took would be counted as not delivered (to go
        # out again behind the refused one, in order) and so reach the topic twice. Kafka
        # sends one batch per partition at a time anyway, so a partition's batches in
        # rounds cost no extra round trip; a flush mostly holds one batch per partition.
        ends = loop.time() + self.delivery_timeout_s
        sent = dict.fromkeys(groups, 0)
        active = list(groups)
        while active:
            #: each queued batch: its partition, future and the indexes of its records
            queued: list[tuple[tuple[str, int], asyncio.Future[Any], list[int]]] = []
            stop = False
            try:
                async with asyncio.timeout(None) as deadline:
                    for tp in active:
                        topic, p = tp
                        cap = self.batch_records.get(topic)
                        batch = kafka.create_batch()
                        held: list[int] = []
                        for i in groups[tp][sent[tp]:]:
                            if cap is not None and len(held) >= cap:
                                break
                            _, key, value = records[i]
                            # full: the rest in a later round (a first record always
                            # fits; were it refused, no round would make progress)
                            if batch.append(key=key, value=value, timestamp=None) is None:
                                if not held:
                                    raise RuntimeError(f"a record for {topic} fits no batch")
                                break
                            held.append(i)
                        deadline.reschedule(loop.time() + self.queue_timeout_s)
                        queued.append((tp, await kafka.send_batch(batch, topic, partition=p),
                                       held))
            except Exception as exc:
                if failure is None:
                    failure = self._unqueued(topic, exc)
                await self._recreate_missing_topics(topic)
                stop = True
            # What was queued is delivered or refused by the producer in its own time: wait
            # for it (a bounded time), so that what Kafka took is known and not sent again.
            if queued:
                await asyncio.wait([f for _, f, _ in queued],
                                   timeout=max(0.0, ends - loop.time()))
            active = []
            for tp, fut, held in queued:
                outcome: BaseException | None
                if not fut.done():
                    fut.add_done_callback(_ignore_outcome)  # delivered or not, nobody waits
                    outcome = self._unacknowledged(tp[0])
                elif fut.cancelled():
                    outcome = asyncio.CancelledError()
                else:
                    outcome = fut.exception()
                if outcome is not None:
                    if len(held) > 1 and "MessageSizeTooLarge" in type(outcome).__name__:
                        # Kafka wrote nothing of a batch it refused as too large: its
                        # records go again at once, in batches half as large, still first
                        # of their partition (one flush, not one halving per flush).
                        log.warning("%s", self._explained(tp[0], outcome, len(held)))
                        active.append(tp)
                        continue
                    if failure is None:
                        topic = tp[0]
                        failure = self._explained(topic, outcome, len(held))
                    continue
                for i in held:
                    delivered[i] = True
                sent[tp] += len(held)
                if sent[tp] < len(groups[tp]):
                    active.append(tp)
            if stop or loop.time() >= ends:
                if active and failure is None:
                    failure = self._unacknowledged(active[0][0])
                break
        if failure is None:
            return
        if isinstance(failure, TimeoutError) or "UnknownTopic" in type(failure).__name__:
            await self._recreate_missing_topics(topic)
        if not any(delivered):
            raise failure from None
        raise PartlyPublished(delivered, failure)

    def _unacknowledged(self, topic: str) -> TimeoutError:
        return TimeoutError(f"records for {topic} not acknowledged within "
                            f"{self.delivery_timeout_s:g}s")

    def _unqueued(self, topic: str, exc: Exception) -> Exception:
        """A failure to queue records for ``topic`` (its metadata or room in the producer)."""
        if isinstance(exc, TimeoutError):
            return TimeoutError(f"records for {topic} not queued within "
                                f"{self.queue_timeout_s:g}s")
        return exc

    def _explained(self, topic: str, exc: BaseException, records: int) -> BaseException:
        """``exc`` as the publish reports it, naming the topic; a batch the topic refused as
        too large makes that topic's next batches half as large."""
        if "MessageSizeTooLarge" not in type(exc).__name__:
            return exc
        if records > 1:
            self.batch_records[topic] = max(1, min(self.batch_records.get(topic, records),
                                                   records) // 2)
        return PublishRefused(
            f"{topic} refused a batch of {records} records as too large ({exc!r}): its "
            "max.message.bytes is below SEGSTREAM_KAFKA_PRODUCE_BATCH_BYTES; its batches "
            f"now hold at most {self.batch_records.get(topic, 1)} records, and a single "
            "record it refuses waits in the outbox until the topic's limit is raised")

    async def _recreate_missing_topics(self, topic: str) -> None:
        if self.settings is None:
            return
        now = time.monotonic()
        if now - self._recreated_at < RECREATE_TOPICS_EVERY_S:
            return
        self._recreated_at = now
        recreate = self._recreate
        if recreate is None:
            from stream.kafka import ensure_topics as recreate
        try:
            await asyncio.to_thread(recreate, self.settings)
        except Exception as exc:
            log.warning("publishing to %s failed; creating missing topics failed too: %r",
                        topic, exc)
        else:
            log.warning("publishing to %s failed; the engine's missing topics were created", topic)


def _ignore_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def fail_stop(exc: BaseException) -> NoReturn:
    """End the worker process at once: a batch gave up, and nothing after it may be
    committed. Restarted, the worker resumes from the state store's watermarks (a stop
    like any crash, which the store's commits are made to survive). Left running, Faust
    would restart the agent, which would take the next batches from past the lost one."""
    log.critical("the worker stops: %s. Restarted, it resumes from the state store's "
                 "watermarks", exc)
    logging.shutdown()
    os._exit(70)


def _broker_credentials(settings: Settings) -> Any:
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    ssl_context = None
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        ssl_context = create_ssl_context(cafile=cafile)
    if settings.kafka_sasl_mechanism:
        password = settings.kafka_sasl_password
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password else None,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=ssl_context,
        )
    return faust.SSLCredentials(ssl_context)


class Engine:
    """Everything a worker holds: the Faust app, the store and the batch processor."""

    #: set once reading the consumer's connections failed (logged the first time)
    _kafka_check_failed = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = LeanApp(
            settings.app_id,
            broker=settings.kafka_url,
            broker_credentials=_broker_credentials(settings),
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
            fetch_coalesce_ms=settings.kafka_fetch_coalesce_ms,
            store="memory://",
            datadir=str(settings.data_dir / "faust" / settings.app_id),
            autodiscover=False,
            topic_partitions=settings.partitions,
            topic_allow_declare=False,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            producer_max_batch_size=settings.kafka_produce_batch_bytes,
            # The producer gives a batch up after this (Faust's default: 20 minutes), as the
            # outbox publish stops waiting for it: the outbox sends it again.
            producer_request_timeout=PUBLISH_DELIVERY_TIMEOUT_S,
            web_enabled=True,
            # The engine serves its own API; Faust's table and router endpoints stay off.
            web_tables_enabled=False,
            web_router_enabled=False,
            web_host=settings.web_host,
            web_port=settings.web_port,
            web_bind=settings.web_host,
            stream_wait_empty=False,
            **stream_buffering(settings),
            broker_commit_every=settings.batch_max,
            broker_commit_interval=1.0,
            # A crashed worker's partitions move after this long, not the 60 s default.
            broker_session_timeout=20.0,
            broker_heartbeat_interval=3.0,
            logging_config=None,
        )
        self.redis: aioredis.Redis | None = None
        self.store: RedisFeatureStore | None = None
        self.processor: BatchProcessor | None = None
        self.runtime: ScoringRuntime | None = None
        self.sweeper: Sweeper | None = None
        self.lock = asyncio.Lock()
        self.last_batch_end = 0.0
        # Fail at start, naming the setting, if the rules do not load.
        load_rules(settings)
        self.metrics = EngineMetrics()
        self.metrics.prime(settings.input_topics)
        self.backend = EngineBackend(self, self.metrics)
        self._mount_web()
        self.source = self.app.topic(
            *settings.input_topics,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )
        self.inbox = Inbox(settings.input_topics, stream_buffering(settings)[
            "stream_buffer_maxsize"], self._ack_range, lag=self._input_lag,
            align_wait_s=settings.align_wait_s, flow=self._input_flow)
        self.app.inbox = self.inbox
        self.app.decode_input = record_decoder(settings)
        self.app.stored_positions = self._stored_positions
        self.app.held_positions = self._held_positions
        self.app.agent(self.source, name="ingest", concurrency=1)(self._ingest)
        self._every(OUTBOX_FLUSH_INTERVAL_S, self._flush_outbox)
        self.app.on_partitions_assigned.connect(self._on_partitions_assigned)
        self.app.on_partitions_revoked.connect(self._on_partitions_revoked)
        self._every(SWEEP_CHECK_S, self._sweep)
        self.app.timer(STATS_INTERVAL_S)(self._sample_stats)
        self.app.task(self._watch_loop)
        self.app.task(self._report_native)
        self.examples = self.app.topic(
            settings.examples_topic, key_type=bytes, value_type=bytes,
            key_serializer="raw", value_serializer="raw", partitions=1,
        )
        self.learner: Learner | None = None
        if settings.models_enabled and settings.learner == "inline":
            self.app.agent(self.examples, name="learner", concurrency=1)(self._learn)
            self.app.timer(settings.model_snapshot_s)(self._publish_models)
        if settings.clv_refit_interval_s > 0:
            self.app.timer(settings.clv_refit_interval_s, on_leader=True)(self._refit_clv)

    def _every(self, interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` ``interval_s`` seconds after each of its runs ends, until the worker
        stops.

        Faust's ``app.timer`` keeps a fixed beat and logs "Timer ... is overlapping" at
        WARNING whenever a run outlasts its interval, which a sweep pass (seconds over a
        large partition) and an outbox flush through a Kafka outage do in normal operation.
        """
        app = self.app

        async def every() -> None:
            while True:
                await app.sleep(interval_s)
                if app.should_stop:
                    return
                await job()

        every.__qualname__ = f"{type(self).__name__}.{job.__name__}"  # the task's name
        app.task(every)

    def ensure(self) -> BatchProcessor:
        if self.processor is None:
            self.redis = redis_client(self.settings)
            self.store = RedisFeatureStore(self.redis, self.settings.redis_prefix)
            self.runtime = ScoringRuntime(self.settings, self.redis, self.store)
            self.runtime.on_rules = self.metrics.set_rules
            self.runtime.on_rules_refused = self.metrics.rules_reload_failed
            self.metrics.set_rules(str(self.runtime.catalogue.version),
                                   str(self.runtime.actions.version))
            s = self.settings
            self.processor = BatchProcessor(s, self.store, FaustPublisher(self.app, s),
                                            scoring=self.runtime,
                                            background_publish=s.publish_in_background,
                                            background_commit=s.commit_in_background,
                                            check_partitions=True)
            self.sweeper = Sweeper(self.processor, self.runtime, self.store, self.lock,
                                   busy=self._busy, max_share=self.settings.sweep_max_share)
            self.processor.on_published = self.backend.on_published
            self.processor.on_publish_failed = self.metrics.publish_failed
            self.processor.on_redis = self.backend.on_redis
            self.processor.on_stage = self.metrics.observe_stage
            self.processor.on_conflicts = self.metrics.commit_conflicts
            self.processor.on_failed = fail_stop
            self.sweeper.on_step = self.metrics.observe_sweep_step
        return self.processor

    async def _stored_positions(self) -> dict[tuple[str, int], int]:
        """Per input (topic, partition), the offset after the state store's watermark."""
        self.ensure()
        assert self.store is not None
        wms = await self.store.watermarks(self.settings.partitions,
                                          list(self.settings.input_topics))
        return {k: v + 1 for k, v in wms.items()}

    def _held_positions(self, positions: dict[tuple[str, int], int]) -> None:
        """The store holds these positions (offset after its watermark) of partitions just
        assigned: a store that later loses them stops the worker (``check_kept``)."""
        held: dict[int, dict[str, int]] = {}
        for (topic, partition), nxt in positions.items():
            held.setdefault(partition, {})[topic] = nxt - 1
        self.ensure().note_held(held)

    def _ack_range(self, tp: Any, first: int, last: int) -> None:
        """A batch's offsets go to Kafka once its state is in the store: a batch committing
        in the background acks when its commit lands, if the partition is still ours."""

        def ack() -> None:
            if self.inbox.owns(tp):
                self.app.consumer.ack_range(tp, first, last)

        if self.processor is None:
            ack()
        else:
            self.processor.when_committed(ack)

    def _input_lag(self, tp: Any) -> int | None:
        """Records of an input partition Kafka holds beyond the last one fetched (None:
        not known yet); the high watermark is as of the consumer's latest fetch."""
        try:
            consumer = self.app.consumer
            return partition_lag(consumer.highwater(tp), consumer._committed_offset.get(tp),
                                 consumer._read_offset.get(tp))
        except Exception:  # not started or not assigned yet
            return None

    def _input_flow(self, pause: set[Any], resume: set[Any]) -> None:
        """Pause the fetching of input partitions whose records wait past the inbox's cut,
        and resume it once they were taken (:mod:`stream.inbox`)."""
        consumer = self.app.consumer
        # Faust's own partition type: what the fetch returned is aiokafka's (equal, but
        # Faust's checks of its active set are by type).
        if pause:
            consumer.pause_partitions({TP(tp.topic, tp.partition) for tp in pause})
        if resume:
            consumer.resume_partitions({TP(tp.topic, tp.partition) for tp in resume
                                        if self.inbox.owns(tp)})

    def _busy(self) -> bool:
        """Whether input arrived within the last ``IDLE_S``."""
        return time.monotonic() - self.last_batch_end < IDLE_S

    def _mount_web(self) -> None:
        web = self.app.web
        # The dashboard takes "/"; drop Faust's own index page there.
        web.blueprints._enabled = [(prefix, bp) for prefix, bp in web.blueprints._enabled
                                   if "production_index" not in str(bp)]
        token = self.settings.api_token.get_secret_value() if self.settings.api_token else None
        add_routes(web.web_app, self.backend, self.metrics, token)

    def consumer_lags(self) -> dict[tuple[str, int], int]:
        """Messages behind the end of each assigned input partition."""
        # Both are "next offset" positions: the log end and the committed offset.
        return {(tp.topic, tp.partition): max(0, int(high) - int(committed or 0))
                for tp, high, committed, _ in assigned_positions(self.app,
                                                                 self.settings.input_topics)
                if high is not None}

    def fetch_min_bytes(self) -> int:
        """The minimum fetch size the worker's consumer asks for now, as its fetcher holds it
        (1, Kafka's default, before the consumer started)."""
        consumer = self.app.consumer
        fetcher = consumer.fetcher() if isinstance(consumer, _Consumer) else None
        return int(getattr(fetcher, "_fetch_min_bytes", 1))

    def kafka_connected(self) -> bool:
        """Whether the input consumer holds an open connection to a broker.

        A consumer that runs fetches and heartbeats continuously, so while a broker answers
        it has a connection open; when every broker is gone, aiokafka closes them. (The
        consumer's client lives on the consumer's own thread: this only reads its state.)
        """
        try:
            consumer = self.app.consumer._thread._consumer
            conns = list(consumer._client._conns.values()) if consumer is not None else []
            return any(conn.connected() for conn in conns)
        except Exception as exc:  # Faust's or aiokafka's internals moved: say so, once
            if not self._kafka_check_failed:
                self._kafka_check_failed = True
                log.warning("cannot read the consumer's broker connections (%r): /readyz "
                            "reports Kafka unreachable", exc)
            return False

    def model_quality(self) -> dict[str, dict[str, Any]]:
        """Quality of the models this worker scores with (or trains, on the learner)."""
        out: dict[str, dict[str, Any]] = {}
        models = dict(self.runtime.models) if self.runtime else {}
        if self.learner is not None:
            models.update(self.learner.models)
        served = self.runtime.versions if self.runtime else {}
        for name, m in models.items():
            q = dict(m.quality())
            # The version scored with, from the registry (none served yet: 0); the
            # inline learner's training model is newer than any version.
            q["version"] = served.get(name, 0)
            out[name] = q
        return out

    async def _report_native(self) -> None:
        compiled = native.loaded()
        slow = sorted(m for m, c in compiled.items() if not c)
        log.info("hot-path modules: %d of %d compiled%s", len(compiled) - len(slow),
                 len(compiled), f"; from source: {', '.join(slow)}" if slow else "")

    async def _watch_loop(self) -> None:
        await LoopWatchdog(self.metrics.observe_loop_lag).run()

    async def _sample_stats(self) -> None:
        try:
            await self.backend.sample()
        except Exception as exc:
            log.warning("stats sampling failed: %r", exc)

    def owned_partitions(self) -> list[int]:
        """Input partitions assigned to this worker."""
        try:
            tps = self.app.assignor.assigned_actives()
        except Exception:
            return []
        topic = self.settings.clickstream_topic
        return sorted(tp.partition for tp in tps if tp.topic == topic)

    async def _ingest(self, stream: Any) -> Any:
        """Micro-batches from the inbox; the agent's own stream never receives anything,
        it only subscribes the worker to the input topics."""
        processor = self.ensure()
        unaligned = self.inbox.unaligned
        try:
            async for records in self.inbox.batches(
                    self.settings.batch_max, self.settings.batch_within_s,
                    partial(kafka_backlog, self.app, self.settings.input_topics),
                    lambda: bool(stream.should_stop)):
                t0, started = time.perf_counter(), time.time()
                async with self.lock:
                    try:
                        stats = await processor.process(records)
                    except PipelineFailed as exc:
                        fail_stop(exc)
                self.last_batch_end = time.monotonic()
                by_topic: dict[str, int] = {}
                oldest: int | None = None
                for rec in records:
                    by_topic[rec.topic] = by_topic.get(rec.topic, 0) + 1
                    ts = rec.timestamp_ms
                    if ts is not None and (oldest is None or ts < oldest):
                        oldest = ts
                wait_s = started - oldest / 1000 if oldest is not None else None
                self.backend.on_batch(by_topic, stats, time.perf_counter() - t0, wait_s)
                inbox = self.inbox
                self.metrics.observe_inbox(inbox.unaligned - unaligned, inbox.paused)
                unaligned = inbox.unaligned
                yield len(records)
        finally:
            # The last batch's outbox may still be publishing; what a stop cuts short
            # stays in the stored outbox for the partition's next owner.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(processor.drain(), DRAIN_TIMEOUT_S)

    async def _on_partitions_assigned(self, sender: Any, assigned: Any, **_: Any) -> None:
        """A previous owner may have left unpublished records in these partitions' outbox."""
        self.inbox.assign(assigned)
        if self.processor is not None:
            self.processor.mark_dirty({tp.partition for tp in assigned})

    async def _on_partitions_revoked(self, sender: Any, revoked: Any, **_: Any) -> None:
        """Faust seeks to the committed offsets after a rebalance: what waits is dropped."""
        dropped = self.inbox.revoke(revoked)
        if self.processor is not None:
            gone = {tp.partition for tp in revoked if tp.topic in self.inbox.topics}
            self.processor.forget_partitions(gone)
            if self.sweeper is not None:
                self.sweeper.forget(gone)
        if dropped:
            log.info("rebalance: %d fetched input records dropped, to be fetched again",
                     dropped)
        if self.processor is not None:
            # The last batch's outbox is published before the partitions' next owner reads
            # theirs, so a customer's migrations do not reach the topic out of order.
            try:
                await asyncio.wait_for(self.processor.drain(), DRAIN_TIMEOUT_S)
            except TimeoutError:
                log.warning("rebalance: outbox publish still running after %gs; the next "
                            "owner publishes it again", DRAIN_TIMEOUT_S)

    async def _flush_outbox(self) -> None:
        processor = self.ensure()
        try:
            # Under the batch lock: a batch publishes and forgets its own records right after
            # its commit, and must not see them published a second time in between.
            async with self.lock:
                await processor.flush_outbox(self.owned_partitions())
        except Exception as exc:
            log.warning("outbox flush failed: %r", exc)

    async def _sweep(self) -> None:
        """Sweep owned partitions whose inputs changed, when idle or at the sweep interval."""
        self.ensure()
        sweeper = self.sweeper
        assert sweeper is not None
        idle = not self._busy()
        if not idle and time.monotonic() - sweeper.last_pass_end < self.settings.sweep_interval_s:
            return
        try:
            if idle:
                await sweeper.check_store(self.owned_partitions())
            due = await sweeper.due(self.owned_partitions())
            if due:
                stats = await sweeper.run_pass(due)
                log.info("sweep: %d customers, %d current ones passed over, %d migrations, "
                         "%.1fs", stats.customers, stats.skipped, stats.migrations,
                         stats.seconds)
                if stats.unreadable or stats.abandoned:
                    log.warning("sweep: %d customers whose stored state cannot be read "
                                "passed over; %d chunks given up (swept again)",
                                stats.unreadable, stats.abandoned)
            held = await sweeper.run_held(self.owned_partitions())
            if held.customers or held.abandoned:
                log.info("sweep: %d customers whose minimum dwell ended evaluated, %d "
                         "migrations, %.1fs", held.customers, held.migrations, held.seconds)
        except PipelineFailed as exc:
            fail_stop(exc)  # the store lost writes, or a batch gave up: nothing may go on
        except Exception as exc:
            log.warning("sweep failed: %r", exc)

    async def _learn(self, stream: Any) -> Any:
        self.ensure()
        if self.learner is None:
            assert self.redis is not None
            self.learner = Learner(self.settings, self.redis)
            await self.learner.load()
        async for events in stream.take_events(1000, within=0.5):
            await self.learner.learn_chunked([(e.message.offset, e.message.value)
                                              for e in events])
            yield len(events)

    async def _publish_models(self) -> None:
        if self.learner is None or self.store is None:
            return
        try:
            await self.learner.learn_personas(self.store)
            await self.learner.publish()
        except Exception as exc:
            log.warning("model snapshot failed: %r", exc)

    async def _refit_clv(self) -> None:
        try:
            doc = await refit_clv_in_child(self.settings)
            log.info("CLV refit on %d customers, version %s", doc["customers"], doc["version"])
        except SegstreamError as exc:
            log.info("CLV refit skipped: %s", exc)
        except Exception as exc:
            log.warning("CLV refit failed: %r", exc)


def create_engine(settings: Settings) -> Engine:
    return Engine(settings)
