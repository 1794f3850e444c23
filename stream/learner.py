"""The learner: trains the online models from labelled examples and publishes snapshots.

Workers resolve delayed labels and publish labelled examples to the
``segmentation-examples`` topic (one partition, so one learner sees them all, in
order). The learner scores each example before learning from it (prequential
evaluation), and every few seconds writes a versioned snapshot of each model to
Redis; every worker polls the versions and hot-reloads newer snapshots. A
restarted learner resumes from the newest snapshot, so a restarted worker scores
with the version it had before.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from features import serial
from features.state import derive
from features.store import RedisFeatureStore
from scorers.labels import MODELS, Example
from scorers.online import OnlineModel
from stream.errors import SegstreamError
from stream.redisconn import mget_any
from stream.runtime import model_key, registry_keys, restore_model
from stream.settings import Settings

log = logging.getLogger(__name__)

#: The learner counts as caught up after this long without a new example.
LEARNER_IDLE_S = 3.0
#: Seconds between training checkpoints (a promotion always writes one).
CHECKPOINT_S = 30.0
#: Customers the persona model reads per learner tick.
PERSONA_PAGE = 1000
#: Examples learned between two turns of the event loop: the learner shares the worker's
#: loop with the ingest agent, and 1,000 examples at once held it for 50-90 ms.
LEARN_CHUNK = 100


def checkpoint_key(prefix: str, name: str) -> str:
    """The learner's newest training state of a model (not yet the serving version)."""
    return f"{prefix}model:{name}:checkpoint"


def _other_release(blob: bytes) -> str | None:
    """The format a snapshot names when it is a segstream snapshot of another format.

    >>> import pickle
    >>> _other_release(pickle.dumps({"format": "segstream.online/99", "state": {}}))
    'segstream.online/99'
    >>> _other_release(b"garbage") is None
    True
    """
    try:
        doc = pickle.loads(blob)  # our own registry's bytes only
    except Exception:
        return None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    return fmt if isinstance(fmt, str) and fmt.startswith("segstream.") else None


class Learner:
    """Holds the models being trained on this worker."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.r = redis
        self.keys = registry_keys(settings.redis_prefix)
        self.models: dict[str, OnlineModel] = {m: OnlineModel(m) for m in MODELS}
        self.personas: Any | None = None
        self.dirty: set[str] = set()
        self.unpromoted: set[str] = set()
        self.unsaved: set[str] = set()
        self.persona_cursor = (0, 0)
        #: newest example offset learned (-1: none yet)
        self.offset = -1
        self._learned_at_page = 0
        self.learned = 0
        self.last_learn = 0.0
        self.last_promote = time.monotonic()
        self.last_checkpoint = time.monotonic()

    async def load(self) -> None:
        """Resume every model from its newest checkpoint (or serving snapshot) in Redis."""
        names = [*self.models, "cluster"]
        prefix = self.settings.redis_prefix
        blobs = await mget_any(self.r, [*(checkpoint_key(prefix, n) for n in names),
                                        *(model_key(prefix, n) for n in names)])
        for i, name in enumerate(names):
            candidates = [(checkpoint_key(prefix, name), blobs[i]),
                          (model_key(prefix, name), blobs[i + len(names)])]
            for at, (key, blob) in enumerate(candidates):
                if blob is None:
                    continue
                try:
                    model = restore_model(name, blob)
                except Exception as exc:
                    written_by = _other_release(blob)
                    if written_by is not None:
                        # A newer release's model: a fresh one would be promoted over it.
                        raise SegstreamError(
                            f"model {name} at {key} is in format {written_by!r}, which this "
                            "release does not read; run the release that wrote it, or "
                            "delete the key to train the model afresh") from None
                    # A corrupt blob no restart can read is not an outage to wait out: the
                    # next copy, else a fresh model.
                    then = ("trying the serving snapshot" if at == 0 and candidates[1][1]
                            else "starting it afresh")
                    log.error("learner: model %s at %s cannot be read (%s); %s", name, key,
                              type(exc).__name__, then)
                    continue
                if name == "cluster":
                    self.personas = model
                else:
                    self.models[name] = model
                log.info("learner resumed model %s", name)
                break
        if self.personas is None:
            try:
                from scorers.personas import PersonaModel
            except ImportError:  # pragma: no cover - clustering not installed
                return
            self.personas = PersonaModel()

    def learn(self, records: Sequence[tuple[int, bytes | None]]) -> None:
        """Learn from a batch of ``(offset, example bytes)``; undecodable ones are skipped."""
        for offset, raw in records:
            self.offset = max(self.offset, offset)
            if raw is None:
                continue
            try:
                ex = Example.from_bytes(raw)
            except Exception:
                log.warning("skipping an undecodable example at offset %d", offset)
                continue
            model = self.models.get(ex.model)
            if model is None:
                continue
            before = model.examples
            model.learn(ex)
            model.position = offset
            if model.examples == before:
                continue  # a redelivered example the model already learned
            self.dirty.add(ex.model)
            self.learned += 1
            self.last_learn = time.monotonic()

    async def learn_chunked(self, records: Sequence[tuple[int, bytes | None]],
                            chunk: int = LEARN_CHUNK) -> None:
        """:meth:`learn`, giving the event loop a turn after every ``chunk`` examples."""
        for i in range(0, len(records), chunk):
            self.learn(records[i:i + chunk])
            await asyncio.sleep(0)

    async def learn_personas(self, store: RedisFeatureStore) -> int:
        """Feed the persona model the next page of customers (a rolling scan of the state).

        Clustering needs no labels, so it learns from the customer population itself:
        every call reads the next :data:`PERSONA_PAGE` customers, going round all
        partitions, so over time every customer is seen equally often.
        """
        if self.personas is None or self.learned == self._learned_at_page:
            return 0  # nothing changed since the last page: keep the model (and version)
        self._learned_at_page = self.learned
        now = await store.now()
        if now < 0:
            return 0
        part, cursor = self.persona_cursor
        nxt, ids = await store.scan_customers(part, cursor, PERSONA_PAGE)
        self.persona_cursor = (part, nxt) if nxt else ((part + 1) % self.settings.partitions, 0)
        if not ids:
            return 0
        blobs = await store.r.mget([store.keys.customer(part, c) for c in ids])
        rows: list[dict[str, Any]] = []
        for i in range(0, len(blobs), LEARN_CHUNK):
            rows.extend(derive(serial.decode(b), now) for b in blobs[i:i + LEARN_CHUNK]
                        if b is not None)
            await asyncio.sleep(0)  # the ingest agent shares this loop
        if rows:
            self.personas.learn_many(rows)
            self.dirty.add("cluster")
        return len(rows)

    async def publish(self) -> dict[str, int]:
        """Checkpoint what learned since the last call; promote a new serving version when due.

        Checkpoints (every ``CHECKPOINT_S``) make the learner survive restarts. A promotion
        changes what every worker scores with, and so makes the sweeps re-evaluate every
        customer: it
        happens when the learner has caught up with its input (idle for a moment) or every
        ``model_promote_s`` while examples keep coming.
        """
        prefix = self.settings.redis_prefix
        now = time.monotonic()
        self.unpromoted |= self.dirty
        self.unsaved |= self.dirty
        self.dirty.clear()
        if self.unsaved and now - self.last_checkpoint >= CHECKPOINT_S:
            # A snapshot carries the recent example ids too; not worth writing every tick.
            for name in sorted(self.unsaved):
                model = self._model(name)
                if model is not None:
                    await self.r.set(checkpoint_key(prefix, name), model.snapshot())
            self.unsaved.clear()
            self.last_checkpoint = now
        idle = now - self.last_learn >= LEARNER_IDLE_S
        if not self.unpromoted or not (
                idle or now - self.last_promote >= self.settings.model_promote_s):
            await self._report()
            return {}
        out: dict[str, int] = {}
        for name in sorted(self.unpromoted):
            model = self._model(name)
            if model is None:
                continue
            if name == "cluster":
                model.publish()  # relabels by matching the previous centroids
            version = int(await self.r.hincrby(self.keys["model_seq"], name, 1))
            model.version = version
            blob = model.snapshot()
            # Workers load the serving snapshot while they process input: it leaves out
            # what only learning needs (the checkpoint keeps it).
            serving = model.snapshot(serving=True) if name != "cluster" else blob
            # The snapshot before the version that points at it, so a reader never sees a
            # version without its model. (No MULTI: these keys span slots on a cluster.)
            await self.r.set(model_key(prefix, name), serving)
            await self.r.set(checkpoint_key(prefix, name), blob)
            await self.r.hset(self.keys["models"], name, version)
            out[name] = version
            self.unsaved.discard(name)
        self.unpromoted.clear()
        self.last_promote = now
        await self._report()
        return out

    async def _report(self) -> None:
        """Where the learner is, for ``segstream wait``: newest example learned, work left."""
        await self.r.hset(self.keys["learner"], mapping={
            "offset": self.offset, "unpromoted": len(self.unpromoted) + len(self.dirty)})

    def _model(self, name: str) -> Any:
        return self.personas if name == "cluster" else self.models.get(name)

    def quality(self) -> dict[str, dict[str, Any]]:
        return {name: m.quality() for name, m in self.models.items()}
