"""Erase one customer everywhere the engine keeps data (``segstream forget ID``).

The customer's feature state and profile are deleted, and their contributions to
the shared counters (RFM population sketch, segment sizes) are removed, in one
fenced commit on the customer's partition, so a worker processing the partition at
the same moment cannot resurrect or double-remove them. Pending outbox records of
the customer (migrations, dead letters, learner examples) and their entries in the
recent-migrations log are dropped, and a tombstone keyed by the customer is published on
the migrations topic so that downstream consumers (and compacted topics) forget them too.
Action conversion counters are aggregates without identities and are kept. Running it
again finishes an erase that failed part-way (the outbox of every partition is searched
when no state is left).

Events of the customer still in the input topics are not removed from Kafka (topic
retention governs them); replaying them would recreate the customer. A worker's outbox
publish already under way when the customer is forgotten can still deliver (and log)
the records it read before: forget a customer while their partition is quiet, or run it
again once that publish has ended to drop what it logged.

Records already published stay on the engine's own topics until their retention removes
them: the customer's dead letters (keyed by the customer) and learner examples (named by
the pseudonym). The reference trigger consumer (``segstream triggers``) posts none of the customer's
migrations emitted before the erase, even one it reads later (a consumer behind, a
replay of the topic): the erase time is kept for it for 90 days, under the customer's
pseudonym.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from features.store import PartitionCommit, RedisFeatureStore
from scorers import rfm
from scorers.labels import customer_hash
from scorers.profile import Profile
from scorers.scoring import RFM_HASH, SEGMENT_HASH
from stream.pipeline import unpack_outbox
from stream.queries import migration_log_key
from stream.settings import Settings


async def forget(s: Settings, r: aioredis.Redis, store: RedisFeatureStore,
                 customer_id: str) -> dict[str, Any]:
    """Erase the customer; returns what was removed."""
    found = await store.get_customer(customer_id, s.partitions)
    removed: dict[str, Any] = {"customer_id": customer_id, "found": found is not None,
                               "outbox_records": 0, "log_entries": 0}
    if found is not None:
        part = found[0]
        for _ in range(50):
            _, snaps = await store.load({part: [customer_id]}, [])
            snap = snaps[part]
            profile = Profile.from_bytes(snap.profiles.get(customer_id))
            commit = PartitionCommit(part, snap.ver, {}, snap.now_ms,
                                     states={customer_id: b""}, profiles={customer_id: b""})
            sketch = rfm.deltas(profile.rfm, None)
            if sketch:
                commit.increments[RFM_HASH] = sketch
            if profile.segments:
                commit.increments[SEGMENT_HASH] = {
                    f"{scheme}|{seg}": -1 for scheme, (seg, _) in profile.segments.items()}
            if (await store.commit([commit])).get(part):
                removed["segments"] = {k: v[0] for k, v in profile.segments.items()}
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("partition kept changing; try again")
    # Also when no state was found: a run that erased the state but failed before this
    # point (a timeout, a kill) is finished by running it again. Without the state the
    # partition is unknown, so every partition's outbox is looked at.
    parts = [found[0]] if found is not None else list(range(s.partitions))
    removed["outbox_records"] = await _drop_outbox(s, store, parts, customer_id)
    removed["log_entries"] = await _drop_log(s, r, customer_id)
    # The trigger consumers post none of the customer's migrations emitted until now
    # (one behind still reads them), named by the pseudonym, not the id.
    from stream.triggers import FORGOTTEN_TTL_S, forgotten_key

    await r.set(forgotten_key(s, customer_hash(customer_id)), str(int(time.time() * 1000)),
                ex=FORGOTTEN_TTL_S)
    return removed


def _is_mine(s: Settings, blob: bytes, key: bytes, pseudonym: str) -> bool:
    """Whether an outbox record is the customer's: keyed by them (migrations, dead letters)
    or a learner example of theirs (keyed by nothing, named by the id's pseudonym)."""
    rec = unpack_outbox(blob)
    if rec.key == key:
        return True
    if rec.topic != s.examples_topic or rec.value is None:
        return False
    try:
        return bool(orjson.loads(rec.value).get("customer_hash") == pseudonym)
    except (orjson.JSONDecodeError, AttributeError):
        return False


async def _drop_outbox(s: Settings, store: RedisFeatureStore, parts: list[int],
                       customer_id: str) -> int:
    pending = await store.outbox_pending(parts)
    key, pseudonym = customer_id.encode(), customer_hash(customer_id)
    mine = {p: [oid for oid, blob in records.items() if _is_mine(s, blob, key, pseudonym)]
            for p, records in pending.items()}
    mine = {p: ids for p, ids in mine.items() if ids}
    if mine:
        await store.outbox_done(mine)
    return sum(len(ids) for ids in mine.values())


async def _drop_log(s: Settings, r: aioredis.Redis, customer_id: str) -> int:
    gone = 0
    last = "-"
    while True:
        rows = await r.xrange(migration_log_key(s), min=last, max="+", count=1000)
        if not rows:
            break
        ids = [rid for rid, fields in rows
               if orjson.loads(fields.get(b"m") or fields.get("m") or b"{}").get("customer_id")
               == customer_id]
        if ids:
            gone += int(await r.xdel(migration_log_key(s), *ids))
        last_id = rows[-1][0]
        last = "(" + (last_id.decode() if isinstance(last_id, bytes) else last_id)
        if len(rows) < 1000:
            break
    return gone


def publish_tombstone(s: Settings, customer_id: str) -> None:
    """A null value keyed by the customer on the migrations topic."""
    from stream.kafka import producer

    p = producer(s)
    try:
        p.send(s.migrations_topic, key=customer_id.encode(), value=None)
        p.flush()
    finally:
        p.close()
