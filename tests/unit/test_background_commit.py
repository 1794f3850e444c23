"""A batch's commit run while the next batch is loaded and evaluated.

With ``background_commit=True`` :meth:`BatchProcessor.process` returns once a batch is
evaluated; its commit and then its publish run in the background, and the next batch
reads what that commit writes from the commit itself. These tests hold it to the plain
step: on any input, batch split and store fault (a commit fenced by another writer, one
that times out after it was applied, one that fails before), the store ends in the same
state as the plain step's under the same faults, with every event applied once, and the
same outbox records are published, in the same order of first delivery for each key.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features import serial
from features.state import derive
from features.store import MemoryFeatureStore, PartitionCommit, StoreUnavailable
from scorers.nba import default_actions
from scorers.rules import default_catalogue
from stream import synthetic
from stream.pipeline import BatchProcessor, PipelineFailed, RawRecord
from stream.runtime import StaticScoring
from stream.settings import load_settings

DAY = 86_400_000
WALL = (synthetic.DEFAULT_START_MS + 400 * DAY) / 1000


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        self.sent.extend(records)


class FixedPopulation(StaticScoring):
    """The rules and actions of a worker, ranked against an empty RFM population: the two
    steps compared here then evaluate exactly the same inputs. (A worker re-reads the
    population sketch on its own interval, so it never reads another batch's increments
    at a fixed point anyway.)"""

    async def refresh(self, force: bool = False) -> None:
        return None


def records(seed: int, customers: int, partitions: int, bad_every: int) -> list[RawRecord]:
    """Synthetic input in event-time order, with duplicates and malformed records mixed in."""
    clicks, txns, _ = synthetic.generate(customers=customers, days=40, seed=seed)
    events = sorted([("clickstream", e) for e in clicks] + [("transactions", e) for e in txns],
                    key=lambda te: te[1]["ts"])
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    out = []
    for i, (topic, ev) in enumerate(events):
        cid = str(ev["customer_id"])
        part = sum(cid.encode()) % partitions
        values = [orjson.dumps(ev)]
        if i % 7 == 3:
            values.append(values[0])  # redelivered by the producer: a duplicate id
        if bad_every and i % bad_every == 0:
            values.append(b'{"customer_id": "' + cid.encode() + b'", "ts": "soon"}')
        for v in values:
            off = offsets[(topic, part)]
            offsets[(topic, part)] += 1
            out.append(RawRecord(topic, part, off, cid.encode(), v))
    return out


def split(recs: list[RawRecord], sizes: list[int]) -> list[list[RawRecord]]:
    out, i, k = [], 0, 0
    while i < len(recs):
        n = sizes[k % len(sizes)]
        out.append(recs[i:i + n])
        i, k = i + n, k + 1
    return out


class Run:
    def __init__(self, partitions: int, background: bool) -> None:
        s = load_settings(partitions=partitions)
        self.store, self.sink = MemoryFeatureStore(), Sink()
        scoring = FixedPopulation(s, self.store, default_catalogue(), default_actions(),
                                  clock=lambda: WALL)
        scoring.instance = "one-worker"  # part of the profiles' context key
        self.p = BatchProcessor(s, self.store, self.sink, clock=lambda: WALL,
                                scoring=scoring, background_publish=background,
                                background_commit=background)
        self.partitions = partitions

    async def feed(self, batches: list[list[RawRecord]]) -> None:
        for b in batches:
            await self.p.process(b)
        await self.p.drain()
        # What a failed commit left in the stored outbox goes out with the periodic flush.
        await self.p.flush_outbox(range(self.partitions))

    def state(self) -> dict[str, Any]:
        st_ = self.store
        return {"customers": st_.customers, "profiles": st_.profiles, "tables": st_.tables,
                "meta": {p: {k: v for k, v in m.items() if k != "ver"}
                         for p, m in st_.meta.items()},
                "now": st_.global_now, "outbox": {p: o for p, o in st_.outboxes.items() if o}}


def first_seen(sent: list[tuple[str, bytes | None, bytes]]) -> list[tuple[str, bytes | None,
                                                                         bytes]]:
    seen: set[tuple[str, bytes | None, bytes]] = set()
    return [r for r in sent if not (r in seen or seen.add(r))]  # type: ignore[func-returns-value]


def by_key(sent: list[tuple[str, bytes | None, bytes]]
           ) -> dict[tuple[str, bytes | None], list[bytes]]:
    out: dict[tuple[str, bytes | None], list[bytes]] = defaultdict(list)
    for topic, key, value in sent:
        out[(topic, key)].append(value)
    return dict(out)


def fence_commits(store: MemoryFeatureStore, every: int) -> None:
    """Another writer moves a partition's version on right before every ``every``-th commit."""
    original = store.commit
    n = [0]

    async def fenced(commits: Sequence[PartitionCommit]) -> dict[int, bool]:
        n[0] += 1
        if commits and n[0] % every == 0:
            m = store.meta.setdefault(commits[0].partition, {})
            m["ver"] = m.get("ver", 0) + 1
        return await original(commits)

    store.commit = fenced  # type: ignore[method-assign]


def fail_commits(store: MemoryFeatureStore, every: int, after_apply: bool) -> None:
    """Every ``every``-th commit fails: before it touched the store, or after it applied."""
    original = store.commit
    n = [0]

    async def failing(commits: Sequence[PartitionCommit]) -> dict[int, bool]:
        n[0] += 1
        if n[0] % every == 0:
            if after_apply:
                await original(commits)
            raise StoreUnavailable("simulated timeout")
        return await original(commits)

    store.commit = failing  # type: ignore[method-assign]


def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.pipeline as pipeline_mod

    real = asyncio.sleep

    async def quick(_s: float, *a: Any) -> None:
        await real(0)

    monkeypatch.setattr(pipeline_mod.asyncio, "sleep", quick)


FAULTS: dict[str, Callable[[MemoryFeatureStore], None]] = {
    "none": lambda s: None,
    "fenced": lambda s: fence_commits(s, 3),
    "fails_before_apply": lambda s: fail_commits(s, 4, after_apply=False),
    "fails_after_apply": lambda s: fail_commits(s, 4, after_apply=True),
}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), customers=st.integers(2, 12), partitions=st.integers(1, 3),
       sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
       bad_every=st.sampled_from([0, 5, 23]), fault=st.sampled_from(sorted(FAULTS)))
def test_committing_in_the_background_ends_as_the_plain_step(
        monkeypatch: pytest.MonkeyPatch, seed: int, customers: int, partitions: int,
        sizes: list[int], bad_every: int, fault: str) -> None:
    no_sleep(monkeypatch)
    batches = split(records(seed, customers, partitions, bad_every), sizes)
    # The same faults at the same commits of both: a fenced partition is evaluated again
    # alone, so its customers' RFM ranks may differ from a run without the fence (ranks
    # count the customers evaluated together), but not between the two steps.
    clean, plain, overlap = Run(partitions, False), Run(partitions, False), Run(partitions, True)
    FAULTS[fault](plain.store)
    FAULTS[fault](overlap.store)
    for run in (clean, plain, overlap):
        asyncio.run(run.feed(batches))
    assert clean.store.customers, "the input applied nothing"
    assert overlap.state() == plain.state()
    # Every event applied exactly once, whatever failed.
    assert overlap.store.customers == clean.store.customers
    if fault == "none":
        assert overlap.sink.sent == plain.sink.sent
    else:
        # A failed commit may publish some records twice, and later than records of other
        # partitions committed after it; never fewer, nor out of order for one key.
        assert by_key(first_seen(overlap.sink.sent)) == by_key(first_seen(plain.sink.sent))


class GatedStore(MemoryFeatureStore):
    """Commits wait for ``gate``; counts what each load found stored."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.commits_done = 0
        self.loads = 0

    async def load(self, *a: Any, **k: Any) -> Any:
        self.loads += 1
        return await super().load(*a, **k)

    async def commit(self, commits: Sequence[PartitionCommit]) -> dict[int, bool]:
        await self.gate.wait()
        out = await super().commit(commits)
        self.commits_done += 1
        return out


def overlapping(store: MemoryFeatureStore) -> BatchProcessor:
    """One partition, committing and publishing in the background, as a worker does."""
    return BatchProcessor(load_settings(partitions=1), store, Sink(), clock=lambda: WALL,
                          background_publish=True, background_commit=True)


T0 = synthetic.DEFAULT_START_MS


def purchase(offset: int) -> RawRecord:
    """Customer c1's purchase number ``offset``, at that offset of partition 0."""
    return RawRecord("transactions", 0, offset, b"c1", orjson.dumps(
        {"event_id": f"e{offset}", "customer_id": "c1", "ts": T0 + offset, "amount": 10.0}))


def purchases(store: MemoryFeatureStore) -> int:
    state = serial.decode(store.customers[(0, "c1")])
    return int(derive(state, store.global_now)["purchases_total"])


def test_the_next_batch_is_evaluated_while_the_commit_runs_and_reads_it() -> None:
    async def main() -> None:
        store = GatedStore()
        p = overlapping(store)
        store.gate.clear()  # Redis is slow
        await p.process([purchase(0)])
        assert store.commits_done == 0 and not store.customers  # returned before its commit
        nxt = asyncio.ensure_future(p.process([
            purchase(1),
            purchase(0),  # redelivered
        ]))
        for _ in range(20):
            await asyncio.sleep(0)
        # evaluated against the first batch's commit, which the store does not hold yet;
        # its own commit waits for that one
        assert not nxt.done() and store.commits_done == 0
        store.gate.set()
        stats = await nxt
        await p.drain()
        # read from the commit, not reloaded after a fence
        assert stats.applied == 1 and stats.skipped_below_watermark == 1
        assert stats.conflicts == 0 and store.loads == 2
        assert store.commits_done == 2 and store.meta[0]["ver"] == 2
        assert purchases(store) == 2

    asyncio.run(main())


def test_a_batch_that_read_a_refused_commit_is_judged_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first batch's commit is fenced after the second batch read it: the second must
    not commit what it built on it (it would carry the first batch's events twice or not
    at all); it reloads once the first was applied again."""
    no_sleep(monkeypatch)

    async def main() -> None:
        store = GatedStore()
        p = overlapping(store)
        store.gate.clear()
        await p.process([purchase(0)])
        nxt = asyncio.ensure_future(
            p.process([purchase(1)]))
        for _ in range(20):
            await asyncio.sleep(0)
        fenced: list[int] = []
        p.on_conflicts = fenced.append
        store.meta.setdefault(0, {})["ver"] = 5  # another writer, before the commit lands
        store.gate.set()
        await nxt
        await p.drain()
        assert purchases(store) == 2
        # first batch: its load, its reload after the fence; second: its overlaid load,
        # its reload after the first was applied again
        assert store.loads == 4 and store.meta[0]["ver"] == 7
        assert fenced == [1]  # counted for the metrics

    asyncio.run(main())


def test_a_background_commit_that_gives_up_stops_every_later_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    no_sleep(monkeypatch)

    async def main() -> None:
        store = MemoryFeatureStore()
        p = overlapping(store)
        failures: list[PipelineFailed] = []
        p.on_failed = failures.append
        fence_commits(store, 1)  # every commit is fenced
        await p.process([purchase(0)])
        await p.drain()
        # reported as it gives up, with no later batch to find it (a worker stops then)
        assert len(failures) == 1 and "repeated commit conflicts" in str(failures[0])
        with pytest.raises(PipelineFailed, match="gave up"):
            await p.process([purchase(1)])
        with pytest.raises(PipelineFailed):
            await p.process([purchase(2)])
        assert not store.customers  # nothing after the failed batch was committed
        assert len(failures) == 1

    asyncio.run(main())


def test_offsets_are_acknowledged_only_once_the_commit_landed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker acks a batch's input offsets through ``when_committed``: an ack before
    the state is in the store could skip the batch for good (a new owner that cannot read
    the store's watermarks starts at Kafka's committed offset)."""
    no_sleep(monkeypatch)

    async def main() -> None:
        store = GatedStore()
        p = overlapping(store)
        acks: list[str] = []
        p.when_committed(lambda: acks.append("idle"))  # nothing in flight: at once
        assert acks == ["idle"]
        store.gate.clear()
        await p.process([purchase(0)])
        p.when_committed(lambda: acks.append("first"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert acks == ["idle"]  # the commit has not landed
        store.gate.set()
        await p.drain()
        assert acks == ["idle", "first"] and store.commits_done == 1

        # a commit that gives up never acknowledges
        fence_commits(store, 1)
        await p.process([purchase(1)])
        p.when_committed(lambda: acks.append("second"))
        await p.drain()
        assert acks == ["idle", "first"]
        with pytest.raises(PipelineFailed):
            await p.process([purchase(2)])

    asyncio.run(main())


def test_a_cancelled_background_commit_acknowledges_nothing_and_stops_later_batches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    no_sleep(monkeypatch)

    async def main() -> None:
        store = GatedStore()
        p = overlapping(store)
        store.gate.clear()
        await p.process([purchase(0)])
        acks: list[int] = []
        failures: list[PipelineFailed] = []
        p.on_failed = failures.append
        p.when_committed(lambda: acks.append(0))
        assert p._publishing is not None
        p._publishing.cancel()  # as a worker stop cancels it
        await p.drain()
        store.gate.set()
        assert acks == [] and not store.customers
        assert failures == []  # a stop under way, not a failure to stop for
        # Its records left the inbox: a batch committing past them would lose them, so
        # none may; restarted, the worker reads them again from the watermark.
        with pytest.raises(PipelineFailed, match="cancelled"):
            await p.process([purchase(1)])
        assert acks == [] and not store.customers and store.commits_done == 0
        restarted = overlapping(store)
        await restarted.process([purchase(0), purchase(1)])
        await restarted.drain()
        assert purchases(store) == 2

    asyncio.run(main())


def test_a_sweep_commits_nothing_past_a_batch_that_failed() -> None:
    from stream.sweep import Sweeper, SweepStats

    async def main() -> None:
        store = MemoryFeatureStore()
        p = overlapping(store)
        scoring = FixedPopulation(p.settings, store, default_catalogue(), default_actions(),
                                  clock=lambda: WALL + 90 * DAY / 1000)  # customers went quiet
        p.scoring = scoring
        await p.process([purchase(0)])
        await p.drain()
        sweeper = Sweeper(p, scoring, store, asyncio.Lock())
        p._failed = PipelineFailed("gave up after repeated commit conflicts")
        ver = store.meta[0]["ver"]
        with pytest.raises(PipelineFailed):
            await sweeper._step(0, ["c1"], SweepStats())
        assert store.meta[0]["ver"] == ver

    asyncio.run(main())


def test_fail_stop_ends_the_process_with_a_critical_log(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    import stream.app as app_mod

    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(app_mod.os, "_exit", fake_exit)
    monkeypatch.setattr(app_mod.logging, "shutdown", lambda: None)
    with caplog.at_level("CRITICAL", logger="stream.app"), pytest.raises(SystemExit):
        app_mod.fail_stop(PipelineFailed("gave up after repeated commit conflicts"))
    assert codes == [70]
    assert "resumes from the state store's watermarks" in caplog.text
