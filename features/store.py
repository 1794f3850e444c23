"""Redis feature store: customer states committed atomically with Kafka offset watermarks.

Layout (``P`` is the deployment's Redis prefix, ``n`` the input partition number)::

    P{pn}:meta        hash: ver, now, wm:<topic> (last applied offset per input topic),
                      hi:<topic> (newest accepted event time per input topic, for lateness)
    P{pn}:outbox      hash: id -> record still to publish (dead letters, migrations)
    P{pn}:c:<id>      string: the customer's encoded feature state
    P{pn}:s:<id>      string: the customer's scoring profile (segments, labels, actions)
    P{pn}:<table>     hash: per-partition counters merged across partitions by readers
                      (``rfm`` population sketch, ``seg`` segment sizes, ``nba`` actions)
    Pnow              string: engine time, the largest accepted event timestamp (ms)

Every key one commit touches carries the hash tag ``{pn}``, so each commit is a
single-slot Lua script that also works on Redis Cluster. Input topics are
co-partitioned by customer id, so a customer's keys always live with the
partition that owns them.

Commits are optimistic: the script applies only if the partition's ``ver`` is
still the one read at load time, which fences off a zombie owner after a
rebalance and a concurrent writer on the partition's other topic. A lost reply
(timeout) is handled by reloading: the watermark tells whether the write landed,
so every write is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

log = logging.getLogger(__name__)

_COMMIT = """
local ver = redis.call('HGET', KEYS[1], 'ver') or '0'
if ver ~= ARGV[1] then return 0 end
local head = ARGV[2]
local hl = string.len(head)
local i = 3
local nwm = tonumber(ARGV[i]); i = i + 1
for _ = 1, nwm do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  i = i + 2
end
local now = tonumber(redis.call('HGET', KEYS[1], 'now') or '-1')
if tonumber(ARGV[i]) > now then redis.call('HSET', KEYS[1], 'now', ARGV[i]) end
i = i + 1
-- Writes of many keys or fields go out as one command per chunk of 1,000 arguments (an
-- even number: pairs stay whole), not one call each.
local function chunked(cmd, key, list, first, last)
  for s = first, last, 1000 do
    local e = math.min(s + 999, last)
    if key then redis.call(cmd, key, unpack(list, s, e))
    else redis.call(cmd, unpack(list, s, e)) end
  end
end
local nout = tonumber(ARGV[i]); i = i + 1
chunked('HSET', KEYS[2], ARGV, i, i + 2 * nout - 1)
i = i + 2 * nout
local nset = tonumber(ARGV[i]); i = i + 1
local sets, added, gone = {}, {}, {}
for k = 4, 3 + nset do
  local key = KEYS[k]
  local is_customer = string.sub(key, 1, hl) == head
  if ARGV[i] == '' then
    redis.call('DEL', key)
    if is_customer then gone[#gone + 1] = string.sub(key, hl + 1) end
  else
    sets[#sets + 1] = key
    sets[#sets + 1] = ARGV[i]
    if is_customer then added[#added + 1] = string.sub(key, hl + 1) end
  end
  i = i + 1
end
chunked('MSET', nil, sets, 1, #sets)
chunked('SADD', KEYS[3], added, 1, #added)
chunked('SREM', KEYS[3], gone, 1, #gone)
for k = 4 + nset, #KEYS do
  local nf = tonumber(ARGV[i]); i = i + 1
  for _ = 1, nf do
    if redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1]) <= 0 then
      redis.call('HDEL', KEYS[k], ARGV[i])
    end
    i = i + 2
  end
end
redis.call('HINCRBY', KEYS[1], 'ver', 1)
return 1
"""

_MAX_SET = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]); return tonumber(ARGV[1]) end
return cur
"""

#: Appends ARGV[2..] to the stream KEYS[1], each as one entry ``m``, capped at about ARGV[1]
#: entries. One command for a whole batch of migrations: an XADD per entry cost the
#: worker about ten times the CPU per entry in redis-py's pipeline (building, packing and
#: reading back one command each). Sent with EVAL, not EVALSHA: the body is short, and a
#: server that restarted without its script cache needs nothing loaded again.
_LOG_APPEND = """
local key, maxlen = KEYS[1], ARGV[1]
for i = 2, #ARGV do
  redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'm', ARGV[i])
end
return #ARGV - 1
"""
#: Most entries one log-append script call adds (each call holds the server a few
#: milliseconds at most).
LOG_APPEND_CHUNK = 1000


#: Field of a partition's meta hash: the scoring inputs its last completed sweep used.
SWEPT_FIELD = "swept"


class StoreUnavailable(Exception):
    """Redis failed; the write may or may not have been applied (reload to find out)."""


#: The first part (up to a colon) of every deployment-wide key after the prefix; a
#: partition's keys start with its hash tag ``{pN}`` instead.
KEY_FAMILIES = frozenset({"now", "context", "models", "model", "clv", "rules", "learner",
                          "kept_lateness_ms", "kept_currency", "kept_partitions", "triggers",
                          "migrations"})


@dataclass(frozen=True, slots=True)
class Keys:
    """Names of every Redis key of one deployment."""

    prefix: str

    def meta(self, partition: int) -> str:
        return f"{self.prefix}{{p{partition}}}:meta"

    def outbox(self, partition: int) -> str:
        return f"{self.prefix}{{p{partition}}}:outbox"

    def customer(self, partition: int, customer_id: str) -> str:
        return f"{self.prefix}{{p{partition}}}:c:{customer_id}"

    def profile(self, partition: int, customer_id: str) -> str:
        return f"{self.prefix}{{p{partition}}}:s:{customer_id}"

    def table(self, partition: int, name: str) -> str:
        return f"{self.prefix}{{p{partition}}}:{name}"

    def ids(self, partition: int) -> str:
        """The set of the partition's customer ids (kept by the commit script)."""
        return f"{self.prefix}{{p{partition}}}:ids"

    def now(self) -> str:
        return f"{self.prefix}now"

    def context(self) -> str:
        return f"{self.prefix}context"

    def all_pattern(self) -> str:
        return f"{self.prefix}*"

    def owns(self, key: str | bytes) -> bool:
        """Whether ``key`` is one of this deployment's: under its prefix, and of a family
        the engine writes. Another deployment whose prefix merely starts with this one
        (``segstream:`` and ``segstream:eu:``) keeps its keys through a reset.

        >>> k = Keys("segstream:")
        >>> [k.owns(x) for x in (k.customer(3, "c1"), k.now(), "segstream:model:churn",
        ...                      "segstream:eu:now", "segstream:eu:{p0}:c:c1", "other:now")]
        [True, True, True, False, False, False]
        """
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        if not key.startswith(self.prefix):
            return False
        rest = key[len(self.prefix):]
        if rest.startswith("{p"):
            tag, sep, _ = rest.partition("}")
            return bool(sep) and tag[2:].isdigit()
        family, _, _ = rest.partition(":")
        return family in KEY_FAMILIES


@dataclass(slots=True)
class PartitionSnapshot:
    """What a batch needs of one partition: version, watermarks and customer states."""

    ver: int
    now_ms: int
    watermarks: dict[str, int]
    states: dict[str, bytes | None]
    high_ts: dict[str, int] = field(default_factory=dict)
    profiles: dict[str, bytes | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LogAppend:
    """Values to append to a capped, deployment-wide log (``name``, at most ``maxlen``)."""

    name: str
    values: Sequence[bytes]
    maxlen: int


@dataclass(slots=True)
class PartitionCommit:
    """New states of one partition's customers and the offsets they cover."""

    partition: int
    expected_ver: int
    watermarks: dict[str, int]
    now_ms: int
    states: dict[str, bytes] = field(default_factory=dict)
    outbox: dict[str, bytes] = field(default_factory=dict)
    high_ts: dict[str, int] = field(default_factory=dict)
    #: customer id -> new scoring profile
    profiles: dict[str, bytes] = field(default_factory=dict)
    #: table name -> field -> delta (HINCRBY; fields reaching zero are removed)
    increments: dict[str, dict[str, int]] = field(default_factory=dict)


class FeatureStore(Protocol):
    """What the stream layer needs of a state store."""

    async def load(
        self, wanted: Mapping[int, Iterable[str]], topics: Sequence[str]
    ) -> tuple[int, dict[int, PartitionSnapshot]]: ...

    async def commit(self, commits: Sequence[PartitionCommit]) -> dict[int, bool]: ...

    async def get_customer(
        self, customer_id: str, partitions: int
    ) -> tuple[int, bytes] | None: ...

    async def now(self) -> int: ...

    async def outbox_pending(self, partitions: Iterable[int]) -> dict[int, dict[str, bytes]]: ...

    async def outbox_done(self, done: Mapping[int, Iterable[str]],
                          log: LogAppend | None = None) -> None: ...

    async def append_log(self, name: str, values: Sequence[bytes], maxlen: int) -> None: ...

    async def set_context(self, digest: str) -> None: ...

    async def mark_swept(self, partition: int, digest: str) -> None: ...

    async def get_profile(self, partition: int, customer_id: str) -> bytes | None: ...

    async def read_tables(self, name: str, partitions: Iterable[int]
                          ) -> dict[int, dict[str, int]]: ...

    async def scan_customers(self, partition: int, cursor: int, count: int
                             ) -> tuple[int, list[str]]: ...


def _wm_field(topic: str) -> str:
    return f"wm:{topic}"


def _hi_field(topic: str) -> str:
    return f"hi:{topic}"


def _int(v: Any, default: int = -1) -> int:
    return default if v is None else int(v)


class RedisFeatureStore:
    """The Redis implementation of :class:`FeatureStore`, on one server or a Redis Cluster.

    On a cluster every command and Lua script it sends touches one hash slot: a
    partition's keys share the tag ``{pn}`` and deployment-wide keys are read or
    written one at a time. Pipelines are not transactions there (redis-py splits them
    per node), which is fine: each partition's commit is its own atomic script.
    """

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, prefix: str) -> None:
        self.r = client
        self.keys = Keys(prefix)
        self._commit_sha: str | None = None
        self._max_sha: str | None = None
        self.roundtrips = 0

    async def _script(self, pipe: Any, body: str, attr: str, keys: list[str],
                      args: list[Any]) -> None:
        sha = getattr(self, attr)
        if sha is None:
            sha = await self.r.script_load(body)
            self.roundtrips += 1
            setattr(self, attr, sha)
        # execute_command, not pipe.evalsha: redis-py blocks the EVALSHA and MGET methods
        # in cluster pipelines although single-slot calls are valid there.
        pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)

    async def load(
        self, wanted: Mapping[int, Iterable[str]], topics: Sequence[str]
    ) -> tuple[int, dict[int, PartitionSnapshot]]:
        """Read engine time and, per partition, meta and the named customers' states."""
        fields = ["ver", "now", *(_wm_field(t) for t in topics), *(_hi_field(t) for t in topics)]
        order: list[tuple[int, list[str]]] = []
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.get(self.keys.now())
                for p, cids in wanted.items():
                    ids = list(dict.fromkeys(cids))
                    order.append((p, ids))
                    pipe.hmget(self.keys.meta(p), fields)
                    if ids:
                        pipe.execute_command("MGET", *(self.keys.customer(p, c) for c in ids))
                        pipe.execute_command("MGET", *(self.keys.profile(p, c) for c in ids))
                res = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"redis load failed: {exc}") from None
        self.roundtrips += 1
        stored_now = now = _int(res[0])
        out: dict[int, PartitionSnapshot] = {}
        i = 1
        for p, ids in order:
            meta = res[i]
            i += 1
            states: dict[str, bytes | None] = {}
            profiles: dict[str, bytes | None] = {}
            if ids:
                states = dict(zip(ids, res[i], strict=True))
                profiles = dict(zip(ids, res[i + 1], strict=True))
                i += 2
            out[p] = PartitionSnapshot(
                ver=_int(meta[0], 0),
                now_ms=_int(meta[1]),
                watermarks={t: _int(v) for t, v in zip(topics, meta[2:], strict=False)},
                high_ts={t: _int(v) for t, v in zip(topics, meta[2 + len(topics):],
                                                     strict=True)},
                states=states,
                profiles=profiles,
            )
            now = max(now, out[p].now_ms)
        if now > stored_now:
            # A commit applied its partitions but not the engine time after them (an error
            # on that command: another cluster node, a full server): raise it now, or
            # sweeps would read an engine time behind the partitions' until newer input.
            await self._repair_now(now)
        return now, out

    async def _repair_now(self, now_ms: int) -> None:
        """Best effort: the next commit raises the engine time too, so a failure here is
        logged and the load goes on. Sent with EVAL: a server that lost its script cache
        (the likely reason the time is behind) needs nothing loaded."""
        try:
            await self.r.eval(_MAX_SET, 1, self.keys.now(), now_ms)
        except RedisError as exc:
            log.warning("raising the engine time to a partition's failed: %r", exc)
        self.roundtrips += 1

    async def commit(self, commits: Sequence[PartitionCommit]) -> dict[int, bool]:
        """Apply each partition's commit atomically; False where the version moved on."""
        if not commits:
            return {}
        top = max(c.now_ms for c in commits)
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for c in commits:
                    keys = [self.keys.meta(c.partition), self.keys.outbox(c.partition),
                            self.keys.ids(c.partition)]
                    args: list[Any] = [c.expected_ver, self.keys.customer(c.partition, ""),
                                       len(c.watermarks) + len(c.high_ts)]
                    for t, off in c.watermarks.items():
                        args += [_wm_field(t), off]
                    for t, ts in c.high_ts.items():
                        args += [_hi_field(t), ts]
                    args += [c.now_ms, len(c.outbox)]
                    for oid, rec in c.outbox.items():
                        args += [oid, rec]
                    args.append(len(c.states) + len(c.profiles))
                    for cid, blob in c.states.items():
                        keys.append(self.keys.customer(c.partition, cid))
                        args.append(blob)
                    for cid, blob in c.profiles.items():
                        keys.append(self.keys.profile(c.partition, cid))
                        args.append(blob)
                    for table, row in c.increments.items():
                        row = {k: v for k, v in row.items() if v}
                        if row:
                            keys.append(self.keys.table(c.partition, table))
                            args.append(len(row))
                            for fld, delta in row.items():
                                args += [fld, delta]
                    await self._script(pipe, _COMMIT, "_commit_sha", keys, args)
                await self._script(pipe, _MAX_SET, "_max_sha", [self.keys.now()], [top])
                res = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise StoreUnavailable(f"redis commit failed: {exc}") from None
        self.roundtrips += 1
        errors = [x for x in res if isinstance(x, Exception) and not isinstance(x, NoScriptError)]
        if errors:
            raise StoreUnavailable(f"redis commit failed: {errors[0]}")
        if any(isinstance(x, NoScriptError) for x in res):
            # A server (on a cluster, maybe one node) restarted without its script cache:
            # load the scripts again and report a conflict where the script did not run,
            # so the caller reloads and retries those partitions.
            self._commit_sha = self._max_sha = None
            if isinstance(res[-1], NoScriptError):
                await self._raise_now(top)  # a monotone max: safe to apply on its own
        return {c.partition: not isinstance(ok, Exception) and bool(ok)
                for c, ok in zip(commits, res, strict=False)}

    async def _raise_now(self, now_ms: int) -> None:
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                await self._script(pipe, _MAX_SET, "_max_sha", [self.keys.now()], [now_ms])
                await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"redis commit failed: {exc}") from None

    async def get_customer(self, customer_id: str, partitions: int) -> tuple[int, bytes] | None:
        """Find a customer's state in whichever partition holds it."""
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for p in range(partitions):
                    pipe.get(self.keys.customer(p, customer_id))
                res = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"redis read failed: {exc}") from None
        for p, blob in enumerate(res):
            if blob is not None:
                return p, blob
        return None

    async def get_profile(self, partition: int, customer_id: str) -> bytes | None:
        """A customer's scoring profile."""
        try:
            return await self.r.get(self.keys.profile(partition, customer_id))  # type: ignore[return-value]
        except RedisError as exc:
            raise StoreUnavailable(f"redis read failed: {exc}") from None

    async def read_tables(self, name: str, partitions: Iterable[int]) -> dict[int, dict[str, int]]:
        """A per-partition counter table (see :class:`PartitionCommit`) of each partition."""
        parts = list(partitions)
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for p in parts:
                    pipe.hgetall(self.keys.table(p, name))
                res = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"redis read failed: {exc}") from None
        self.roundtrips += 1
        return {
            p: {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in rows.items()}
            for p, rows in zip(parts, res, strict=True)
        }

    async def scan_customers(self, partition: int, cursor: int, count: int
                             ) -> tuple[int, list[str]]:
        """One step over a partition's customers: (next cursor, customer ids).

        It walks the partition's id set (SSCAN), so a step costs the same however many
        other keys the server holds.
        """
        try:
            nxt, ids = await self.r.sscan(self.keys.ids(partition), cursor, count=count)
        except RedisError as exc:
            raise StoreUnavailable(f"redis read failed: {exc}") from None
        self.roundtrips += 1
        return int(nxt), [i.decode() if isinstance(i, bytes) else i for i in ids]

    async def set_context(self, digest: str) -> None:
        """Record the scoring inputs workers currently see (for ``segstream wait``)."""
        try:
            await self.r.set(self.keys.context(), digest)
        except RedisError as exc:
            raise StoreUnavailable(f"redis write failed: {exc}") from None

    async def mark_swept(self, partition: int, digest: str) -> None:
        """Record that a sweep of the partition finished with these scoring inputs."""
        try:
            await self.r.hset(self.keys.meta(partition), SWEPT_FIELD, digest)
        except RedisError as exc:
            raise StoreUnavailable(f"redis write failed: {exc}") from None

    async def append_log(self, name: str, values: Sequence[bytes], maxlen: int) -> None:
        """Append to a capped, deployment-wide Redis stream (a read-side convenience)."""
        if not values:
            return
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                self._queue_log(pipe, LogAppend(name, values, maxlen))
                await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"redis write failed: {exc}") from None
        self.roundtrips += 1

    def _queue_log(self, pipe: Any, log: LogAppend) -> None:
        # Entries the cap would trim at once are not written: the newest ``maxlen`` stay.
        values = log.values[-log.maxlen:] if log.maxlen > 0 else ()
        key = f"{self.keys.prefix}{log.name}"
        for i in range(0, len(values), LOG_APPEND_CHUNK):
            pipe.execute_command("EVAL", _LOG_APPEND, 1, key, log.maxlen,
                                 *values[i:i + LOG_APPEND_CHUNK])

    async def outbox_pending(self, partitions: Iterable[int]) -> dict[int, dict[str, bytes]]:
        """Records committed to the outbox of these partitions and not yet published."""
        parts = list(partitions)
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for p in parts:
                    pipe.hgetall(self.keys.outbox(p))
                res = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"redis read failed: {exc}") from None
        self.roundtrips += 1
        return {
            p: {(k.decode() if isinstance(k, bytes) else k): v for k, v in rows.items()}
            for p, rows in zip(parts, res, strict=True)
            if rows
        }

    async def outbox_done(self, done: Mapping[int, Iterable[str]],
                          log: LogAppend | None = None) -> None:
        """Forget outbox records once Kafka acknowledged them; in the same round trip,
        append ``log`` (see :meth:`append_log`)."""
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for p, ids in done.items():
                    ids = list(ids)
                    if ids:
                        pipe.hdel(self.keys.outbox(p), *ids)
                if log is not None:
                    self._queue_log(pipe, log)
                await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"redis write failed: {exc}") from None
        self.roundtrips += 1

    async def now(self) -> int:
        """Engine time in epoch milliseconds (-1 before the first event)."""
        try:
            return _int(await self.r.get(self.keys.now()))
        except RedisError as exc:
            raise StoreUnavailable(f"redis read failed: {exc}") from None

    async def watermarks(
        self, partitions: int, topics: Sequence[str]
    ) -> dict[tuple[str, int], int]:
        """Last applied offset of every (topic, partition)."""
        fields = [_wm_field(t) for t in topics]
        async with self.r.pipeline(transaction=False) as pipe:
            for p in range(partitions):
                pipe.hmget(self.keys.meta(p), fields)
            res = await pipe.execute()
        return {
            (t, p): _int(v) for p, row in enumerate(res) for t, v in zip(topics, row, strict=True)
        }

    async def iter_customers(self, partitions: int, count: int = 1000) -> Any:
        """Yield ``(partition, customer_id, state bytes)`` for every stored customer."""
        for p in range(partitions):
            cursor = 0
            while True:
                cursor, ids = await self.scan_customers(p, cursor, count)
                if ids:
                    keys = [self.keys.customer(p, cid) for cid in ids]
                    # One partition: one hash slot, so one MGET even on a cluster.
                    values = await self.r.execute_command("MGET", *keys)
                    for cid, v in zip(ids, values, strict=True):
                        if v is not None:
                            yield p, cid, v
                if cursor == 0:
                    break


class MemoryFeatureStore:
    """An in-memory twin of :class:`RedisFeatureStore` for fast unit tests."""

    def __init__(self) -> None:
        self.meta: dict[int, dict[str, int]] = {}
        self.customers: dict[tuple[int, str], bytes] = {}
        self.outboxes: dict[int, dict[str, bytes]] = {}
        self.profiles: dict[tuple[int, str], bytes] = {}
        self.tables: dict[tuple[int, str], dict[str, int]] = {}
        self.logs: dict[str, list[bytes]] = {}
        self.context = ""
        self.swept: dict[int, str] = {}
        self.global_now = -1
        self.roundtrips = 0
        self.fail_next_commit_after_apply = False

    async def load(
        self, wanted: Mapping[int, Iterable[str]], topics: Sequence[str]
    ) -> tuple[int, dict[int, PartitionSnapshot]]:
        self.roundtrips += 1
        out = {}
        now = self.global_now
        for p, cids in wanted.items():
            m = self.meta.get(p, {})
            out[p] = PartitionSnapshot(
                ver=m.get("ver", 0),
                now_ms=m.get("now", -1),
                watermarks={t: m.get(_wm_field(t), -1) for t in topics},
                high_ts={t: m.get(_hi_field(t), -1) for t in topics},
                states={c: self.customers.get((p, c)) for c in cids},
                profiles={c: self.profiles.get((p, c)) for c in cids},
            )
            now = max(now, out[p].now_ms)
        self.global_now = now  # as RedisFeatureStore.load repairs a lagging engine time
        return now, out

    async def commit(self, commits: Sequence[PartitionCommit]) -> dict[int, bool]:
        self.roundtrips += 1
        result = {}
        for c in commits:
            m = self.meta.setdefault(c.partition, {})
            if m.get("ver", 0) != c.expected_ver:
                result[c.partition] = False
                continue
            for t, off in c.watermarks.items():
                m[_wm_field(t)] = max(m.get(_wm_field(t), -1), off)
            for t, ts in c.high_ts.items():
                m[_hi_field(t)] = max(m.get(_hi_field(t), -1), ts)
            m["now"] = max(m.get("now", -1), c.now_ms)
            for cid, blob in c.states.items():
                self.customers[(c.partition, cid)] = blob
            for cid, blob in c.profiles.items():
                self.profiles[(c.partition, cid)] = blob
            for table, row in c.increments.items():
                h = self.tables.setdefault((c.partition, table), {})
                for fld, delta in row.items():
                    h[fld] = h.get(fld, 0) + delta
                    if h[fld] <= 0:
                        del h[fld]
            self.outboxes.setdefault(c.partition, {}).update(c.outbox)
            m["ver"] = m.get("ver", 0) + 1
            result[c.partition] = True
        if commits:
            self.global_now = max(self.global_now, max(c.now_ms for c in commits))
        if self.fail_next_commit_after_apply:
            self.fail_next_commit_after_apply = False
            raise StoreUnavailable("simulated timeout after the write was applied")
        return result

    async def get_customer(self, customer_id: str, partitions: int) -> tuple[int, bytes] | None:
        for p in range(partitions):
            blob = self.customers.get((p, customer_id))
            if blob is not None:
                return p, blob
        return None

    async def now(self) -> int:
        return self.global_now

    async def get_profile(self, partition: int, customer_id: str) -> bytes | None:
        return self.profiles.get((partition, customer_id))

    async def set_context(self, digest: str) -> None:
        self.context = digest

    async def mark_swept(self, partition: int, digest: str) -> None:
        self.swept[partition] = digest

    async def append_log(self, name: str, values: Sequence[bytes], maxlen: int) -> None:
        log = self.logs.setdefault(name, [])
        log.extend(values)
        del log[:-maxlen]

    async def read_tables(self, name: str, partitions: Iterable[int]) -> dict[int, dict[str, int]]:
        return {p: dict(self.tables.get((p, name), {})) for p in partitions}

    async def scan_customers(self, partition: int, cursor: int, count: int
                             ) -> tuple[int, list[str]]:
        ids = sorted(c for p, c in self.customers if p == partition)
        page = ids[cursor:cursor + count]
        nxt = cursor + count
        return (0 if nxt >= len(ids) else nxt), page

    async def outbox_pending(self, partitions: Iterable[int]) -> dict[int, dict[str, bytes]]:
        return {p: dict(self.outboxes[p]) for p in partitions if self.outboxes.get(p)}

    async def outbox_done(self, done: Mapping[int, Iterable[str]],
                          log: LogAppend | None = None) -> None:
        for p, ids in done.items():
            for i in ids:
                self.outboxes.get(p, {}).pop(i, None)
        if log is not None:
            await self.append_log(log.name, log.values, log.maxlen)

