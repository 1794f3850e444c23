"""Segments through the real micro-batch step and sweeps, on the in-memory store twin.

Anti-flapping, time-driven migrations, migration id stability, hold-out shares and lift
against hand computations from the published migration log and the input transactions.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.store import MemoryFeatureStore
from scorers.nba import default_actions, lift_table
from scorers.rules import default_catalogue, load_catalogue
from scorers.scoring import ACTION_HASH
from stream.pipeline import BatchProcessor, RawRecord
from stream.runtime import StaticScoring
from stream.settings import load_settings
from stream.sweep import (
    BUSY_CHUNK,
    BUSY_STEP_S,
    MIN_BUSY_CHUNK,
    PACED_STEP_MAX_S,
    Sweeper,
)

DAY = 86_400_000
T0 = 1_735_689_600_000
WALL = (T0 + 3 * 365 * DAY) / 1000


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        self.sent.extend(records)

    def migrations(self) -> list[dict[str, Any]]:
        return [orjson.loads(v) for t, _, v in self.sent if t == "segment-migrations"]


class Harness:
    def __init__(self, catalogue: Any, actions: Any = None, partitions: int = 1) -> None:
        self.s = load_settings(partitions=partitions)
        self.store, self.sink = MemoryFeatureStore(), Sink()
        self.scoring = StaticScoring(self.s, self.store, catalogue, actions,
                                     clock=lambda: WALL)
        self.p = BatchProcessor(self.s, self.store, self.sink, clock=lambda: WALL,
                                scoring=self.scoring)
        self.sweeper = Sweeper(self.p, self.scoring, self.store, asyncio.Lock())
        self.offsets: dict[int, int] = defaultdict(int)
        self.inputs: list[dict[str, Any]] = []

    def buy(self, events: list[tuple[str, int, float]]) -> None:
        """One micro-batch of purchases ``(customer, ts, amount)``."""
        recs = []
        for cid, ts, amount in events:
            part = hash(cid) % self.s.partitions
            ev = {"event_id": f"{cid}-{ts}", "customer_id": cid, "ts": ts, "amount": amount}
            self.inputs.append(ev)
            recs.append(RawRecord("transactions", part, self.offsets[part], cid.encode(),
                                  orjson.dumps(ev)))
            self.offsets[part] += 1
        asyncio.run(self.p.process(recs))

    def click(self, cid: str, ts: int) -> None:
        """One micro-batch of one page view."""
        part = hash(cid) % self.s.partitions
        ev = {"event_id": f"{cid}-{ts}", "customer_id": cid, "ts": ts,
              "event_type": "page_view"}
        asyncio.run(self.p.process([RawRecord("clickstream", part, self.offsets[-1 - part],
                                              cid.encode(), orjson.dumps(ev))]))
        self.offsets[-1 - part] += 1

    def sweep(self) -> None:
        asyncio.run(self.sweeper.run_pass(range(self.s.partitions)))

    def restart(self) -> None:
        """As a new process: no stored evaluation is taken as current by the sweeps."""
        self.scoring.instance = "restarted"


SPEND_RULES = """
schemes:
  spend:
    anti_flapping: {min_dwell_days: %(dwell)s, hysteresis: {%(hyst)s}}
    segments:
      - {name: High, when: "spend_7d >= 105"}
    fallback: Low
"""


def oscillate(dwell: float, hysteresis: str) -> list[dict[str, Any]]:
    """Daily purchases alternating 10 and 20: the 7-day spend hovers at 100 / 110."""
    cat = load_catalogue(SPEND_RULES % {"dwell": dwell, "hyst": hysteresis})
    h = Harness(cat)
    for day in range(60):
        h.buy([("c1", T0 + day * DAY, 10.0 if day % 2 else 20.0)])
    moves = h.sink.migrations()
    assert moves[0]["from_segment"] is None
    assert all(b["from_segment"] == a["to_segment"] for a, b in itertools.pairwise(moves))
    return moves


def test_oscillating_customer_without_anti_flapping_moves_every_day() -> None:
    moves = oscillate(0, "")
    assert len(moves) >= 50


def test_minimum_dwell_bounds_the_migrations() -> None:
    moves = oscillate(10, "")
    # One placement plus at most one move per 10 days over the 60 days.
    assert 2 <= len(moves) <= 1 + math.ceil(60 / 10)
    ats = [m["at"] for m in moves[1:]]
    assert len(set(ats)) == len(ats)


def test_hysteresis_keeps_a_customer_within_the_margin() -> None:
    moves = oscillate(0, "spend_7d: 10")
    # Enters High once and stays while the 7-day spend stays within 10 of the threshold.
    assert [m["to_segment"] for m in moves] == ["High"] or \
        [m["to_segment"] for m in moves] == ["Low", "High"]


def test_silent_customer_moves_by_time_alone_and_ids_are_stable() -> None:
    h = Harness(default_catalogue().without_anti_flapping())
    # c0 buys a lot early, then goes silent; others keep buying so `now` advances.
    h.buy([("c0", T0 + d * DAY, 80.0) for d in range(0, 40, 4)])
    for d in range(40, 400, 5):
        h.buy([(f"o{i}", T0 + d * DAY + i, 15.0 + i) for i in range(30)])
        if d % 30 == 0:
            h.sweep()
    h.sweep()
    mine = [m for m in h.sink.migrations() if m["customer_id"] == "c0" and m["scheme"] == "rfm"]
    path = [m["to_segment"] for m in mine]
    assert path[-1] in ("At Risk", "Hibernating", "Lost", "Can't Lose Them"), path
    late = [m for m in mine if m["trigger"].get("sweep")]
    assert late, "no time-driven migration"
    assert all(m["from_segment"] == a["to_segment"] for a, m in itertools.pairwise(mine))
    # Redelivering inputs (a consumer rewound after a crash) emits nothing new.
    before = len(h.sink.sent)
    h.offsets.clear()
    h.buy([(ev["customer_id"], ev["ts"], ev["amount"]) for ev in list(h.inputs[:50])])
    assert len(h.sink.sent) == before


def test_holdout_share_and_lift_equal_a_hand_computation() -> None:
    cat = default_catalogue().without_anti_flapping()
    acts = default_actions({k: list(v.segment_names) for k, v in cat.schemes.items()})
    h = Harness(cat, acts, partitions=4)
    n = 10_000
    # Every customer buys once over 20 days; every other one buys again over the next 25.
    step1, step2 = 20 * DAY // n, 25 * DAY // (n // 2)
    for start in range(0, n, 2_000):
        h.buy([(f"c{i}", T0 + i * step1, 10.0 + i % 50) for i in range(start, start + 2_000)])
    for start in range(0, n, 2_000):
        h.buy([(f"c{i}", T0 + 20 * DAY + (i // 2) * step2, 30.0)
               for i in range(start, start + 2_000, 2)])
    assert not [r for r in h.sink.sent if r[0] == "segmentation-dlq"]
    migrations = h.sink.migrations()
    acted = [m for m in migrations if m["action"]]
    # DESIGN §3's action object, exactly (the rule's priority was carried along too)
    assert {frozenset(m["action"]) for m in acted} == {
        frozenset({"action_id", "channel", "holdout"})}
    by_action: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in acted:
        by_action[m["action"]["action_id"]].append(m)
    big = {a: ms for a, ms in by_action.items() if len(ms) >= 2_000}
    assert big, {a: len(ms) for a, ms in by_action.items()}
    for action_id, ms in big.items():
        share = sum(m["action"]["holdout"] for m in ms) / len(ms)
        want = acts.rule_for(action_id).share
        assert abs(share - want) <= 0.01, (action_id, share, want)

    # Hand computation: a purchase in (at, at + attribution] converts the exposure once.
    buys: dict[str, list[int]] = defaultdict(list)
    for ev in h.inputs:
        buys[ev["customer_id"]].append(ev["ts"])
    counters: dict[str, int] = defaultdict(int)
    for m in acted:
        a = m["action"]
        rule = acts.rule_for(a["action_id"])
        arm = "holdout" if a["holdout"] else "treated"
        at = _ms(m["at"])
        key = f"{a['action_id']}|{m['to_segment']}|{arm}"
        counters[f"{key}|exposed"] += 1
        if any(at < t <= at + rule.attribution_ms for t in buys[m["customer_id"]]):
            counters[f"{key}|converted"] += 1
    engine: dict[str, int] = defaultdict(int)
    for (_, table), row in h.store.tables.items():
        if table == ACTION_HASH:
            for k, v in row.items():
                engine[k] += v
    assert dict(engine) == {k: v for k, v in counters.items() if v}
    assert lift_table(engine) == lift_table(counters)


def _ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


@pytest.mark.parametrize("then", ["own click", "sweep"])
def test_a_purchase_the_partition_still_accepts_converts_an_exposure(then: str) -> None:
    """README: a purchase within the attribution window after the migration converts the
    exposure. Engine time moved on by the clickstream topic must not close the window while
    the customer's transactions partition still accepts a purchase inside it."""
    from scorers.nba import load_actions

    cat = load_catalogue("schemes:\n  spend:\n    segments:\n"
                         "      - {name: High, when: 'monetary_total >= 105'}\n"
                         "    fallback: Low\n")
    actions = load_actions(
        "max_actions_per_7d: 10\n"
        "defaults: {holdout_share: 0.0, cooldown_days: 0, attribution_days: 14}\n"
        "rules:\n  - {scheme: spend, to: High, action_id: up, channel: email}\n",
        {"spend": ["High", "Low"]})
    h = Harness(cat, actions)
    h.buy([("c", T0, 200.0)])  # High: exposed, the window runs to day 14
    h.click("o", T0 + 30 * DAY)  # the clickstream topic is at day 30
    if then == "sweep":
        h.sweep()
    else:
        h.click("c", T0 + 30 * DAY)
    h.buy([("c", T0 + 10 * DAY, 5.0)])  # transactions are at day 0: on time
    counted: dict[str, int] = defaultdict(int)
    for (_part, table), row in h.store.tables.items():
        if table == ACTION_HASH:
            for name, n in row.items():
                counted[name] += n
    assert dict(counted) == {"up|High|treated|exposed": 1, "up|High|treated|converted": 1}


def test_a_move_recurring_at_one_engine_time_gets_a_new_id() -> None:
    # Rules flip between two versions while engine time stands still: the same customer
    # goes Low -> High -> Low -> High; every migration needs its own id or a consumer
    # deduplicating by id would lose one and see a broken chain.
    low = load_catalogue(SPEND_RULES % {"dwell": 0, "hyst": ""})
    high = load_catalogue((SPEND_RULES % {"dwell": 0, "hyst": ""}).replace(">= 105", ">= 5"))
    h = Harness(low)
    h.buy([("c1", T0, 50.0)])
    for cat in (high, low, high):
        h.scoring.catalogue = cat
        h.sweep()
    moves = h.sink.migrations()
    assert [m["to_segment"] for m in moves] == ["Low", "High", "Low", "High"]
    assert len({m["migration_id"] for m in moves}) == 4
    assert len({m["at"] for m in moves}) == 1


def test_a_scheme_taken_out_and_put_back_continues_its_chains() -> None:
    """Taking a scheme out of the catalogue used to drop its customers without a migration,
    and putting it back placed them again from null: two first placements in one chain."""
    two = load_catalogue(SPEND_RULES % {"dwell": 0, "hyst": ""} + """
  tier:
    segments:
      - {name: Buyer, when: "purchases_total >= 1"}
    fallback: Browser
""")
    one = load_catalogue("""
schemes:
  tier:
    segments:
      - {name: Buyer, when: "purchases_total >= 1"}
    fallback: Browser
""")
    h = Harness(two)
    h.buy([("c1", T0, 150.0), ("c2", T0, 5.0)])
    for cat in (one, two):
        h.scoring.catalogue = cat
        h.sweep()
    h.scoring.catalogue = one
    h.buy([("c1", T0 + DAY, 1.0)])  # moves while the scheme is out: nothing in it
    h.scoring.catalogue = two
    h.sweep()
    h.buy([("c2", T0 + 2 * DAY, 150.0)])  # back in: c2 moves on from where it was
    moves = h.sink.migrations()
    spend = [(m["customer_id"], m["from_segment"], m["to_segment"])
             for m in moves if m["scheme"] == "spend"]
    assert spend == [("c1", None, "High"), ("c2", None, "Low"), ("c2", "Low", "High")]
    assert _chains_in_topic_order(moves)
    assert len({m["migration_id"] for m in moves}) == len(moves)
    # The counts never lost the scheme's customers while it was out.
    counts: dict[str, int] = defaultdict(int)
    for rows in asyncio.run(h.store.read_tables("seg", [0])).values():
        for fld, n in rows.items():
            counts[fld] += n
    assert {k: v for k, v in counts.items() if k.startswith("spend|") and v} == {
        "spend|High": 2}
    # The views show the catalogue's schemes only.
    from stream.queries import segments_doc

    shown = asyncio.run(segments_doc(h.s, None, h.store, one.schemes))  # type: ignore[arg-type]
    assert set(shown["schemes"]) == {"tier"}
    assert set(asyncio.run(segments_doc(h.s, None, h.store))["schemes"]) == {  # type: ignore
        "tier", "spend"}


def _chains_in_topic_order(migrations: list[dict[str, Any]]) -> bool:
    last: dict[tuple[str, str], str | None] = {}
    for m in migrations:
        k = (m["customer_id"], m["scheme"])
        if last.get(k) != m["from_segment"]:
            return False
        last[k] = m["to_segment"]
    return True


def test_migrations_left_by_a_timed_out_commit_are_published_before_newer_ones() -> None:
    h = Harness(load_catalogue(SPEND_RULES % {"dwell": 0, "hyst": ""}))
    h.buy([("c1", T0, 10.0)])  # null -> Low
    h.store.fail_next_commit_after_apply = True  # applied, but the reply is lost
    h.buy([("c1", T0 + DAY, 200.0)])  # Low -> High waits in the stored outbox
    h.buy([("c1", T0 + 20 * DAY, 1.0)])  # High -> Low, a newer move of the same customer
    moves = [(m["from_segment"], m["to_segment"]) for m in h.sink.migrations()]
    assert moves == [(None, "Low"), ("Low", "High"), ("High", "Low")]
    assert _chains_in_topic_order(h.sink.migrations())
    assert not h.store.outboxes.get(0)


def test_a_new_owner_publishes_what_the_previous_one_left_first() -> None:
    h = Harness(load_catalogue(SPEND_RULES % {"dwell": 0, "hyst": ""}))
    h.buy([("c1", T0, 10.0)])
    failing = h.sink.publish

    async def broker_down(records: Any) -> None:
        raise ConnectionError("broker unreachable")

    h.sink.publish = broker_down  # type: ignore[method-assign]
    h.buy([("c1", T0 + DAY, 200.0)])  # committed, not published
    h.sink.publish = failing  # type: ignore[method-assign]
    # Another worker takes the partition over with the same store.
    new = BatchProcessor(h.s, h.store, h.sink, clock=lambda: WALL, scoring=h.scoring)
    h.p = new
    h.buy([("c1", T0 + 20 * DAY, 1.0)])
    assert _chains_in_topic_order(h.sink.migrations())
    assert [m["to_segment"] for m in h.sink.migrations()] == ["Low", "High", "Low"]


@settings(max_examples=300, deadline=None)
@given(t=st.floats(0, 1e5, allow_subnormal=False), share=st.floats(0.001, 1.0),
       busy=st.booleans())
def test_busy_sweeps_take_at_most_their_share_of_the_time(t: float, share: float,
                                                          busy: bool) -> None:
    sw = Sweeper(None, None, None, asyncio.Lock(),  # type: ignore[arg-type]
                 busy=lambda: busy, max_share=share)
    pause = sw.pause_after(t)
    if not busy or share == 1.0:
        assert pause == 0.0
    elif t > 0:
        assert t / (t + pause) <= share * (1 + 1e-9)


def test_a_busy_worker_paces_its_sweep_and_an_idle_one_does_not() -> None:
    for busy in (True, False):
        h = Harness(default_catalogue())
        h.buy([(f"c{i}", T0 + i, 10.0) for i in range(450)])
        h.restart()
        h.sweeper.busy, h.sweeper.max_share = (lambda b=busy: b), 0.25
        steps: list[tuple[float, float]] = []
        real = h.sweeper.pause_after

        def record(chunk_s: float, real=real, steps=steps) -> float:
            steps.append((chunk_s, real(chunk_s)))
            return steps[-1][1]

        h.sweeper.pause_after = record  # type: ignore[method-assign]
        t0 = time.perf_counter()
        stats = asyncio.run(h.sweeper.run_pass(range(h.s.partitions)))
        wall = time.perf_counter() - t0
        assert stats.customers == 450
        # Steps of at most 200 customers, and of at most BUSY_CHUNK while input arrives.
        assert len(steps) >= (math.ceil(450 / BUSY_CHUNK) if busy else 3)
        work = sum(c for c, _ in steps)
        if busy:
            assert all(p == pytest.approx(3 * c) for c, p in steps)
            assert wall >= 4 * work * 0.99  # sweeping was at most a quarter of the time
        else:
            assert all(p == 0.0 for _, p in steps)
            assert wall < 4 * work


def test_a_first_batch_is_ranked_with_itself_not_against_an_empty_sketch() -> None:
    """RFM ranks a customer among all purchasing customers, themselves included. Scored
    against the sketch as committed before the batch, every customer of a replay's first
    batch had no RFM score (an empty sketch), became a Prospect despite their purchases and
    was then held there by the minimum dwell, whatever the sweeps computed afterwards."""
    h = Harness(default_catalogue())
    h.buy([(f"c{i}", T0 + i * DAY, 10.0 * (i + 1)) for i in range(10)])
    h.sweep()
    last = {m["customer_id"]: m for m in h.sink.migrations() if m["scheme"] == "rfm"}
    assert sorted(last) == sorted(f"c{i}" for i in range(10))
    for i in range(10):
        m = last[f"c{i}"]
        # i customers bought longer ago and spent less; everyone bought on one day
        assert m["scores"]["rfm"] == f"{1 + i // 2}1{1 + i // 2}", m["customer_id"]
        assert m["to_segment"] != "Prospects", m["customer_id"]


def test_each_sweep_step_reports_its_customers_and_the_time_it_held_the_lock() -> None:
    h = Harness(default_catalogue())
    h.buy([(f"c{i}", T0 + i, 10.0) for i in range(450)])
    h.restart()
    h.sweeper.busy = lambda: True
    steps: list[tuple[int, float]] = []
    h.sweeper.on_step = lambda n, s: steps.append((n, s))
    held: list[bool] = []
    real_step = h.sweeper._step

    async def step(*args: Any) -> str:
        held.append(h.sweeper.lock.locked())
        return await real_step(*args)

    h.sweeper._step = step  # type: ignore[method-assign]
    stats = asyncio.run(h.sweeper.run_pass(range(h.s.partitions)))
    assert stats.customers == 450
    assert sum(n for n, _ in steps) == 450
    assert len(steps) == len(held) >= math.ceil(450 / BUSY_CHUNK)
    assert all(0 < n <= BUSY_CHUNK and s > 0 for n, s in steps)
    assert all(held)  # every step ran under the batch lock


def test_busy_sweep_steps_shrink_to_what_fits_their_time_when_customers_cost_more() -> None:
    """A catalogue or a Redis that makes each customer cost more must not make a busy
    step hold the batch lock longer: steps are sized by their measured cost."""
    h = Harness(default_catalogue())
    h.buy([(f"c{i}", T0 + i, 10.0) for i in range(300)])
    h.restart()
    h.sweeper.busy = lambda: True
    h.sweeper.max_share = 1.0  # no pauses: only the step sizes matter here
    per_customer = 0.004
    real_score = h.p.score

    def slow_score(inputs: Any, ctx: Any) -> Any:
        time.sleep(per_customer * len(inputs))
        return real_score(inputs, ctx)

    h.p.score = slow_score  # type: ignore[method-assign]
    steps: list[tuple[int, float]] = []
    h.sweeper.on_step = lambda n, s: steps.append((n, s))
    stats = asyncio.run(h.sweeper.run_pass(range(h.s.partitions)))
    assert stats.customers == 300 and sum(n for n, _ in steps) == 300
    assert steps[0][0] == BUSY_CHUNK  # nothing measured yet
    fit = int(BUSY_STEP_S / per_customer)
    assert all(MIN_BUSY_CHUNK <= n <= fit for n, _ in steps[1:-1]), [n for n, _ in steps]
    later = [sec for _, sec in steps[1:]]
    # Each later step held the lock far less (the median: one step descheduled on a busy
    # machine must not fail this; unshrunk steps would each hold it as long as the first).
    assert statistics.median(later) < steps[0][1] / 2


def test_the_busy_step_size_follows_the_running_cost_within_its_bounds() -> None:
    sw = Sweeper(None, None, None, asyncio.Lock())  # type: ignore[arg-type]
    assert sw.busy_step() == BUSY_CHUNK
    sw.cost_per_customer = 1e-6
    assert sw.busy_step() == BUSY_CHUNK
    sw.cost_per_customer = BUSY_STEP_S / 10
    assert sw.busy_step() == 10
    sw.cost_per_customer = 10.0
    assert sw.busy_step() == MIN_BUSY_CHUNK
    sw.cost_per_customer = 0.0
    sw._observe_cost(10, 0.05)
    assert sw.cost_per_customer == pytest.approx(0.005)
    sw._observe_cost(10, 100.0)  # waited out an outage: counts as PACED_STEP_MAX_S at most
    assert sw.cost_per_customer <= 0.005 * 0.7 + 0.3 * PACED_STEP_MAX_S / 10 + 1e-12


def test_a_sweep_step_that_fails_to_commit_retries_without_holding_the_lock() -> None:
    from features.store import StoreUnavailable

    h = Harness(default_catalogue())
    h.buy([(f"c{i}", T0 + i, 10.0) for i in range(5)])
    h.scoring.catalogue = load_catalogue(SPEND_RULES % {"dwell": 0, "hyst": ""})
    real_commit = h.store.commit
    failures = [1]
    locked_during_pause: list[bool] = []

    async def commit(commits: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise StoreUnavailable("down for a moment")
        return await real_commit(commits)

    async def pause() -> None:
        locked_during_pause.append(h.sweeper.lock.locked())

    h.store.commit = commit  # type: ignore[method-assign]
    h.sweeper.retry_pause = pause  # type: ignore[method-assign]
    steps: list[tuple[int, float]] = []
    h.sweeper.on_step = lambda n, s: steps.append((n, s))
    stats = asyncio.run(h.sweeper.run_pass(range(h.s.partitions)))
    assert failures == [0] and locked_during_pause == [False]
    assert [n for n, _ in steps] == [5, 5]  # the failed attempt, then the committed one
    assert stats.customers == 10
    assert h.sink.migrations()  # the retried chunk was committed and published


RANK_RULES = """
schemes:
  rank:
    segments:
      - {name: Top, when: "rfm_m >= 4"}
    fallback: Rest
"""


def _sweep_after_the_population_moved(restart: bool) -> tuple[Any, Harness]:
    h = Harness(load_catalogue(RANK_RULES))
    h.buy([(f"a{i}", T0 + i, 10.0 + i) for i in range(200)])
    # Later the same day, big spenders push the M quintiles up: some of the first
    # customers leave Top without an event of their own.
    h.buy([(f"b{i}", T0 + 3_600_000 + i, 500.0 + i) for i in range(120)])
    if restart:
        h.restart()
    before = len(h.sink.migrations())
    stats = asyncio.run(h.sweeper.run_pass(range(h.s.partitions)))
    return (stats, h.sink.migrations()[before:]), h


def test_a_sweep_passes_over_current_customers_and_decides_as_a_full_one() -> None:
    (skipping, moved), h = _sweep_after_the_population_moved(restart=False)
    (full, moved_full), h_full = _sweep_after_the_population_moved(restart=True)
    key = [(m["customer_id"], m["from_segment"], m["to_segment"], m["migration_id"])
           for m in moved]
    assert key == [(m["customer_id"], m["from_segment"], m["to_segment"], m["migration_id"])
                   for m in moved_full]
    assert key and all(m["to_segment"] == "Rest" for m in moved)  # the population moved them
    assert full.customers == 320 and full.skipped == 0
    # Only customers the new sketch ranks elsewhere were evaluated again.
    assert skipping.customers + skipping.skipped == 320
    assert len(moved) <= skipping.customers < 320 // 2
    segs = {c: p for (_, c), p in h.store.profiles.items()}
    segs_full = {c: p for (_, c), p in h_full.store.profiles.items()}
    from scorers.profile import Profile

    assert {c: Profile.from_bytes(b).segments for c, b in segs.items()} == \
        {c: Profile.from_bytes(b).segments for c, b in segs_full.items()}
    # A second pass finds every customer current.
    again = asyncio.run(h.sweeper.run_pass(range(h.s.partitions)))
    assert again.customers == 0 and again.skipped == 320


def test_a_customer_whose_minimum_dwell_ends_today_is_not_current() -> None:
    from scorers.profile import Profile
    from scorers.scoring import ScoringContext, is_current

    cat = load_catalogue(SPEND_RULES % {"dwell": 2, "hyst": ""})
    now = T0 + 10 * DAY + 5 * 3_600_000
    ctx = ScoringContext(now_ms=now, wall_ms=0, lateness_ms=0, catalogue=cat,
                         context_key="k")
    entered = {"before": now - 2 * DAY - 60_000,  # the dwell ended a minute ago
               "later": now - 2 * DAY + 60_000,  # it ends in a minute: held still
               "yesterday": now - 3 * DAY}  # ended yesterday: a day's sweep saw it
    want = {"before": False, "later": True, "yesterday": True}
    for name, since in entered.items():
        p = Profile(segments={"spend": ("High", since)}, context="k", context_day=ctx.today)
        assert is_current(p, ctx) is want[name], name
    assert not is_current(Profile(segments={"spend": ("High", T0)}, context="other",
                                  context_day=ctx.today), ctx)
    # a mark of another engine day is never current
    assert not is_current(Profile(segments={"spend": ("High", T0)}, context="k",
                                  context_day=ctx.today - 1), ctx)
    assert not is_current(Profile(), ScoringContext(now_ms=now, wall_ms=0, lateness_ms=0))


def test_an_unchanged_profile_is_written_for_its_mark_only_when_it_must_be() -> None:
    """A mark of the same engine day must stay true (else it vouches for an older state);
    one of an earlier day is renewed live, but not while a replay rolls through its days."""
    from scorers.profile import Profile
    from scorers.scoring import ScoringContext, _mark

    now = T0 + 10 * DAY
    day = now // DAY
    live = ScoringContext(now_ms=now, wall_ms=now + 60_000, lateness_ms=0, context_key="k")
    replay = ScoringContext(now_ms=now, wall_ms=now + 400 * DAY, lateness_ms=0,
                            context_key="k")
    same = Profile(context="k", context_day=day, rfm_score="345")
    assert not _mark(same, live, "345") and not _mark(same, replay, "345")
    assert _mark(same, live, "355") and _mark(same, replay, "355")  # same day: kept true
    assert _mark(Profile(context="old", context_day=day, rfm_score="345"), replay, "345")
    earlier = Profile(context="k", context_day=day - 1, rfm_score="345")
    assert _mark(earlier, live, "345") and not _mark(earlier, replay, "345")
    unknown = ScoringContext(now_ms=now, wall_ms=now, lateness_ms=0)
    assert not _mark(earlier, unknown, "345")


def test_a_held_customer_moves_when_the_minimum_dwell_ends_within_the_engine_day() -> None:
    """A pass over a partition follows a new engine day or new scoring inputs; a minimum
    dwell ending later in the day waited for the next day's pass (23 hours of engine time
    late) and `segstream wait` called the segments settled meanwhile. The sweeper times
    each dwell's end and evaluates the customer once engine time reaches it."""
    cat = load_catalogue(SPEND_RULES % {"dwell": 2, "hyst": ""})
    h = Harness(cat, partitions=2)
    hour = 3_600_000
    parts = range(h.s.partitions)

    def moves() -> list[tuple[str, str]]:
        return [(m["to_segment"], m["at"]) for m in h.sink.migrations()
                if m["customer_id"] == "c1"]

    h.buy([("c1", T0 + 5 * hour, 20.0)])  # placed in Low at 05:00
    h.buy([("c1", T0 + 6 * hour, 100.0)])  # 7-day spend 120: High, held in Low for 2 days
    h.sweep()
    h.click("o1", T0 + 2 * DAY + 4 * hour)  # day 2, 04:00: held for another hour
    h.sweep()  # the new day's pass
    asyncio.run(h.sweeper.run_held(parts))
    assert moves() == [("Low", "2025-01-01T05:00:00.000Z")]
    h.click("o1", T0 + 2 * DAY + 6 * hour)  # 06:00: the dwell ended an hour ago
    assert asyncio.run(h.sweeper.due(parts)) == []  # same day, same population: no pass
    stats = asyncio.run(h.sweeper.run_held(parts))
    assert stats.customers == 1 and stats.migrations == 1
    assert moves() == [("Low", "2025-01-01T05:00:00.000Z"),
                       ("High", "2025-01-03T06:00:00.000Z")]
    # evaluated once: nothing is due any more, and the partitions are marked swept again
    assert asyncio.run(h.sweeper.run_held(parts)).customers == 0
    assert all(h.store.swept.get(p) == h.sweeper.swept[p] for p in parts)


def test_the_dwell_timer_keeps_each_customers_earliest_future_end_only() -> None:
    """A move starts one dwell; the customer's other schemes' dwells that ended long ago
    schedule nothing, and a customer is evaluated once for their earliest end (that
    evaluation notes the later ones again), not once per end ever noted."""
    from scorers.profile import Profile

    cat = load_catalogue("""
schemes:
  a:
    anti_flapping: {min_dwell_days: 2}
    segments: [{name: A1, when: "spend_7d >= 1"}]
    fallback: A0
  b:
    anti_flapping: {min_dwell_days: 5}
    segments: [{name: B1, when: "spend_7d >= 1"}]
    fallback: B0
""")
    sw = Harness(cat).sweeper
    now = T0 + 10 * DAY
    sw.note_held(0, "c", Profile(segments={"a": ("A1", T0), "b": ("B1", now)}))
    assert sw.held_next[0] == {"c": now + 5 * DAY}
    sw.note_held(0, "c", Profile(segments={"a": ("A1", now - DAY), "b": ("B1", now)}), now)
    assert sw.held_next[0] == {"c": now + DAY}
    sw.note_held(0, "gone", Profile(segments={"a": ("Unknown", now)}), now)  # not a segment
    assert sw._pop_held(0, now + DAY - 1) == []
    assert sw._pop_held(0, now + DAY) == ["c"]
    assert sw._pop_held(0, now + 10 * DAY) == []  # the later entry was superseded
    assert sw.held_next[0] == {}


SHORT_DWELL = """
schemes:
  busy:
    anti_flapping: {min_dwell_days: 0.25}
    segments: [{name: Busy, when: "events_1d >= 2"}]
    fallback: Calm
"""


def test_a_dwell_shorter_than_a_day_is_timed_from_the_move_itself() -> None:
    """A dwell of a day or more ends on a later engine day, whose pass notes it; a shorter
    one may end before any pass reads the customer, so the move itself is noted."""
    cat = load_catalogue(SHORT_DWELL)
    h = Harness(cat)
    hour = 3_600_000
    parts = range(h.s.partitions)
    h.click("o1", T0 + 4 * hour)
    h.sweep()  # every partition swept with this day's inputs
    h.click("c1", T0 + 5 * hour)  # placed in Calm: held until 11:00
    h.click("c1", T0 + 6 * hour)  # two events today: Busy, but held
    h.click("o1", T0 + 12 * hour)
    assert asyncio.run(h.sweeper.due(parts)) == []  # same day and population: no pass
    asyncio.run(h.sweeper.run_held(parts))
    moves = [(m["to_segment"], m["at"]) for m in h.sink.migrations()
             if m["customer_id"] == "c1"]
    assert moves == [("Calm", "2025-01-01T05:00:00.000Z"),
                     ("Busy", "2025-01-01T12:00:00.000Z")]


def _held_in_calm(partitions: int = 1) -> Harness:
    """c1 placed in Calm at 05:00 (held until 11:00), wanting Busy from 06:00."""
    h = Harness(load_catalogue(SHORT_DWELL), partitions=partitions)
    hour = 3_600_000
    h.click("o1", T0 + 4 * hour)
    h.sweep()
    h.click("c1", T0 + 5 * hour)
    h.click("c1", T0 + 6 * hour)
    return h


def test_a_pass_that_moves_a_held_customer_times_the_dwell_it_starts() -> None:
    """The end a customer was noted with was kept while a later one came (only an earlier
    end replaced it), and the pass then dropped it as covered: a customer moved by a pass
    had no end timed for the dwell that move started."""
    h = _held_in_calm()
    hour = 3_600_000
    h.buy([("o2", T0 + 12 * hour, 50.0)])  # engine time 12:00, new RFM thresholds
    parts = range(h.s.partitions)
    assert asyncio.run(h.sweeper.due(parts))
    assert asyncio.run(h.sweeper.run_held(parts)).customers == 0  # left to the pass
    h.sweep()  # moves c1 to Busy at 12:00: a dwell until 18:00
    assert [m["to_segment"] for m in h.sink.migrations() if m["customer_id"] == "c1"] == [
        "Calm", "Busy"]
    assert h.sweeper.held_next[0]["c1"] == T0 + 18 * hour


def test_a_timer_run_that_fails_leaves_its_partition_to_the_next_pass() -> None:
    """Its customers' ends are already taken from the timer and the partition is marked
    held: a failure (Redis down, say) must not leave it so until the next day."""
    from features.store import StoreUnavailable

    h = _held_in_calm()
    parts = range(h.s.partitions)
    h.click("o1", T0 + 12 * 3_600_000)
    assert asyncio.run(h.sweeper.due(parts)) == []

    async def down(*args: Any) -> bool:
        raise StoreUnavailable("redis read failed")

    h.sweeper._chunk = down  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        asyncio.run(h.sweeper.run_held(parts))
    assert h.store.swept[0] == "held" and 0 not in h.sweeper.swept
    del h.sweeper._chunk
    assert asyncio.run(h.sweeper.due(parts)) == [0]
    h.sweep()
    assert [m["to_segment"] for m in h.sink.migrations() if m["customer_id"] == "c1"] == [
        "Calm", "Busy"]
    assert h.store.swept[0] == h.sweeper.swept[0] != "held"


def test_a_partition_revoked_during_a_pass_is_not_marked_by_it() -> None:
    """The pass ends after the partition left: marking it would tell a later return of
    the partition (and `segstream wait`) that it was swept with what the next owner did
    meanwhile unseen."""
    h = _held_in_calm()
    parts = range(h.s.partitions)
    h.buy([("o2", T0 + 12 * 3_600_000, 50.0)])
    before = h.store.swept.get(0)
    real = h.sweeper._chunk

    async def revoked_midway(*args: Any) -> bool:
        h.sweeper.forget([0])
        return await real(*args)

    h.sweeper._chunk = revoked_midway  # type: ignore[method-assign]
    asyncio.run(h.sweeper.run_pass(parts))
    assert 0 not in h.sweeper.swept and h.store.swept.get(0) == before

