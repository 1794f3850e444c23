"""The micro-batch step every agent runs: decode, load, apply, commit, publish.

It knows nothing of Faust: it takes raw records and talks to a
:class:`~features.store.FeatureStore` and a :class:`Publisher`, so the whole
correctness story (watermarks, dedupe, event time, outbox) is testable with the
in-memory twins and runs unchanged on the real broker and Redis.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, TypeVar

import msgpack
import orjson
from aiokafka.partitioner import murmur2

from features import serial
from features.events import Event, TransactionEvent, id_hash
from features.record import record
from features.state import CustomerState, apply_owned, empty
from features.store import (
    FeatureStore,
    LogAppend,
    PartitionCommit,
    PartitionSnapshot,
    StoreUnavailable,
)
from scorers.profile import Profile
from scorers.scoring import CustomerInput, Outcome, ScoringContext, evaluate
from stream.errors import PipelineFailed
from stream.redact import cid_ref, describe
from stream.redisconn import refusal_hint
from stream.schemas import Rejection, decode
from stream.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Commits refused by the version fence in a row before a batch gives up (a store that
#: is unavailable is retried with backoff for as long as it takes).
MAX_COMMIT_ATTEMPTS = 50
#: Recent migrations kept in Redis for the API (``GET /migrations``).
MIGRATION_LOG_MAXLEN = 10_000
#: Outbox records decoded (or reported to metrics) between two yields to the event loop.
OUTBOX_SLICE = 2_000
#: Most bytes of an input record's key kept by its dead letter (as the record's Kafka key
#: and in its ``key`` field). A rejected record's key can be as large as the input topic
#: allows; copied whole, a dead letter with it could exceed what the producer or the DLQ
#: topic accepts, and that one record would block its partition's outbox for good.
DLQ_KEY_BYTES = 512


@record
class RawRecord:
    """One Kafka record as consumed, before any decoding."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    #: the record already decoded (:func:`decode_record`), or None: decoded in its batch
    decoded: Event | Rejection | None = None

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None,
                 value: bytes | None, timestamp_ms: int | None = None,
                 decoded: Event | Rejection | None = None) -> None:
        w: Any = self
        w.topic = topic
        w.partition = partition
        w.offset = offset
        w.key = key
        w.value = value
        w.timestamp_ms = timestamp_ms
        w.decoded = decoded


class HomePartitions:
    """The partition each customer's records belong in: Kafka's default partition of the
    key (murmur2, as the Java client, aiokafka and kafka-python place a keyed record, and
    librdkafka with ``partitioner=murmur2_random``), remembered for the keys seen lately.

    >>> home = HomePartitions(6)
    >>> home(b"00042"), home(b"00042"), home(b"00043")
    (0, 0, 5)
    """

    def __init__(self, partitions: int, keep: int = 200_000) -> None:
        self.partitions = partitions
        self._keep = keep
        self._known: dict[bytes, int] = {}

    def __call__(self, key: bytes) -> int:
        p = self._known.get(key)
        if p is None:
            if len(self._known) >= self._keep:
                self._known.clear()
            p = self._known[key] = (murmur2(key) & 0x7FFFFFFF) % self.partitions
        return p


def record_decoder(settings: Settings) -> Callable[[str, bytes | None, bytes | None],
                                                   Event | Rejection]:
    """:func:`decode_record` for these settings' input topics and size limit: the one
    decoder of the consumer (as it fetches) and of a batch (records not decoded yet)."""
    kinds = {settings.clickstream_topic: "clickstream",
             settings.transactions_topic: "transactions"}
    if settings.currency:
        return partial(decode_record, kinds, settings.max_event_bytes,
                       currency=settings.currency.upper())
    return partial(decode_record, kinds, settings.max_event_bytes)


def decode_record(kinds: Mapping[str, str], max_bytes: int, topic: str, key: bytes | None,
                  value: bytes | None, currency: str | None = None) -> Event | Rejection:
    """An input record's event, or why it has none; all but the wall-clock check a batch
    makes (an event too far in the future), so it can run as soon as the record is fetched.

    >>> kinds = {"tx": "transactions"}
    >>> decode_record(kinds, 1000, "other", b"c1", b"{}").reason
    'unknown_topic'
    >>> decode_record(kinds, 1000, "tx", b"c1", b'{"event_id": "e", "customer_id": "c1", '
    ...               b'"ts": 0, "amount": 1}').customer_id
    'c1'
    """
    kind = kinds.get(topic)
    if kind is None:
        return Rejection("unknown_topic", f"not an input topic: {topic}")
    return decode(kind, key, value, max_bytes, currency)


class Publisher(Protocol):
    """Sends records to Kafka and returns once the broker acknowledged all of them.

    When some were acknowledged and others not, it raises :class:`PartlyPublished`
    saying which: those acknowledged are not sent again.
    """

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None: ...


class PartlyPublished(Exception):
    """A publish where Kafka acknowledged some records and refused (or never took) the
    others: ``delivered[i]`` says whether ``records[i]`` was acknowledged.

    A publisher sends nothing of a topic-partition after a refused batch of it: what
    goes out again later comes behind what Kafka took, so a customer's records keep
    their order on the topic, and a record Kafka took is never sent a second time.
    """

    def __init__(self, delivered: Sequence[bool], cause: BaseException) -> None:
        self.delivered = list(delivered)
        self.cause = cause
        missing = self.delivered.count(False)
        super().__init__(f"{missing} of {len(self.delivered)} records not delivered: "
                         f"{cause!r}")


@dataclass(slots=True)
class BatchStats:
    """What one micro-batch did, for metrics and tests."""

    records: int = 0
    applied: int = 0
    skipped_below_watermark: int = 0
    #: records not applied because their event was applied before (DESIGN §2's dedup)
    duplicates: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    conflicts: int = 0
    store_retries: int = 0
    migrations: int = 0

    def dead(self, reason: str) -> None:
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1


def wall_iso(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


#: A migration's scheme, from-segment and to-segment, as its outbox record carries them.
Move = tuple[str, str | None, str]


@record
class OutboxRecord:
    """An outbox record as decoded for publishing."""

    topic: str
    key: bytes | None
    value: bytes
    #: when the input that triggered it reached Kafka (migrations; else None)
    ingested_ms: int | None = None
    #: a migration's (scheme, from, to), so metrics need not parse the published JSON
    move: Move | None = None
    #: its place in the partition's output: commit version, position in that commit
    order: tuple[int, int] = (0, 0)

    def __init__(self, topic: str, key: bytes | None, value: bytes,
                 ingested_ms: int | None = None, move: Move | None = None,
                 order: tuple[int, int] = (0, 0)) -> None:
        w: Any = self
        w.topic = topic
        w.key = key
        w.value = value
        w.ingested_ms = ingested_ms
        w.move = move
        w.order = order


def encode_outbox(topic: str, key: bytes | None, value: bytes,
                  ingested_ms: int | None = None, order: tuple[int, int] = (0, 0),
                  move: Move | None = None) -> bytes:
    """An outbox record: where it goes, when its triggering input reached Kafka, and its
    place in the partition's output (the commit's partition version, then its position
    in that commit), so records left behind are published in the order they were made;
    a migration's also carries its ``move``.

    >>> blob = encode_outbox("m", b"c1", b"{}", 5, (3, 0), ("rfm", None, "New"))
    >>> unpack_outbox(blob)  # doctest: +NORMALIZE_WHITESPACE
    OutboxRecord(topic='m', key=b'c1', value=b'{}', ingested_ms=5, move=('rfm', None, 'New'),
                 order=(3, 0))
    >>> outbox_order(blob), unpack_outbox(encode_outbox("x", None, b"e")).move
    ((3, 0), None)
    """
    row = [topic, key, value, ingested_ms, *order]
    if move is not None:
        row.extend(move)
    return serial.packb(row)


def unpack_outbox(blob: bytes) -> OutboxRecord:
    """An outbox record, whichever version of :func:`encode_outbox` wrote it (the only
    place that knows the row's layout)."""
    row = msgpack.unpackb(blob, raw=False)
    n = len(row)
    return OutboxRecord(row[0], row[1], row[2], row[3] if n > 3 else None,
                        (row[6], row[7], row[8]) if n > 8 else None,
                        (int(row[4]), int(row[5])) if n > 5 else (0, 0))


def outbox_order(blob: bytes) -> tuple[int, int]:
    """The ``order`` an outbox record was encoded with ((0, 0) for older records)."""
    return unpack_outbox(blob).order


def _as_text(raw: bytes, limit: int) -> tuple[str, str]:
    """The first ``limit`` bytes of ``raw`` as text and its encoding, for a dead letter.

    UTF-8 stays text; a cut inside the last character keeps the whole characters before it
    (at most 3 bytes fewer). Bytes that are not UTF-8 before the cut are given in base64, so
    the record's own bytes can be recovered from the dead letter.

    >>> _as_text("ab\\u00e9".encode(), 3), _as_text(b"\\xffc1", 512)
    (('ab', 'utf-8'), ('/2Mx', 'base64'))
    """
    cut = raw[:limit]
    try:
        return cut.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        if len(raw) > limit and e.reason == "unexpected end of data":
            return cut[:e.start].decode("utf-8"), "utf-8"
        return base64.b64encode(cut).decode("ascii"), "base64"


def dlq_key(key: bytes | None) -> bytes | None:
    """The Kafka key of a dead letter: the input record's key, cut to :data:`DLQ_KEY_BYTES`.

    >>> dlq_key(b"c1"), len(dlq_key(b"k" * 2_000_000)), dlq_key(None)
    (b'c1', 512, None)
    """
    return key if key is None or len(key) <= DLQ_KEY_BYTES else key[:DLQ_KEY_BYTES]


def settled_ms(high_ts: Mapping[str, int], lateness_ms: int) -> int:
    """Event time behind which a partition accepts no more events (lateness is per topic)."""
    marks = [v for v in high_ts.values() if v >= 0]
    return (min(marks) if marks else -1) - lateness_ms


class _Redo(Exception):
    """An attempt must be judged again from a fresh load: it found poison customers (their
    records are now rejections), or it read a background commit that did not land."""


@dataclass(slots=True)
class _Accepted:
    """A partition's records of one batch after watermark and event-time checks."""

    now_ms: int
    high_ts: dict[str, int]
    watermarks: dict[str, int] = field(default_factory=dict)
    outbox: dict[str, bytes] = field(default_factory=dict)
    per_customer: dict[str, list[tuple[RawRecord, Event]]] = field(default_factory=dict)
    #: the customers' stored states, decoded once for the duplicate check and reused
    states: dict[str, CustomerState | None] = field(default_factory=dict)
    #: ids this batch accepted so far: (customer, is transaction, id hash) -> timestamp
    batch_ids: dict[tuple[str, bool, int], int] = field(default_factory=dict)


class Scoring(Protocol):
    """Shared scoring state: refreshed before a batch, then frozen into a context."""

    async def refresh(self, force: bool = False) -> None: ...

    def context(self, now_ms: int) -> ScoringContext: ...

    def digest(self, now_ms: int) -> str: ...


class BatchProcessor:
    """Applies micro-batches of raw input records to the feature store, effectively once."""

    def __init__(
        self,
        settings: Settings,
        store: FeatureStore,
        publisher: Publisher,
        clock: Callable[[], float] = time.time,
        scoring: Scoring | None = None,
        background_publish: bool = False,
        background_commit: bool = False,
        check_partitions: bool = False,
    ) -> None:
        self.settings = settings
        #: with ``check_partitions``, a record whose key belongs in another partition is
        #: a dead letter: applied, it would start a second state of its customer there
        self._home = HomePartitions(settings.partitions) if check_partitions else None
        self._lateness_ms = settings.lateness_ms  # settings are frozen; read per event
        #: publish a batch's outbox while the next batch is loaded and evaluated (see
        #: :meth:`drain`); otherwise :meth:`process` returns once it is published
        self.background_publish = background_publish
        self._publishing: asyncio.Future[int] | None = None
        #: commit a batch's state (then publish its outbox) while the next batch is loaded
        #: and evaluated: :meth:`process` returns once the batch is evaluated, and the next
        #: batch reads what this one is committing where the store may not hold it yet
        self.background_commit = background_commit
        #: the partition commits of the batch committing in the background, if any
        self._inflight: dict[int, PartitionCommit] = {}
        #: whether the last background commit landed as it was evaluated (every partition
        #: on its first try): a batch that read it before it landed is judged again if not
        self._inflight_ok = True
        #: the error a background commit gave up with; every later batch raises it
        self._failed: BaseException | None = None
        #: called with the number of commits refused by the version fence in the
        #: background (metrics; a batch's own are in its stats)
        self.on_conflicts: Callable[[int], None] | None = None
        #: called with :class:`PipelineFailed` the moment a batch committing in the
        #: background gives up, so that a worker stops then, and not only when a later
        #: batch arrives (there may be none: the end of a replay) while its input waits
        #: unacknowledged and unfetched
        self.on_failed: Callable[[PipelineFailed], None] | None = None
        #: run once the batch committing in the background has committed (see
        #: :meth:`when_committed`); dropped if it gives up or is cancelled
        self._after_commit: list[Callable[[], None]] = []
        self._committing = False
        #: the highest watermark per (partition, topic) this processor's commits wrote or
        #: its loads read: watermarks only move forward, whoever owns the partition, so a
        #: load that reads one below it means the store lost writes (see
        #: :meth:`check_kept`)
        self._wrote: dict[tuple[int, str], int] = {}
        self.scoring = scoring
        #: called with (operation, seconds, ok) after each Redis round trip of a batch (metrics)
        self.on_redis: Callable[[str, float, bool], None] | None = None
        #: called with (stage, seconds) as each stage of a batch ends (metrics): decode,
        #: refresh, load, evaluate, publish_wait (for the previous batch's publish), commit,
        #: publish (only when not publishing in the background)
        self.on_stage: Callable[[str, float], None] | None = None
        #: called with the outbox records after Kafka acknowledged them (metrics)
        self.on_published: Callable[[list[OutboxRecord]], None] | None = None
        #: called with the number of outbox records a publish failed to deliver (metrics)
        self.on_publish_failed: Callable[[int], None] | None = None
        #: called with (partition, customer id, profile, -1) for each evaluation that moved
        #: a customer (the sweeper times the end of the minimum dwell it starts)
        self.on_moved: Callable[[int, str, Any, int], None] | None = None
        self.store = store
        self.publisher = publisher
        self.clock = clock
        #: decodes one input record: (topic, key, value) -> event or rejection
        self.decode_record = record_decoder(settings)
        self.topics = list(settings.input_topics)
        #: the output topics' names (read per record: a settings property builds the name)
        self.migrations_topic = settings.migrations_topic
        self.examples_topic = settings.examples_topic
        #: partitions whose stored outbox holds nothing this processor has not published or
        #: is not publishing; any other partition's outbox is read back before publishing,
        #: so records a timed-out commit or a previous owner left there go out first
        self._clean: set[int] = set()
        #: per partition, how often it was marked dirty: a flush marks a partition clean
        #: only if nobody marked it dirty while the flush ran
        self._dirtied: dict[int, int] = {}
        #: per partition, when (``monotonic``) a publish of its outbox first left records
        #: behind since the partition last published everything it held
        self._publish_failing: dict[int, float] = {}
        self.monotonic: Callable[[], float] = time.monotonic

    def publish_failing_s(self, partitions: Iterable[int]) -> float:
        """How long the outbox of one of these partitions has kept records a publish
        could not deliver (the longest, in seconds; 0 when every publish since delivered
        everything). Partitions not named are forgotten: they are no longer this
        processor's, and a later owner starts its own count."""
        owned = set(partitions)
        for p in [p for p in self._publish_failing if p not in owned]:
            del self._publish_failing[p]
        if not self._publish_failing:
            return 0.0
        return max(0.0, self.monotonic() - min(self._publish_failing.values()))

    def _published_all(self, partitions: Iterable[int], failed: Iterable[int] = ()) -> None:
        """Note a flush of ``partitions``: ``failed`` kept records, the others none."""
        left = set(failed)
        for p in partitions:
            if p in left:
                self._publish_failing.setdefault(p, self.monotonic())
            else:
                self._publish_failing.pop(p, None)

    def mark_dirty(self, partitions: Iterable[int]) -> None:
        """The stored outbox of these partitions may hold records nobody published yet."""
        for p in partitions:
            self._clean.discard(p)
            self._dirtied[p] = self._dirtied.get(p, 0) + 1

    def is_clean(self, partition: int) -> bool:
        """Whether everything this processor committed for ``partition`` was published
        (or is being published) and nothing unpublished from elsewhere waits there."""
        return partition in self._clean

    def _mark_clean(self, partitions: Iterable[int], marks: Mapping[int, int]) -> None:
        self._clean.update(p for p in partitions if self._dirtied.get(p, 0) == marks[p])

    @property
    def settled(self) -> bool:
        """Whether no commit or outbox publish is running in the background (a
        :meth:`drain` would return at once)."""
        return self._publishing is None or self._publishing.done()

    async def drain(self) -> None:
        """Wait until the commit and outbox publish still running in the background (if
        any) are done.

        A failed background publish leaves its partitions dirty: their records stay in
        the stored outbox, and the next flush of those partitions reads them back and
        publishes them first. A waiter cancelled or timed out here does not cancel the
        publish, and the next drain waits for it again.
        """
        task = self._publishing
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                raise  # the waiter was cancelled, not the publish
        except Exception:
            pass  # _publish logged it and marked its partitions dirty
        if self._publishing is task:
            self._publishing = None

    def publish_later(self, partitions: list[int], known: dict[int, dict[str, bytes]]) -> None:
        """Publish what a commit of these partitions just wrote (``known``) in the
        background; the next :meth:`drain` waits for it. Call it only after a commit that
        was itself preceded by a drain, so that one publish runs at a time, in commit order.
        """
        task = asyncio.ensure_future(self._publish(partitions, known))
        # Registered before any waiter's: it runs before a drain returns.
        task.add_done_callback(partial(self._publish_ended, partitions))
        self._publishing = task

    async def _publish(self, partitions: list[int], known: dict[int, dict[str, bytes]]) -> int:
        try:
            return await self._flush(partitions, known)
        except Exception as exc:
            # What it did not publish and forget stays in the stored outbox: the next
            # flush of these partitions reads it back and publishes it first.
            self.mark_dirty(partitions)
            log.warning("background outbox publish failed: %r", exc)
            return 0

    def _publish_ended(self, partitions: list[int], task: asyncio.Future[int]) -> None:
        if task.cancelled():  # a stop, maybe before it even started: as a failure
            self.mark_dirty(partitions)

    @staticmethod
    def _overlay(snaps: Mapping[int, PartitionSnapshot],
                 inflight: Mapping[int, PartitionCommit]) -> int:
        """Make loaded snapshots read as if the background commit had landed; returns the
        newest engine time it carries.

        The version becomes the one that commit makes, whatever the store returned: if
        anyone else wrote the partition since, the commit built on this snapshot is fenced
        and the batch reloads."""
        now = -1
        for p, c in inflight.items():
            now = max(now, c.now_ms)
            snap = snaps.get(p)
            if snap is None:
                continue
            snap.ver = c.expected_ver + 1
            snap.now_ms = max(snap.now_ms, c.now_ms)
            for t, off in c.watermarks.items():
                if off > snap.watermarks.get(t, -1):
                    snap.watermarks[t] = off
            for t, ts in c.high_ts.items():
                if ts > snap.high_ts.get(t, -1):
                    snap.high_ts[t] = ts
            states, profiles = snap.states, snap.profiles
            for cid in states:
                blob = c.states.get(cid)
                if blob is not None:
                    states[cid] = blob
                prof = c.profiles.get(cid)
                if prof is not None:
                    profiles[cid] = prof
        return now

    def _note_written(self, commits: Sequence[PartitionCommit], ok: Mapping[int, bool]) -> None:
        """Remember the watermarks of the commits the store applied."""
        self.note_held({c.partition: c.watermarks for c in commits if ok.get(c.partition)})

    def note_held(self, watermarks: Mapping[int, Mapping[str, int]]) -> None:
        """Remember watermarks the store holds: what a commit wrote, what a load found
        (a commit whose reply was lost, another owner's commits), or what the store held
        when the partitions were assigned."""
        wrote = self._wrote
        for p, wms in watermarks.items():
            for t, off in wms.items():
                if off > wrote.get((p, t), -1):
                    wrote[(p, t)] = off

    def written_partitions(self) -> set[int]:
        """Partitions whose watermarks this processor committed or found in the store."""
        return {p for p, _t in self._wrote}

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        """Partitions this worker no longer owns: a later assignment positions the consumer
        from the store's watermarks as they are then (``perform_seek``)."""
        gone = set(partitions)
        for key in [k for k in self._wrote if k[0] in gone]:
            del self._wrote[key]

    def check_kept(self, snaps: Mapping[int, PartitionSnapshot]) -> None:
        """Stop if the store no longer holds a watermark this processor committed or read.

        A Redis that lost recent writes while the worker ran (a failover to a lagging
        replica, a server restarted from an older append-only file or empty) has
        watermarks behind what the worker applied, and the consumer is already past the
        records in between: applying the next batch would move the watermark past them,
        and they would never be applied. The worker stops instead; on its restart the
        consumer goes back to where the store's watermarks end
        (:meth:`stream.app._Consumer.perform_seek`) and applies them again.
        """
        wrote = self._wrote
        if not wrote:
            return
        for p, snap in snaps.items():
            for t in self.topics:
                mine = wrote.get((p, t))
                if mine is not None and snap.watermarks.get(t, -1) < mine:
                    raise PipelineFailed(
                        f"the state store lost committed writes: the watermark of {t} "
                        f"partition {p} is {snap.watermarks.get(t, -1)}, below the "
                        f"{mine} this worker committed; restarting to apply the records "
                        "in between again")

    def when_committed(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the batch committing in the background (if any) has committed
        every partition, or now if none is. The worker acknowledges a batch's input offsets
        to Kafka this way: never before the state they cover is in the store."""
        if self._committing:
            self._after_commit.append(fn)
        else:
            fn()

    def _committed(self) -> None:
        self._committing = False
        done, self._after_commit = self._after_commit, []
        for fn in done:
            fn()

    def _commit_later(self, commits: list[PartitionCommit],
                      pending: dict[int, list[tuple[RawRecord, Event | Rejection]]]) -> None:
        """Commit an evaluated batch, then publish its outbox, in the background; the next
        :meth:`drain` waits for both. Call it only after a drain (one runs at a time)."""
        self._inflight = {c.partition: c for c in commits}
        self._inflight_ok = True
        self._committing = True
        task = asyncio.ensure_future(self._settle(commits, pending))
        task.add_done_callback(partial(self._settle_ended, list(pending)))
        self._publishing = task

    def _settle_ended(self, partitions: list[int], task: asyncio.Future[int]) -> None:
        if task.cancelled() or task.exception() is not None:
            # Cancelled (a stop), perhaps before it started, or given up: what it did not
            # commit is not acknowledged, and what it did not publish waits in the store.
            # Its records left the inbox: a later batch committing past them would lose
            # them for good, so none may (the worker restarts from the watermarks).
            if task.cancelled() and self._failed is None:
                self._failed = PipelineFailed("its commit was cancelled before it landed")
            self.mark_dirty(partitions)
            self._inflight, self._inflight_ok = {}, False
            self._committing, self._after_commit = False, []
            # A cancel is a stop under way; a batch that gave up stops the worker now.
            if not task.cancelled() and self.on_failed is not None:
                self.on_failed(self._failure())

    async def _settle(self, commits: list[PartitionCommit],
                      pending: dict[int, list[tuple[RawRecord, Event | Rejection]]]) -> int:
        """The background part of a batch: its commit and publish. A partition whose
        commit was refused or failed is applied again from a fresh load, here, before any
        later batch commits (their drain waits for this)."""
        try:
            t0 = time.perf_counter()
            try:
                ok = await self._timed("commit", self.store.commit(commits))
                self._note_written(commits, ok)
            except Exception as exc:
                # The commit may have been applied: its outbox records then wait in the
                # store and go out before anything newer (the partitions are dirty).
                self._inflight_ok = False
                self.mark_dirty(pending)
                log.warning("background commit failed (%r); applying the batch again", exc)
                await asyncio.sleep(0.1)
                await self._reapply(pending, BatchStats(store_retries=1))
                return 0
            if self.on_stage is not None:
                self.on_stage("commit", time.perf_counter() - t0)
            failed = {p: items for p, items in pending.items() if not ok.get(p, True)}
            if not failed:
                self._committed()
            published = [c.partition for c in commits if ok.get(c.partition)]
            n = await self._publish(published, {c.partition: c.outbox for c in commits})
            if failed:
                self._inflight_ok = False
                log.info("commit fenced on partitions %s (their version moved on); "
                         "reloading", sorted(failed))
                await self._reapply(failed, BatchStats(conflicts=1))
            return n
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._failed = exc
            log.error("a batch committing in the background gave up: %r", exc)
            raise
        finally:
            self._inflight = {}

    async def _reapply(self, pending: dict[int, list[tuple[RawRecord, Event | Rejection]]],
                       retry: BatchStats) -> None:
        """Apply again, from a fresh load, partitions whose background commit did not land;
        then the batch counts as committed. Fences met on the way count for the metrics."""
        try:
            await self._run(pending, retry, "settle")
        finally:
            if retry.conflicts and self.on_conflicts is not None:
                self.on_conflicts(retry.conflicts)
        self._committed()

    def dead_letter(self, rec: RawRecord, rejection: Rejection) -> bytes:
        """The DLQ record of a rejected input, as the bytes to publish."""
        raw = rec.value or b""
        limit = self.settings.dlq_payload_bytes
        payload, encoding = _as_text(raw, limit)
        key = key_encoding = None
        if rec.key is not None:
            key, key_encoding = _as_text(rec.key, DLQ_KEY_BYTES)
        return orjson.dumps({
            "source_topic": rec.topic,
            "partition": rec.partition,
            "offset": rec.offset,
            "reason": rejection.reason,
            "error": rejection.error[:1000],
            "payload": payload,
            "payload_truncated": len(raw) > limit,
            "payload_encoding": encoding,
            "key": key,
            "key_truncated": rec.key is not None and len(rec.key) > DLQ_KEY_BYTES,
            "key_encoding": key_encoding,
            "at": wall_iso(self.clock()),
        })

    def _decode_all(self, records: Sequence[RawRecord]) -> dict[int, list[tuple[RawRecord,
                                                                         Event | Rejection]]]:
        horizon = int(self.clock() * 1000) + self.settings.future_skew_ms
        by_part: dict[int, list[tuple[RawRecord, Event | Rejection]]] = {}
        decode_one = self.decode_record
        home = self._home
        for rec in records:
            res = rec.decoded
            if res is None:
                res = decode_one(rec.topic, rec.key, rec.value)
            if not isinstance(res, Rejection):
                if res.ts_ms > horizon:
                    res = Rejection("from_future", "timestamp is more than "
                                    f"{self.settings.max_future_skew_s:g}s ahead of wall clock")
                elif home is not None and home(rec.key) != rec.partition:  # type: ignore[arg-type]
                    res = Rejection(
                        "wrong_partition",
                        f"record in partition {rec.partition}, but its key belongs in "
                        f"partition {home(rec.key)} of {home.partitions} (Kafka's default "  # type: ignore[arg-type]
                        "partitioner, murmur2 of the key): all of a customer's records must "
                        "be in one partition, so produce with the default partitioner "
                        "(librdkafka: partitioner=murmur2_random) and no explicit partition")
            by_part.setdefault(rec.partition, []).append((rec, res))
        return by_part

    async def process(self, records: Sequence[RawRecord]) -> BatchStats:
        """Apply a batch; returns once its state is committed and its outbox published.

        With ``background_commit`` it returns once the batch is evaluated: its commit and
        then its publish run while the next batch loads and evaluates (the next batch
        reads the customers and watermarks this one is committing from the commit itself,
        and ends that commit before its own). If the commit is refused or fails, the batch
        is applied again from a fresh load before anything newer commits, and a batch that
        read it is judged again. The stats are those of the evaluation. A background commit
        that gives up makes every later batch raise :class:`PipelineFailed`.
        """
        self.raise_if_failed()
        stats = BatchStats(records=len(records))
        t0 = time.perf_counter()
        pending = self._decode_all(records)
        if self.on_stage is not None:
            self.on_stage("decode", time.perf_counter() - t0)
        await self._run(pending, stats, "overlap" if self.background_commit else "plain")
        return stats

    def _failure(self) -> PipelineFailed:
        failed = self._failed
        if isinstance(failed, PipelineFailed):
            why = str(failed)
        else:
            why = describe(failed) if failed is not None else "unknown"
        return PipelineFailed(f"a batch committing in the background gave up: {why}")

    def raise_if_failed(self) -> None:
        """Raise :class:`PipelineFailed` if a batch committing in the background gave up
        or was cancelled: nothing may be committed after it."""
        if self._failed is not None:
            raise self._failure() from self._failed

    async def _run(self, pending: dict[int, list[tuple[RawRecord, Event | Rejection]]],
                   stats: BatchStats, mode: str) -> None:
        """Attempts until every partition of ``pending`` is committed (or, ``overlap``,
        committing in the background). ``mode``: ``plain`` (commit here; publish here or
        in the background), ``overlap`` (commit and publish in the background) or
        ``settle`` (inside a background commit: commit and publish here, no drain)."""
        while pending:
            if stats.conflicts >= MAX_COMMIT_ATTEMPTS:
                raise PipelineFailed("gave up after repeated commit conflicts")
            try:
                done = await self._attempt(pending, stats, mode)
            except _Redo:
                continue
            except PipelineFailed:
                raise
            except Exception as exc:
                # The commit may have been applied before the error: its outbox records
                # then wait in Redis, and must be published before anything newer. Any
                # error is retried: a batch that escaped would never be fetched again
                # (the consumer is past it) while the next batches' watermarks pass it.
                self.mark_dirty(pending)
                stats.store_retries += 1
                delay = min(5.0, 0.05 * 2 ** min(stats.store_retries, 7))
                if isinstance(exc, StoreUnavailable):
                    log.warning("state store unavailable (%s)%s; retrying in %.2fs", exc,
                                refusal_hint(exc), delay)
                else:
                    log.error("batch failed (%r); retrying in %.2fs", exc, delay,
                              exc_info=stats.store_retries == 1)
                await asyncio.sleep(delay)
                continue
            for p in done:
                pending.pop(p, None)
            if pending:
                stats.conflicts += 1
                log.info("commit fenced on partitions %s (their version moved on); reloading",
                         sorted(pending))

    async def _attempt(self, pending: dict[int, list[tuple[RawRecord, Event | Rejection]]],
                       stats: BatchStats, mode: str = "plain") -> list[int]:
        wanted = {
            p: [r.customer_id for _, r in items if not isinstance(r, Rejection)]
            for p, items in pending.items()
        }
        stage = self.on_stage
        t0 = time.perf_counter()
        if self.scoring is not None:
            await self.scoring.refresh()
        t1 = time.perf_counter()
        # What the batch committing in the background writes, as it was when loading began:
        # the store may or may not hold it yet; the commit below is fenced on it.
        inflight = dict(self._inflight) if mode == "overlap" else {}
        now, snaps = await self._timed("load", self.store.load(wanted, self.topics))
        # What the store returned is what it held: remembered as such, not with the
        # background commit laid over it (which may yet be refused).
        held = {p: dict(s.watermarks) for p, s in snaps.items()} if inflight else None
        if inflight:
            now = max(now, self._overlay(snaps, inflight))
        self.check_kept(snaps)
        self.note_held(held if held is not None else
                        {p: s.watermarks for p, s in snaps.items()})
        t2 = time.perf_counter()
        if stage is not None:
            stage("refresh", t1 - t0)
            stage("load", t2 - t1)
        local = BatchStats()
        # Phase 1: judge every record against its partition's watermarks and event time.
        accepted: dict[int, _Accepted] = {}
        for p, items in pending.items():
            acc = accepted[p] = self._accept(snaps[p], items, local)
            now = max(now, acc.now_ms)
        # Phase 2: apply, score (every partition's customers in one evaluation) and build
        # one atomic commit per partition.
        ctx = self.scoring.context(now) if self.scoring is not None and now >= 0 else None
        commits: list[PartitionCommit] = []
        scored: list[tuple[PartitionCommit, _Accepted, CustomerInput]] = []
        poison: list[tuple[list[tuple[RawRecord, Event]], Exception]] = []
        for p, acc in accepted.items():
            if not acc.watermarks:
                continue
            snap = snaps[p]
            commit = PartitionCommit(p, snap.ver, acc.watermarks, acc.now_ms, {}, acc.outbox,
                                     acc.high_ts)
            commits.append(commit)
            settled = (settled_ms(acc.high_ts, ctx.lateness_ms) if ctx is not None else None)
            for cid, pairs in acc.per_customer.items():
                try:
                    # A state decoded here is this batch's own: fold into it, no copy.
                    if cid in acc.states:
                        state = acc.states[cid] or empty()
                    else:
                        blob = snap.states.get(cid)
                        state = serial.decode(blob) if blob else empty()
                    state = apply_owned(state, [e for _, e in pairs], self._lateness_ms)
                    # Encoding fails too for a state no store can hold (a sum past 64 bits).
                    encoded = serial.encode(state)
                    profile = Profile.from_bytes(snap.profiles.get(cid))
                except Exception as exc:  # a poison customer must not stall the partition
                    log.exception("processing failed for customer %s; %d events dead-lettered",
                                  cid_ref(cid), len(pairs))
                    poison.append((pairs, exc))
                    continue
                last = pairs[-1][0]
                c = CustomerInput(
                    cid, state, profile,
                    [e for _, e in pairs],
                    {"topic": last.topic, "partition": last.partition, "offset": last.offset,
                     "ingested_ms": last.timestamp_ms},
                    settled,
                )
                commit.states[cid] = encoded
                scored.append((commit, acc, c))
        if ctx is not None:
            outcomes = self.score([c for _, _, c in scored], ctx)
            for (commit, acc, c), (_, outcome) in zip(scored, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    poison.append((acc.per_customer[c.customer_id], outcome))
                    continue
                self.add_outcome(commit, outcome, c.trigger)
        if poison:
            # Their events were counted into engine time and the lateness horizons in phase
            # 1, and the others were scored at that time: judge the batch again with them
            # rejected, so only accepted events move time (DESIGN §2).
            self._reject_poison(pending, poison)
            raise _Redo
        local.applied += sum(len(acc.per_customer[c.customer_id]) for _, acc, c in scored)
        # The previous batch's publish ran while this one loaded and evaluated; it ends
        # before this commit, so outbox records go out in the order they were committed
        # and a failed commit below marks its partitions dirty after that publish.
        t3 = time.perf_counter()
        if mode != "settle":
            await self.drain()
        t4 = time.perf_counter()
        if mode == "overlap":
            self.raise_if_failed()
            if inflight and not self._inflight_ok:
                raise _Redo  # it read a commit that did not land as it was evaluated
            if stage is not None:
                stage("evaluate", t3 - t2)
                stage("publish_wait", t4 - t3)
            if commits:
                self._commit_later(commits, {p: pending[p] for p in pending})
            ok: Mapping[int, bool] = {c.partition: True for c in commits}
        else:
            ok = await self._timed("commit", self.store.commit(commits))
            self._note_written(commits, ok)
            if stage is not None:
                stage("evaluate", t3 - t2)
                stage("publish_wait", t4 - t3)
                stage("commit", time.perf_counter() - t4)
        done = [p for p in pending if ok.get(p, True)]
        stats.applied += local.applied
        stats.migrations += sum(sum(1 for k in c.outbox if k.startswith("m:"))
                                for c in commits if ok.get(c.partition))
        stats.skipped_below_watermark += local.skipped_below_watermark
        stats.duplicates += local.duplicates
        for reason, n in local.dead_letters.items():
            if any(ok.get(c.partition) for c in commits):
                stats.dead_letters[reason] = stats.dead_letters.get(reason, 0) + n
        if mode == "overlap":
            return done
        published = [c.partition for c in commits if ok.get(c.partition)]
        known = {c.partition: c.outbox for c in commits}
        if mode == "settle":
            await self._publish(published, known)
        elif self.background_publish:
            self.publish_later(published, known)
        else:
            t5 = time.perf_counter()
            await self._flush(published, known)
            if stage is not None:
                stage("publish", time.perf_counter() - t5)
        return done

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        t0 = time.perf_counter()
        try:
            out = await call
        except StoreUnavailable:
            if self.on_redis is not None:
                self.on_redis(op, time.perf_counter() - t0, False)
            raise
        if self.on_redis is not None:
            self.on_redis(op, time.perf_counter() - t0, True)
        return out

    def _accept(self, snap: PartitionSnapshot, items: list[tuple[RawRecord, Event | Rejection]],
                local: BatchStats) -> _Accepted:
        acc = _Accepted(now_ms=snap.now_ms, high_ts=dict(snap.high_ts))
        lateness = self._lateness_ms
        for rec, res in items:
            if rec.offset <= snap.watermarks.get(rec.topic, -1):
                local.skipped_below_watermark += 1
                continue
            if rec.offset > acc.watermarks.get(rec.topic, -1):
                acc.watermarks[rec.topic] = rec.offset
            hi = acc.high_ts.get(rec.topic, -1)
            if not isinstance(res, Rejection) and hi >= 0 and res.ts_ms < hi - lateness:
                res = Rejection("too_late", "timestamp is more than "
                                f"{self.settings.allowed_lateness_days:g} days behind the "
                                "newest event of its topic-partition")
            if isinstance(res, Rejection):
                acc.outbox[f"dlq:{rec.topic}:{rec.offset}"] = encode_outbox(
                    self.settings.dlq_topic, dlq_key(rec.key), self.dead_letter(rec, res),
                    order=(snap.ver, len(acc.outbox)))
                local.dead(res.reason)
                continue
            if self._duplicate(snap, acc, res):
                # applied before (or earlier in this batch): not accepted again, so it
                # moves neither engine time nor the partition's lateness horizon
                local.duplicates += 1
                continue
            acc.now_ms = max(acc.now_ms, res.ts_ms)
            if res.ts_ms > hi:
                acc.high_ts[rec.topic] = res.ts_ms
            acc.per_customer.setdefault(res.customer_id, []).append((rec, res))
        return acc

    def _duplicate(self, snap: PartitionSnapshot, acc: _Accepted, event: Event) -> bool:
        cid = event.customer_id
        if cid not in acc.states:
            try:
                blob = snap.states.get(cid)
                acc.states[cid] = serial.decode(blob) if blob else None
            except Exception:  # left to phase 2, which dead-letters a poison customer
                return False
        state = acc.states[cid]
        lateness = self._lateness_ms
        txn = isinstance(event, TransactionEvent)
        h = id_hash(event.event_id)
        # as features.state.is_duplicate, with the id hashed once for both checks
        if state is not None:
            first = (state.txn_ids if txn else state.seen_ids).get(h)
            if first is not None and event.ts_ms - first <= lateness:
                return True
        key = (cid, txn, h)
        first = acc.batch_ids.get(key)
        if first is not None and event.ts_ms - first <= lateness:
            return True
        acc.batch_ids[key] = event.ts_ms
        return False

    @staticmethod
    def _reject_poison(pending: dict[int, list[tuple[RawRecord, Event | Rejection]]],
                       poison: list[tuple[list[tuple[RawRecord, Event]], Exception]]) -> None:
        """Turn the failed customers' records of ``pending`` into ``processing_error``s."""
        failed = {(rec.topic, rec.partition, rec.offset): Rejection("processing_error",
                                                                    repr(exc))
                  for pairs, exc in poison for rec, _ in pairs}
        for p, items in pending.items():
            pending[p] = [(rec, failed.get((rec.topic, rec.partition, rec.offset), res))
                          for rec, res in items]

    def score(self, inputs: list[CustomerInput], ctx: ScoringContext
               ) -> list[tuple[CustomerInput, Outcome | Exception]]:
        """Evaluate together; if that fails, one by one so only the poison customer fails."""
        if not inputs:
            return []
        try:
            return list(zip(inputs, evaluate(inputs, ctx), strict=True))
        except Exception:
            log.warning("batch scoring failed; isolating the failing customer")
        out: list[tuple[CustomerInput, Outcome | Exception]] = []
        for c in inputs:
            try:
                out.append((c, evaluate([c], ctx)[0]))
            except Exception as exc:
                log.exception("scoring failed for customer %s; its events are dead-lettered",
                              cid_ref(c.customer_id))
                out.append((c, exc))
        return out

    def add_outcome(self, commit: PartitionCommit, o: Outcome,
                    trigger: Mapping[str, Any] | None) -> None:
        """Put an evaluation's profile, counters, migrations and examples into a commit."""
        if o.changed:
            commit.profiles[o.customer_id] = o.profile.to_bytes()
        if o.migrations and self.on_moved is not None:
            try:
                self.on_moved(commit.partition, o.customer_id, o.profile, -1)
            except Exception as exc:  # timing a dwell must never fail a batch
                log.warning("dwell timer: a move was not noted (%r); the next pass notes "
                            "it", exc)
        for table, row in o.increments.items():
            dst = commit.increments.setdefault(table, {})
            for fld, d in row.items():
                dst[fld] = dst.get(fld, 0) + d
        key = o.customer_id.encode()
        ingested = (trigger or {}).get("ingested_ms")
        ver = commit.expected_ver
        for m in o.migrations:
            commit.outbox[f"m:{m['migration_id']}"] = encode_outbox(
                self.migrations_topic, key, orjson.dumps(m), ingested,
                (ver, len(commit.outbox)), (m["scheme"], m["from_segment"], m["to_segment"]))
        for ex in o.examples:
            commit.outbox[f"x:{ex.example_id}"] = encode_outbox(
                self.examples_topic, None, ex.to_bytes(), None,
                (ver, len(commit.outbox)))

    async def flush_outbox(self, partitions: Sequence[int],
                           known: dict[int, dict[str, bytes]] | None = None) -> int:
        """Publish committed outbox records of these partitions, then forget them; a
        publish still running in the background ends first.

        ``known`` holds what a commit just wrote. It is published as it is only for a
        partition known to hold nothing older; any other partition's outbox is read back
        from the store and published oldest first, so a customer's migrations reach the
        topic in the order they were made even after a timeout or a crash.
        """
        await self.drain()
        return await self._flush(partitions, known)

    async def _flush(self, partitions: Sequence[int],
                     known: dict[int, dict[str, bytes]] | None) -> int:
        parts = list(partitions)
        marks = {p: self._dirtied.get(p, 0) for p in parts}
        stale = parts if known is None else [p for p in parts if p not in self._clean]
        # Each record is decoded once, whether read back (then sorted) or just written.
        pending: dict[int, dict[str, OutboxRecord]] = {}
        if stale:
            stored = await self.store.outbox_pending(stale)
            for p, rows in stored.items():
                decoded: dict[str, OutboxRecord] = {}
                for n, (oid, b) in enumerate(rows.items(), 1):
                    decoded[oid] = unpack_outbox(b)
                    if n % OUTBOX_SLICE == 0:
                        # An outbox that grew through an output outage can hold many
                        # thousands of records: let the loop breathe between slices.
                        await asyncio.sleep(0)
                pending[p] = dict(sorted(decoded.items(), key=lambda kv: kv[1].order))
        if known is not None:
            for p in parts:
                if p not in stale and known.get(p):
                    pending[p] = {oid: unpack_outbox(b) for oid, b in known[p].items()}
        if not pending:
            self._mark_clean(stale, marks)
            self._published_all(parts)
            return 0
        unpacked = [r for rows in pending.values() for r in rows.values()]
        records = [(r.topic, r.key, r.value) for r in unpacked]
        try:
            await self.publisher.publish(records)
        except PartlyPublished as exc:
            # Only what Kafka refused waits for the next flush: sending the whole outbox
            # again would repeat every record Kafka took, at every flush, for as long as
            # one topic refuses its records.
            done: dict[int, list[str]] = {}
            sent: list[OutboxRecord] = []
            kept: set[int] = set()
            flags = iter(exc.delivered)
            for p, rows in pending.items():
                for oid, rec in rows.items():
                    if next(flags):
                        done.setdefault(p, []).append(oid)
                        sent.append(rec)
                    else:
                        kept.add(p)
            self.mark_dirty(kept)
            self._published_all(parts, kept)
            log.warning("publishing %d of %d outbox records failed: %r",
                        len(records) - len(sent), len(records), exc.cause)
            if self.on_publish_failed is not None:
                self.on_publish_failed(len(records) - len(sent))
        except Exception as exc:
            # Left in the outbox; the periodic flush publishes them later.
            self.mark_dirty(pending)
            self._published_all(parts, pending)
            log.warning("publishing %d outbox records failed: %r", len(records), exc)
            if self.on_publish_failed is not None:
                self.on_publish_failed(len(records))
            return 0
        else:
            done = {p: list(rows) for p, rows in pending.items()}
            sent = unpacked
            self._published_all(parts)
        topic = self.migrations_topic
        migrations = [r.value for r in sent if r.topic == topic]
        try:
            # One round trip: forget the records and append the migrations to the
            # recent-migrations log the API reads.
            if done:
                await self.store.outbox_done(
                    done, LogAppend("migrations:log", migrations, MIGRATION_LOG_MAXLEN)
                    if migrations else None)
        except StoreUnavailable:
            self.mark_dirty(pending)  # published, not forgotten: they go out again later
            raise
        self._mark_clean(parts, marks)
        if self.on_published is not None:
            for i in range(0, len(sent), OUTBOX_SLICE):
                if i:
                    await asyncio.sleep(0)
                self.on_published(sent[i:i + OUTBOX_SLICE])
        return len(sent)
