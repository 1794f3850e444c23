"""A sweep step's outbox published in the background, as a batch's is.

With ``background_publish`` a sweep step commits under the batch lock and returns without
waiting for Kafka to acknowledge its migrations: the next batch or step loads and
evaluates meanwhile, and its commit waits for that publish first. These tests hold what
must not change: every committed migration is published, in commit order with the
batches' records; nothing published stays in the stored outbox; a partition counts as
swept only once its migrations are out, and one whose publish failed is swept again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson

from features.store import MemoryFeatureStore, StoreUnavailable
from scorers.profile import Profile
from scorers.rules import default_catalogue
from stream.pipeline import BatchProcessor, RawRecord
from stream.runtime import StaticScoring
from stream.settings import load_settings
from stream.sweep import CHUNK_ATTEMPTS, Sweeper
from tests.unit.test_background_publish import Gate as BatchGate

DAY = 86_400_000
T0 = 1_735_689_600_000
WALL = (T0 + 3 * 365 * DAY) / 1000


class Gate(BatchGate):
    """The batch tests' publisher (waits for ``open``, fails the calls listed in ``fail``)."""

    def migrations(self) -> list[dict[str, Any]]:
        return [orjson.loads(v) for t, _, v in self.sent if t == "segment-migrations"]


class Harness:
    def __init__(self, gate: Gate) -> None:
        self.s = load_settings(partitions=1)
        self.store = MemoryFeatureStore()
        self.gate = gate
        self.scoring = StaticScoring(self.s, self.store,
                                     default_catalogue().without_anti_flapping(),
                                     clock=lambda: WALL)
        self.p = BatchProcessor(self.s, self.store, gate, clock=lambda: WALL,
                                scoring=self.scoring, background_publish=True)
        self.lock = asyncio.Lock()
        self.sweeper = Sweeper(self.p, self.scoring, self.store, self.lock)
        self.offset = 0

    async def buy(self, customers: Sequence[str], ts: int, amount: float = 10.0) -> None:
        recs = []
        for cid in customers:
            ev = {"event_id": f"{cid}-{ts}", "customer_id": cid, "ts": ts, "amount": amount}
            recs.append(RawRecord("transactions", 0, self.offset, cid.encode(),
                                  orjson.dumps(ev)))
            self.offset += 1
        async with self.lock:
            await self.p.process(recs)

    async def history(self, n: int) -> None:
        """``n`` customers who bought every few days for 40 days, each spending differently."""
        for day in range(0, 40, 4):
            await self.buy([f"c{i}" for i in range(n) if (i + day) % 3], T0 + day * DAY,
                           5.0 + 7 * (day % 5))

    async def months_later(self, n: int) -> None:
        """:meth:`history` of ``n`` customers, published; then a new process, months
        later, whose sweeps move the silent customers."""
        await self.history(n)
        await self.p.drain()
        self.restart()
        self.store.global_now = T0 + 300 * DAY

    def restart(self) -> None:
        """As a new process: no stored evaluation is taken as current by the sweeps."""
        self.scoring.instance = "restarted"


def last_moves(migrations: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    out = {}
    for m in migrations:
        out[(m["customer_id"], m["scheme"])] = m["to_segment"]
    return out


def chained(migrations: list[dict[str, Any]]) -> bool:
    """Each customer's moves in a scheme follow on from each other, in publish order."""
    at: dict[tuple[str, str], str | None] = {}
    for m in migrations:
        key = (m["customer_id"], m["scheme"])
        if key in at and at[key] != m["from_segment"]:
            return False
        at[key] = m["to_segment"]
    return True


def test_a_sweep_step_returns_before_its_publish_and_the_pass_waits_for_it_at_the_end(
) -> None:
    async def main() -> None:
        h = Harness(Gate())
        await h.history(30)
        await h.p.drain()
        before, calls = len(h.gate.migrations()), h.gate.started
        h.restart()
        h.gate.open.clear()  # the broker is slow
        # Months later the silent customers move (time-driven migrations).
        h.store.global_now = T0 + 300 * DAY
        sweep = asyncio.ensure_future(h.sweeper.run_pass([0]))
        for _ in range(200):
            if h.gate.started > calls:
                break
            await asyncio.sleep(0.005)
        assert h.gate.started == calls + 1
        await asyncio.sleep(0.02)
        # The step committed and let go of the lock; the pass waits for the publish
        # before it counts the partition as swept.
        assert not h.lock.locked()
        assert not sweep.done() and 0 not in h.store.swept
        assert h.store.outboxes.get(0)
        h.gate.open.set()
        stats = await sweep
        assert stats.migrations > 0
        assert len(h.gate.migrations()) == before + stats.migrations
        assert 0 in h.store.swept and 0 in h.sweeper.swept
        assert not h.store.outboxes.get(0)

    asyncio.run(main())


def test_a_failed_sweep_publish_leaves_the_partition_to_be_swept_again() -> None:
    async def main() -> None:
        h = Harness(Gate())
        await h.months_later(30)
        h.gate.fail = [False] * h.gate.calls + [True]
        stats = await h.sweeper.run_pass([0])
        assert stats.migrations > 0
        assert 0 not in h.sweeper.swept and 0 not in h.store.swept
        assert len(h.store.outboxes.get(0, {})) >= stats.migrations  # still stored
        # The next pass publishes what waits first, then counts the partition as swept.
        due = await h.sweeper.due([0])
        assert due == [0]
        await h.sweeper.run_pass(due)
        await h.p.drain()
        assert 0 in h.sweeper.swept
        async with h.lock:
            await h.p.flush_outbox([0])
        assert not h.store.outboxes.get(0)
        moves = h.gate.migrations()
        assert chained(moves)
        ids = [m["migration_id"] for m in moves]
        assert len(set(ids)) == len(ids)  # the failed publish sent nothing

    asyncio.run(main())


def test_sweeps_and_batches_interleaved_publish_every_migration_in_commit_order() -> None:
    """Batches and sweep passes alternate over days of input while the broker is slow and
    fails now and then: every customer's published moves chain from one to the next, and
    the last move published for each customer and scheme is the segment stored for them."""

    async def main() -> None:
        gate = Gate(fail=[i % 7 == 3 for i in range(500)])
        h = Harness(gate)
        customers = [f"c{i}" for i in range(60)]
        for day in range(0, 120, 6):
            h.store.global_now = max(h.store.global_now, T0 + day * DAY)
            buyers = customers[day % 5::(3 + day % 4)]
            gate.open.clear()
            batch = asyncio.ensure_future(h.buy(buyers, T0 + day * DAY, 5.0 + day))
            await asyncio.sleep(0)
            gate.open.set()
            await batch
            if day % 12 == 0:
                h.restart()
            await h.sweeper.run_pass([0])
        await h.p.drain()
        for _ in range(5):  # publishes that failed wait in the store for a flush
            async with h.lock:
                try:
                    await h.p.flush_outbox([0])
                except ConnectionError:
                    continue
            if not h.store.outboxes.get(0):
                break
        assert not h.store.outboxes.get(0)
        first: dict[str, dict[str, Any]] = {}
        for m in gate.migrations():
            first.setdefault(m["migration_id"], m)
        moves = list(first.values())
        assert moves and chained(moves)
        stored = {}
        for (_p, cid), blob in h.store.profiles.items():
            for scheme, (seg, _since) in Profile.from_bytes(blob).segments.items():
                stored[(cid, scheme)] = seg
        assert stored and last_moves(moves) == stored

    asyncio.run(main())


def test_a_sweep_step_waits_for_a_batchs_publish_without_holding_the_lock() -> None:
    """A batch's outbox still publishing (a slow broker) keeps the next sweep step from
    starting, but not the next batch: the step waits for it before it takes the lock."""

    async def main() -> None:
        h = Harness(Gate())
        await h.months_later(30)
        h.gate.open.clear()  # the broker is slow
        await h.buy(["late"], T0 + 300 * DAY)  # returns; its publish waits for the broker
        assert not h.p.settled
        sweep = asyncio.ensure_future(h.sweeper.run_pass([0]))
        try:
            await asyncio.sleep(0.05)
            assert not h.lock.locked()
            swept_before = h.store.global_now
            # Another batch runs meanwhile (it reads what the first one committed).
            batch = asyncio.ensure_future(h.buy(["later"], T0 + 300 * DAY + 1))
            await asyncio.sleep(0.05)
            assert not sweep.done()
        finally:
            h.gate.open.set()  # a failed check must not leave the publish waiting
        await asyncio.wait_for(batch, 5)
        stats = await asyncio.wait_for(sweep, 5)
        await h.p.drain()
        assert stats.customers > 0 and stats.migrations > 0
        assert h.store.global_now >= swept_before
        moves = h.gate.migrations()
        assert chained(moves)
        assert not h.store.outboxes.get(0)

    asyncio.run(main())


def test_a_sweep_step_that_keeps_finding_a_batch_in_flight_still_runs() -> None:
    """Batches that leave a publish running every time the step takes the lock do not hold
    sweeps off for good: after a few turns the step waits under the lock."""

    async def main() -> None:
        h = Harness(Gate())
        await h.months_later(20)
        turns = 0
        real_drain = h.p.drain

        async def drain_then_batch() -> None:
            nonlocal turns
            await real_drain()
            if not h.lock.locked() and turns < 10:
                # a batch slips in before the step takes the lock, and leaves its
                # publish running
                turns += 1
                h.gate.open.clear()
                await h.buy([f"b{turns}"], T0 + 300 * DAY)
                asyncio.get_running_loop().call_later(0.01, h.gate.open.set)

        h.p.drain = drain_then_batch  # type: ignore[method-assign]
        stats = await asyncio.wait_for(h.sweeper.run_pass([0]), 10)
        h.p.drain = real_drain  # type: ignore[method-assign]
        await h.p.drain()
        assert stats.customers > 0
        assert 3 <= turns < 10  # it gave up waiting outside the lock after a few turns
        assert chained(h.gate.migrations())

    asyncio.run(main())


def test_a_customer_whose_state_cannot_be_read_does_not_stop_the_others_sweep() -> None:
    """One stored state the engine cannot decode (written by a newer version, say): the
    rest of its chunk and of its partition move as they would without it, and the
    partition counts as swept."""
    async def main() -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str], int]:
        clean = Harness(Gate())
        await clean.months_later(30)
        await clean.sweeper.run_pass([0])
        await clean.p.drain()
        h = Harness(Gate())
        await h.months_later(30)
        h.store.customers[(0, "c1")] = b"\xff not a state"
        stats = await h.sweeper.run_pass([0])
        await h.p.drain()
        assert 0 in h.sweeper.swept and 0 in h.store.swept
        return last_moves(clean.gate.migrations()), last_moves(h.gate.migrations()), \
            stats.unreadable

    expected, moves, unreadable = asyncio.run(main())
    assert unreadable == 1
    others = {k: v for k, v in expected.items() if k[0] != "c1"}
    assert len({k[0] for k in others}) >= 10
    assert {k: v for k, v in moves.items() if k[0] != "c1"} == others


def test_a_chunk_given_up_leaves_its_partition_to_be_swept_again() -> None:
    """Every commit of a chunk fails (a full Redis refusing writes, say) until the sweep
    gives the chunk up: the partition is not marked swept, and the next pass moves the
    customers once commits go through again."""
    async def main() -> None:
        h = Harness(Gate())
        await h.months_later(30)
        commit = h.store.commit
        refused = 0

        async def refuse(commits):  # type: ignore[no-untyped-def]
            nonlocal refused
            refused += 1
            raise StoreUnavailable("OOM command not allowed when used memory > 'maxmemory'")

        async def no_pause() -> None:
            return None

        before = len(h.gate.migrations())
        h.store.commit = refuse  # type: ignore[method-assign]
        h.sweeper.retry_pause = no_pause  # type: ignore[method-assign]
        stats = await h.sweeper.run_pass([0])
        assert refused >= CHUNK_ATTEMPTS and stats.abandoned >= 1 and stats.migrations == 0
        assert 0 not in h.sweeper.swept and 0 not in h.store.swept
        assert await h.sweeper.due([0]) == [0]
        h.store.commit = commit  # type: ignore[method-assign]
        stats = await h.sweeper.run_pass([0])
        await h.p.drain()
        assert stats.migrations > 0 and stats.abandoned == 0
        assert 0 in h.sweeper.swept and 0 in h.store.swept
        assert len(h.gate.migrations()) - before == stats.migrations

    asyncio.run(main())


def test_an_idle_workers_sweep_stops_it_when_the_store_lost_writes() -> None:
    """No input arrives, so no batch loads: the sweep's load must find the loss, and the
    pass must not evaluate and publish from the store's older copy."""
    import copy

    import pytest

    from stream.errors import PipelineFailed

    async def main() -> None:
        h = Harness(Gate())
        await h.history(30)
        await h.p.drain()
        older = copy.deepcopy((h.store.meta, h.store.customers, h.store.profiles,
                               h.store.tables))
        await h.buy([f"c{i}" for i in range(30)], T0 + 60 * DAY)
        await h.p.drain()
        h.restart()
        h.store.global_now = T0 + 300 * DAY
        (h.store.meta, h.store.customers, h.store.profiles, h.store.tables) = older
        sent = len(h.gate.sent)
        with pytest.raises(PipelineFailed, match="lost committed writes"):
            await h.sweeper.run_pass([0])
        assert len(h.gate.sent) == sent and 0 not in h.sweeper.swept

    asyncio.run(main())
