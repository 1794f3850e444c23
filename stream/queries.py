"""Read-side documents shared by the CLI (``--json``) and the HTTP API.

Each function reads Redis only; the shapes are the contract of DESIGN §6.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import orjson
import redis.asyncio as aioredis

from features import serial
from features.state import derive, iso
from features.store import RedisFeatureStore
from scorers.profile import Profile
from scorers.scoring import ACTION_HASH, SEGMENT_HASH, CustomerInput, evaluate
from stream.runtime import ScoringRuntime
from stream.settings import Settings


def migration_log_key(s: Settings) -> str:
    """The capped stream of recently published migrations (see ``flush_outbox``)."""
    return f"{s.redis_prefix}migrations:log"


async def customer_doc(s: Settings, r: aioredis.Redis, store: RedisFeatureStore,
                       runtime: ScoringRuntime | None, customer_id: str) -> dict[str, Any] | None:
    """``{"customer_id", "as_of", "features", "scores", "segments", "history"}`` or None."""
    found = await store.get_customer(customer_id, s.partitions)
    if found is None:
        return None
    p, blob = found
    now = await store.now()
    state = serial.decode(blob)
    profile = Profile.from_bytes(await store.get_profile(p, customer_id))
    if runtime is None:
        runtime = ScoringRuntime(s, r, store)
    await runtime.refresh()
    ctx = runtime.context(now)
    ctx.label_options = None  # a read must not look like an observation
    outcome = evaluate([CustomerInput(customer_id, state, profile)], ctx)[0]
    schemes = ctx.catalogue.schemes if ctx.catalogue is not None else profile.segments
    return {
        "customer_id": customer_id,
        "as_of": iso(now),
        "features": derive(state, now),
        "scores": outcome.scores,
        "segments": {k: v[0] for k, v in profile.segments.items() if k in schemes},
        "segments_since": {k: iso(v[1]) for k, v in profile.segments.items() if k in schemes},
        "history": [
            {"at": iso(h[0]), "scheme": h[1], "from_segment": h[2], "to_segment": h[3],
             "migration_id": h[4], "action_id": h[5] if len(h) > 5 else None}
            for h in profile.history
        ],
        "model_versions": ctx.model_versions(),
    }


async def segments_doc(s: Settings, r: aioredis.Redis, store: RedisFeatureStore,
                       only: Collection[str] | None = None) -> dict[str, Any]:
    """``{"as_of", "schemes": {scheme: {segment: count}}}`` summed over partitions, of
    the schemes in ``only`` when given (a scheme taken out of the catalogue keeps its
    customers' last segments, and counts, in case it comes back)."""
    tables = await store.read_tables(SEGMENT_HASH, range(s.partitions))
    schemes: dict[str, dict[str, int]] = {}
    for rows in tables.values():
        for fld, n in rows.items():
            scheme, _, segment = fld.partition("|")
            if only is not None and scheme not in only:
                continue
            bucket = schemes.setdefault(scheme, {})
            bucket[segment] = bucket.get(segment, 0) + n
    out = {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in sorted(schemes.items())}
    return {"as_of": iso(await store.now()), "schemes": out}


async def actions_doc(s: Settings, store: RedisFeatureStore) -> dict[str, Any]:
    """Conversion and lift per action and segment, for treated and hold-out arms."""
    from scorers.nba import lift_table

    tables = await store.read_tables(ACTION_HASH, range(s.partitions))
    merged: dict[str, int] = {}
    for rows in tables.values():
        for fld, n in rows.items():
            merged[fld] = merged.get(fld, 0) + n
    return {"as_of": iso(await store.now()), "actions": lift_table(merged)}


_U64 = (1 << 64) - 1


def check_cursor(since: str) -> str | None:
    """Why ``since`` is not a cursor of the migrations log (a Redis stream id, ``<ms>`` or
    ``<ms>-<seq>``, each part at most 2**64 - 1), or None when it is one.

    >>> check_cursor("1700000000000-3") is None, check_cursor("17") is None
    (True, True)
    >>> check_cursor("garbage")
    "since must be a cursor '<ms>-<seq>' as returned in 'next', got 'garbage'"
    >>> check_cursor("99999999999999999999-0")
    'since is out of range (each part at most 18446744073709551615)'
    >>> check_cursor("0" * 130 + "1")[:22]  # Redis refuses ids over 127 characters
    'since must be a cursor'
    """
    parts = since.split("-")
    if not 1 <= len(parts) <= 2 or not all(
            p.isascii() and p.isdigit() and len(p) <= 20 for p in parts):
        shown = since if len(since) <= 64 else since[:61] + "..."
        return f"since must be a cursor '<ms>-<seq>' as returned in 'next', got {shown!r}"
    if any(int(p) > _U64 for p in parts):
        return f"since is out of range (each part at most {_U64})"
    return None


async def migrations_doc(s: Settings, r: aioredis.Redis, since: str | None, limit: int
                         ) -> dict[str, Any]:
    """Recent migrations after the cursor ``since`` (oldest first) and the next cursor."""
    if since:
        problem = check_cursor(since)
        if problem is not None:
            raise ValueError(problem)
        ms, _, seq = since.partition("-")
        if int(ms) == _U64 and (not seq or int(seq) == _U64):
            return {"migrations": [], "next": since}  # nothing can come after the last id
        # ``<ms>`` alone is after every entry of that millisecond (Redis would read
        # ``(<ms>`` as ``(<ms>-0`` and return the rest of the millisecond)
        start = f"({since}" if seq else f"({ms}-{_U64}"
    else:
        start = "-"
    rows = await r.xrange(migration_log_key(s), min=start, max="+", count=max(1, limit))
    items, last = [], since
    for rid, fields in rows:
        last = rid.decode() if isinstance(rid, bytes) else rid
        raw = fields.get(b"m") or fields.get("m")
        if raw is not None:
            items.append(orjson.loads(raw))
    return {"migrations": items, "next": last}


async def all_customers(s: Settings, r: aioredis.Redis, store: RedisFeatureStore,
                        page: int = 1000) -> tuple[int, dict[str, dict[str, Any]]]:
    """Every customer's features, scores and segments at engine time (an export)."""
    runtime = ScoringRuntime(s, r, store)
    await runtime.refresh(force=True)
    now = await store.now()
    ctx = runtime.context(now)
    ctx.label_options = None
    out: dict[str, dict[str, Any]] = {}
    for p in range(s.partitions):
        cursor = 0
        while True:
            cursor, ids = await store.scan_customers(p, cursor, page)
            if ids:
                _, snaps = await store.load({p: ids}, [])
                snap = snaps[p]
                inputs = [CustomerInput(cid, serial.decode(blob),
                                        Profile.from_bytes(snap.profiles.get(cid)))
                          for cid, blob in snap.states.items() if blob is not None]
                for c, o in zip(inputs, evaluate(inputs, ctx), strict=True):
                    out[c.customer_id] = {
                        "features": o.features, "scores": o.scores,
                        "segments": {k: v[0] for k, v in c.profile.segments.items()},
                        "history": c.profile.history,
                    }
            if cursor == 0:
                break
    return now, out


async def models_doc(s: Settings, r: aioredis.Redis) -> dict[str, Any]:
    """Serving model versions, their prequential quality and the personas' centroids."""
    from stream.runtime import model_key, registry_keys, registry_versions

    versions = registry_versions(await r.hgetall(registry_keys(s.redis_prefix)["models"]))
    out: dict[str, Any] = {"models": {}, "personas": []}
    for name, version in sorted(versions.items()):
        blob = await r.get(model_key(s.redis_prefix, name))
        if blob is None:
            continue
        try:
            if name == "cluster":
                from scorers.personas import PersonaModel

                out["personas"] = PersonaModel.restore(blob).describe()
                out["models"][name] = {"version": version}
            else:
                from scorers.online import OnlineModel

                out["models"][name] = {**OnlineModel.restore(blob).quality(),
                                       "version": version}
        except Exception as exc:  # one unreadable snapshot: the others are still shown
            out["models"][name] = {"version": version,
                                   "error": f"snapshot unreadable ({type(exc).__name__})"}
    clv = await r.get(registry_keys(s.redis_prefix)["clv"])
    out["clv"] = orjson.loads(clv) if clv else None
    return out
