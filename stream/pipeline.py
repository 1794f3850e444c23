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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import msgpack
import orjson

from features import serial
from features.events import Event
from features.state import apply_many, empty
from features.store import FeatureStore, PartitionCommit, StoreUnavailable
from stream.schemas import Rejection, decode
from stream.settings import Settings

log = logging.getLogger(__name__)

MAX_COMMIT_ATTEMPTS = 50


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One Kafka record as consumed, before any decoding."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Publisher(Protocol):
    """Sends records to Kafka and returns once the broker acknowledged all of them."""

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None: ...


@dataclass(slots=True)
class BatchStats:
    """What one micro-batch did, for metrics and tests."""

    records: int = 0
    applied: int = 0
    skipped_below_watermark: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    conflicts: int = 0
    store_retries: int = 0

    def dead(self, reason: str) -> None:
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1


def wall_iso(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def encode_outbox(topic: str, key: bytes | None, value: bytes) -> bytes:
    return msgpack.packb([topic, key, value], use_bin_type=True)  # type: ignore[no-any-return]


def decode_outbox(blob: bytes) -> tuple[str, bytes | None, bytes]:
    topic, key, value = msgpack.unpackb(blob, raw=False)
    return topic, key, value


class BatchProcessor:
    """Applies micro-batches of raw input records to the feature store, effectively once."""

    def __init__(
        self,
        settings: Settings,
        store: FeatureStore,
        publisher: Publisher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.clock = clock
        self.kinds = {
            settings.clickstream_topic: "clickstream",
            settings.transactions_topic: "transactions",
        }
        self.topics = list(settings.input_topics)

    def dead_letter(self, rec: RawRecord, rejection: Rejection) -> bytes:
        """The DLQ record of a rejected input, as the bytes to publish."""
        limit = self.settings.dlq_payload_bytes
        raw = rec.value or b""
        cut = raw[:limit]
        try:
            payload, encoding = cut.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(cut).decode("ascii"), "base64"
        key = None
        if rec.key is not None:
            key = rec.key[:512].decode("utf-8", errors="replace")
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
            "at": wall_iso(self.clock()),
        })

    def _decode_all(self, records: Sequence[RawRecord]) -> dict[int, list[tuple[RawRecord,
                                                                         Event | Rejection]]]:
        horizon = int(self.clock() * 1000) + self.settings.future_skew_ms
        by_part: dict[int, list[tuple[RawRecord, Event | Rejection]]] = {}
        for rec in records:
            kind = self.kinds.get(rec.topic)
            res: Event | Rejection
            if kind is None:
                res = Rejection("unknown_topic", f"not an input topic: {rec.topic}")
            else:
                res = decode(kind, rec.key, rec.value, self.settings.max_event_bytes)
                if not isinstance(res, Rejection) and res.ts_ms > horizon:
                    res = Rejection("from_future", "timestamp is more than "
                                    f"{self.settings.max_future_skew_s:g}s ahead of wall clock")
            by_part.setdefault(rec.partition, []).append((rec, res))
        return by_part

    async def process(self, records: Sequence[RawRecord]) -> BatchStats:
        """Apply a batch; returns once its state is committed and its outbox published."""
        stats = BatchStats(records=len(records))
        pending = self._decode_all(records)
        attempts = 0
        while pending:
            attempts += 1
            if attempts > MAX_COMMIT_ATTEMPTS:
                raise StoreUnavailable("gave up after repeated commit conflicts")
            try:
                done = await self._attempt(pending, stats)
            except StoreUnavailable as exc:
                stats.store_retries += 1
                delay = min(5.0, 0.05 * 2 ** min(stats.store_retries, 7))
                log.warning("state store unavailable (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            for p in done:
                pending.pop(p, None)
            if pending:
                stats.conflicts += 1
        return stats

    async def _attempt(self, pending: dict[int, list[tuple[RawRecord, Event | Rejection]]],
                       stats: BatchStats) -> list[int]:
        wanted = {
            p: [r.customer_id for _, r in items if not isinstance(r, Rejection)]
            for p, items in pending.items()
        }
        now, snaps = await self.store.load(wanted, self.topics)
        lateness = self.settings.lateness_ms
        commits: list[PartitionCommit] = []
        local = BatchStats()
        for p, items in pending.items():
            snap = snaps[p]
            wm_new: dict[str, int] = {}
            outbox: dict[str, bytes] = {}
            per_customer: dict[str, list[tuple[RawRecord, Event]]] = {}
            part_now = snap.now_ms
            high = dict(snap.high_ts)
            for rec, res in items:
                if rec.offset <= snap.watermarks.get(rec.topic, -1):
                    local.skipped_below_watermark += 1
                    continue
                if rec.offset > wm_new.get(rec.topic, -1):
                    wm_new[rec.topic] = rec.offset
                hi = high.get(rec.topic, -1)
                if not isinstance(res, Rejection) and hi >= 0 and res.ts_ms < hi - lateness:
                    res = Rejection("too_late", "timestamp is more than "
                                    f"{self.settings.allowed_lateness_days:g} days behind the "
                                    "newest event of its topic-partition")
                if isinstance(res, Rejection):
                    outbox[f"dlq:{rec.topic}:{rec.offset}"] = encode_outbox(
                        self.settings.dlq_topic, rec.key, self.dead_letter(rec, res))
                    local.dead(res.reason)
                    continue
                now = max(now, res.ts_ms)
                part_now = max(part_now, res.ts_ms)
                if res.ts_ms > hi:
                    high[rec.topic] = res.ts_ms
                per_customer.setdefault(res.customer_id, []).append((rec, res))
            states: dict[str, bytes] = {}
            for cid, pairs in per_customer.items():
                try:
                    blob = snap.states.get(cid)
                    state = serial.decode(blob) if blob else empty()
                    states[cid] = serial.encode(
                        apply_many(state, [e for _, e in pairs], lateness))
                    local.applied += len(pairs)
                except Exception as exc:  # a poison customer must not stall the partition
                    log.exception("processing failed for a customer; events dead-lettered")
                    for rec, _ in pairs:
                        outbox[f"dlq:{rec.topic}:{rec.offset}"] = encode_outbox(
                            self.settings.dlq_topic, rec.key,
                            self.dead_letter(rec, Rejection("processing_error", repr(exc))))
                        local.dead("processing_error")
            if wm_new:
                commits.append(PartitionCommit(p, snap.ver, wm_new, part_now, states, outbox,
                                               high))
        ok = await self.store.commit(commits)
        done = [p for p in pending if ok.get(p, True)]
        stats.applied += local.applied
        stats.skipped_below_watermark += local.skipped_below_watermark
        for reason, n in local.dead_letters.items():
            if any(ok.get(c.partition) for c in commits):
                stats.dead_letters[reason] = stats.dead_letters.get(reason, 0) + n
        await self.flush_outbox([c.partition for c in commits if ok.get(c.partition)],
                                {c.partition: c.outbox for c in commits})
        return done

    async def flush_outbox(self, partitions: Sequence[int],
                           known: dict[int, dict[str, bytes]] | None = None) -> int:
        """Publish committed outbox records of these partitions, then forget them."""
        if known is not None:
            pending = {p: known[p] for p in partitions if known.get(p)}
        else:
            pending = await self.store.outbox_pending(partitions)
        if not pending:
            return 0
        records = [decode_outbox(b) for rows in pending.values() for b in rows.values()]
        try:
            await self.publisher.publish(records)
        except Exception as exc:
            # Left in the outbox; the periodic flush publishes them later.
            log.warning("publishing %d outbox records failed: %r", len(records), exc)
            return 0
        await self.store.outbox_done({p: list(rows) for p, rows in pending.items()})
        return len(records)
