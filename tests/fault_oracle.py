"""Judging a deployment's end state after injected faults, against the input events alone.

The fault-injection tests produce a known list of input events, hurt the engine while it
works (kill, stall, restart its services, redeliver), let it finish and then call
:func:`judge`. Nothing here trusts the engine's own arithmetic:

* features: every stored customer's features equal the pandas oracle
  (:mod:`feature_oracle`) recomputed from the distinct input events, at the newest event
  time of the input; the set of customers is exactly the set in the input;
* migrations: the records on the migrations topic validate against the schema, are keyed
  by their customer, and deduplicated by ``migration_id`` form, for every customer and
  scheme, an unbroken chain in topic order from ``null`` to the customer's current
  segment; no migration belongs to a customer outside the input; every migration the
  customer's profile remembers was delivered;
* counters: the per-partition segment-size and RFM-sketch tables equal the counts
  recomputed from the stored profiles (a double-applied commit would leave them off);
* the dead-letter topic holds only what the test expects there.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from feature_oracle import assert_features_equal, oracle

from features.events import ClickEvent, Event, TransactionEvent

#: Synthetic customers average about 11.5 events over 60 days; this many customers per
#: event leaves enough events to cut the time-ordered stream at the wanted count.
EVENTS_PER_CUSTOMER = 11
SYNTHETIC_DAYS = 60

Input = tuple[str, dict[str, Any]]


def synthetic_input(events: int, seed: int, customers: int | None = None) -> list[Input]:
    """The first ``events`` synthetic events (time order) as ``(topic, event)`` pairs."""
    from stream import synthetic

    n_customers = customers or max(1, events // EVENTS_PER_CUSTOMER)
    out = list(itertools.islice(synthetic.iter_events(n_customers, SYNTHETIC_DAYS, seed),
                                events))
    assert len(out) == events, f"only {len(out)} events from {n_customers} customers"
    return out


def to_event(topic: str, doc: dict[str, Any]) -> Event:
    """An input record as the oracle sees it (money in integer units of 1/10,000)."""
    if topic == "clickstream":
        return ClickEvent(doc["event_id"], doc["customer_id"], int(doc["ts"]),
                          doc["event_type"], doc.get("session_id"))
    return TransactionEvent(doc["event_id"], doc["customer_id"], int(doc["ts"]),
                            round(doc["amount"] * 10_000), doc.get("kind", "purchase"))


def produce(dep: Any, records: list[Input]) -> int:
    """Send ``(topic, event)`` pairs to the deployment's input topics, in order."""
    from stream.kafka import ensure_topics, producer

    s = dep.settings
    ensure_topics(s)
    p = producer(s)
    try:
        for topic, doc in records:
            p.send(s.topic(topic), key=str(doc["customer_id"]).encode(), value=orjson.dumps(doc))
        p.flush()
    finally:
        p.close()
    return len(records)


class PacedProducer(threading.Thread):
    """Produces input records at a steady rate in the background (a live stream)."""

    def __init__(self, dep: Any, records: list[Input], rate: float) -> None:
        super().__init__(daemon=True)
        self.settings = dep.settings
        self.records = records
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        from stream.kafka import ensure_topics, producer

        s = self.settings
        try:
            ensure_topics(s)
            p = producer(s)
            start = time.monotonic()
            for topic, doc in self.records:
                p.send(s.topic(topic), key=str(doc["customer_id"]).encode(),
                       value=orjson.dumps(doc))
                self.sent += 1
                ahead = self.sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            p.flush()
            p.close()
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout_s: float = 600.0) -> None:
        self.join(timeout_s)
        assert not self.is_alive(), "the producer did not finish"
        assert self.error is None, f"producing failed: {self.error!r}"
        assert self.sent == len(self.records)


def watermarks(dep: Any) -> dict[tuple[str, int], int]:
    """The state store's last applied offset per (input topic, partition), where any."""
    from features.store import RedisFeatureStore
    from stream.redisconn import redis_client

    s = dep.settings

    async def run() -> dict[tuple[str, int], int]:
        r = redis_client(s)
        try:
            return await RedisFeatureStore(r, s.redis_prefix).watermarks(
                s.partitions, list(s.input_topics))
        finally:
            await r.aclose()

    return asyncio.run(run())


def progress(dep: Any) -> dict[int, int]:
    """Per partition, input records at or below the committed watermarks of both topics."""
    out = dict.fromkeys(range(dep.settings.partitions), 0)
    for (_, p), w in watermarks(dep).items():
        out[p] += w + 1
    return out


def applied(dep: Any) -> int:
    """Input records at or below the committed watermarks (applied or dead-lettered)."""
    return sum(progress(dep).values())


def wait_applied(dep: Any, target: int, stall_s: float = 180.0, step_s: float = 0.2) -> int:
    """Poll the watermarks until at least ``target`` records are covered; returns the count.

    Fails only when nothing moved for ``stall_s``: on a busy machine the engine may be
    slow, but a stuck one is a failure.
    """
    done = applied(dep)
    moved_at = time.monotonic()
    while done < target:
        time.sleep(step_s)
        now = applied(dep)
        if now > done:
            done, moved_at = now, time.monotonic()
        assert time.monotonic() - moved_at < stall_s, (
            f"stuck at {done} of {target} records for {stall_s:.0f}s")
    return done


# -- reading the stored end state ------------------------------------------------------


def _redis(dep: Any) -> Any:
    import redis

    return redis.Redis.from_url(dep.settings.redis_url)


def profiles(dep: Any) -> dict[int, dict[str, Any]]:
    """partition -> customer id -> stored scoring profile."""
    from features.store import Keys
    from scorers.profile import Profile

    s = dep.settings
    keys = Keys(s.redis_prefix)
    r = _redis(dep)
    out: dict[int, dict[str, Any]] = {}
    try:
        for p in range(s.partitions):
            head = len(keys.profile(p, ""))
            names = list(r.scan_iter(match=keys.profile(p, "*"), count=1000))
            blobs = r.mget(names) if names else []
            out[p] = {k.decode()[head:]: Profile.from_bytes(b)
                      for k, b in zip(names, blobs, strict=True) if b is not None}
    finally:
        r.close()
    return out


def tables(dep: Any, name: str) -> dict[int, dict[str, int]]:
    """A per-partition counter table (``seg``, ``rfm``) as stored."""
    from features.store import Keys

    s = dep.settings
    keys = Keys(s.redis_prefix)
    r = _redis(dep)
    try:
        return {p: {k.decode(): int(v) for k, v in r.hgetall(keys.table(p, name)).items()}
                for p in range(s.partitions)}
    finally:
        r.close()


# -- the checks ------------------------------------------------------------------------


def check_features(dep: Any, inputs: list[Input], newest: int | None = None) -> int:
    """Every stored customer's features equal the oracle's; returns the customer count.

    Engine time must be ``newest`` (default: the newest event time of ``inputs``).
    """
    from features.state import derive

    events = [to_event(t, d) for t, d in inputs]
    now, states = dep.states()
    newest = max(e.ts_ms for e in events) if newest is None else newest
    assert now == newest, f"engine time {now} != newest input event {newest}"
    want = oracle(events, now)
    missing = sorted(set(want) - set(states))
    extra = sorted(set(states) - set(want))
    assert not missing and not extra, (f"{len(missing)} customers missing {missing[:5]}, "
                                       f"{len(extra)} unexpected {extra[:5]}")
    bad = []
    for cid, w in want.items():
        try:
            assert_features_equal(derive(states[cid], now), w, f"customer {cid}")
        except AssertionError as exc:
            bad.append(str(exc))
    assert not bad, f"{len(bad)} of {len(want)} customers differ:\n" + "\n".join(bad[:10])
    return len(want)


def check_counters(dep: Any, by_partition: dict[int, dict[str, Any]]) -> None:
    """Segment sizes and the RFM sketch equal the counts over the stored profiles."""
    seg, rfm = tables(dep, "seg"), tables(dep, "rfm")
    for p, profs in by_partition.items():
        want_seg = Counter(f"{scheme}|{name}" for prof in profs.values()
                           for scheme, (name, _) in prof.segments.items())
        assert seg[p] == dict(want_seg), (p, seg[p], dict(want_seg))
        want_rfm = Counter(f for prof in profs.values() if prof.rfm for f in prof.rfm)
        assert rfm[p] == dict(want_rfm), f"partition {p}: RFM sketch differs from the profiles"


@dataclass
class MigrationReport:
    records: int = 0
    unique: int = 0
    chains: int = 0
    #: (customer, scheme) whose chain is broken in topic order but complete: its moves can
    #: be ordered into a chain from null to the current segment (published out of order)
    reordered: dict[tuple[str, str], list[tuple[Any, Any]]] = field(default_factory=dict)
    #: (customer, scheme) whose moves form no such chain in any order (lost or extra moves)
    broken: dict[tuple[str, str], list[tuple[Any, Any]]] = field(default_factory=dict)


def _orderable(hops: list[tuple[Any, Any]], end: str) -> bool:
    """Whether every move can be used once in a chain from null ending in ``end``.

    That is an Eulerian trail from ``None`` to ``end`` in the multigraph of moves: every
    segment is left as often as entered, except the start (left once more) and the end
    (entered once more), and the moves are connected.
    """
    if not hops:
        return False
    balance: Counter[Any] = Counter()
    for a, b in hops:
        balance[a] += 1
        balance[b] -= 1
    want = Counter({None: 1, end: -1})
    if +balance != +want or -balance != -want:
        return False
    groups: dict[Any, Any] = {}

    def root(x: Any) -> Any:
        while groups.setdefault(x, x) != x:
            x = groups[x]
        return x

    for a, b in hops:
        groups[root(a)] = root(b)
    return len({root(x) for hop in hops for x in hop}) == 1


def check_migrations(dep: Any, by_partition: dict[int, dict[str, Any]],
                     customers: set[str], timeout_s: float = 180.0) -> MigrationReport:
    """Migrations on the topic: valid, deduplicated chains ending in the current segment."""
    from scorers.rules import default_catalogue
    from stream.schemas import Migration

    s = dep.settings
    schemes = set(default_catalogue().schemes) if s.rules_path is None else None
    records = dep.consume_all("segment-migrations", timeout_s=timeout_s)
    rep = MigrationReport(records=len(records))
    seen: set[str] = set()
    chains: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:  # per partition in offset order; a customer stays in one partition
        assert rec.value is not None, "unexpected tombstone"
        m = orjson.loads(rec.value)
        Migration.model_validate(m)
        assert rec.key == m["customer_id"].encode(), m["migration_id"]
        assert m["customer_id"] in customers, f"migration of unknown customer {m['customer_id']}"
        if m["migration_id"] in seen:
            continue
        seen.add(m["migration_id"])
        chains[(m["customer_id"], m["scheme"])].append(m)
    rep.unique = len(seen)
    current = {cid: prof for profs in by_partition.values() for cid, prof in profs.items()}
    assert set(current) == customers, "stored profiles differ from the input's customers"
    for cid, prof in current.items():
        if schemes is not None:
            assert set(prof.segments) == schemes, (cid, prof.segments)
        for scheme, (segment, _) in prof.segments.items():
            chain = chains.pop((cid, scheme), [])
            rep.chains += 1
            hops = [(m["from_segment"], m["to_segment"]) for m in chain]
            ok = (bool(chain) and chain[0]["from_segment"] is None
                  and all(b["from_segment"] == a["to_segment"]
                          for a, b in itertools.pairwise(chain))
                  and chain[-1]["to_segment"] == segment)
            if not ok:
                where = rep.reordered if _orderable(hops, segment) else rep.broken
                where[(cid, scheme)] = [*hops, ("current", segment)]
        for h in prof.history:  # [at, scheme, from, to, migration_id, action]
            assert h[4] in seen, f"migration {h[4]} of {cid} never reached the topic"
    assert not chains, f"migrations of schemes no profile holds: {list(chains)[:5]}"
    return rep


def dead_letters(dep: Any, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in dep.consume_all("segmentation-dlq", timeout_s)]


def judge(dep: Any, inputs: list[Input], *, allow_dead: bool = False,
          newest: int | None = None) -> dict[str, Any]:
    """Every check of the module; returns a summary to print. Raises on any mismatch.

    ``inputs`` are the events that must be applied (each once); ``newest`` the expected
    engine time when it is not the newest of them (events dead-lettered after their
    time was accepted still advance it).
    """
    customers = check_features(dep, inputs, newest)
    by_partition = profiles(dep)
    check_counters(dep, by_partition)
    ids = {str(d["customer_id"]) for _, d in inputs}
    rep = check_migrations(dep, by_partition, ids)
    assert not rep.broken, (f"{len(rep.broken)} of {rep.chains} migration chains broken "
                            f"(moves lost or extra), e.g. {list(rep.broken.items())[:3]}")
    assert not rep.reordered, (
        f"{len(rep.reordered)} of {rep.chains} migration chains are complete but published out "
        f"of order, e.g. {list(rep.reordered.items())[:3]}")
    summary = {"events": len(inputs), "customers": customers, "migration_records": rep.records,
               "migrations": rep.unique, "chains": rep.chains}
    if not allow_dead:
        dlq = dead_letters(dep)
        assert dlq == [], f"{len(dlq)} unexpected dead letters, e.g. {dlq[:2]}"
    check_logs(dep)
    return summary


def check_logs(dep: Any) -> None:
    """No worker warned that its sweep or outbox flush overran its interval: both run a
    fixed pause after each run, and a sweep pass of seconds or a flush through an outage
    is normal operation, not a warning (Faust's timers said "Timer ... is overlapping")."""
    for path in getattr(dep, "logs", []):
        if not path.exists():
            continue
        noise = [line for line in path.read_text(errors="replace").splitlines()
                 if "is overlapping" in line and ("_sweep" in line or "_flush_outbox" in line)]
        assert not noise, f"{path.name}: {len(noise)} timer warnings, e.g. {noise[0]}"


def readyz(base: str) -> tuple[int, dict[str, Any]]:
    """A worker's ``/readyz`` at ``base``: its status and its checks."""
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def eventually(check: Any, timeout_s: float, what: str, step_s: float = 0.25) -> Any:
    """Poll ``check()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
        time.sleep(step_s)
