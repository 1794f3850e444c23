"""Property tests of the incremental feature state against an independent batch oracle.

The oracle (:func:`oracle`) recomputes every contract feature from the raw list of
events with pandas group-bys and filters; it never calls into ``features.state``.
The incremental state is then fed the same events in arbitrary batch splits (one
by one, random consecutive chunks, with encode/decode round trips between
chunks) and must always produce exactly the oracle's features.

Event sequences respect the lateness rule: every event's timestamp is at least
the largest timestamp seen so far across *all* customers minus ``lateness_ms``
(the contract); about half the examples use the engine's weaker per-topic rule
instead (clicks and transactions each judged against their own running maximum,
see stream/pipeline.py), which also contains every contract sequence. Duplicates
re-emit an earlier event verbatim (and so respect the rule too).

Run with ``--hypothesis-show-statistics`` to see how often spans exceed 200 days
and old purchase days get folded.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pandas as pd
import pytest
from feature_oracle import assert_features_equal, oracle
from feature_oracle import iso_ms as _iso
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from features.events import (
    FEATURE_USE,
    LOGIN,
    MS_PER_DAY,
    SUPPORT_TICKET,
    ClickEvent,
    Event,
    TransactionEvent,
    day_of,
    from_units,
    id_hash,
)
from features.serial import decode, encode
from features.state import (
    DEFAULT_LATENESS_MS,
    FEATURE_NAMES,
    CustomerState,
    apply,
    apply_many,
    derive,
    empty,
    retention_days,
)

# ---------------------------------------------------------------------------------------
# Checks against the independent batch oracle (tests/feature_oracle.py)
# ---------------------------------------------------------------------------------------


def check_all(states: dict[str, CustomerState], events: list[Event], now_ms: int,
              ctx: str = "") -> None:
    """Every customer's derived features equal the oracle's at ``now_ms``."""
    want = oracle(events, now_ms, CUSTOMERS)
    for cid in CUSTOMERS:
        got = derive(states.get(cid, empty()), now_ms)
        assert_features_equal(got, want[cid], f"{ctx} customer={cid} now={now_ms}")


# ---------------------------------------------------------------------------------------
# Event-sequence generators
# ---------------------------------------------------------------------------------------

CUSTOMERS = ("alice", "bob", "carol")
EVENT_TYPES = (LOGIN, FEATURE_USE, SUPPORT_TICKET, "page_view", "search", "add_to_cart")
LATENESSES = (
    0,
    MS_PER_DAY * 3 // 2,  # 1.5 days: not a whole number of days
    DEFAULT_LATENESS_MS,
    30 * MS_PER_DAY,
    200 * MS_PER_DAY,
)
#: Day offsets around every window edge (1, 7, 30, 56 = 8 weeks, 90 days).
EDGE_DAYS = (0, 1, 2, 6, 7, 8, 13, 14, 28, 29, 30, 31, 48, 49, 55, 56, 57, 88, 89, 90, 91)

time_of_day = st.one_of(
    st.sampled_from([0, 1, 999, 1_000, MS_PER_DAY // 2, MS_PER_DAY - 1_000, MS_PER_DAY - 1]),
    st.integers(0, MS_PER_DAY - 1),
)
amounts = st.one_of(st.sampled_from([0, 1, 9_999, 10_000, 123_456]), st.integers(0, 10**9))
session_ids = st.one_of(st.none(), st.integers(0, 40).map(lambda i: f"sess-{i}"))


def _stream(e: Event) -> str:
    return "click" if isinstance(e, ClickEvent) else "txn"


@st.composite
def new_event(draw: st.DrawFn, eid: int, ts: int, stream: str,
              customers: tuple[str, ...]) -> Event:
    cid = draw(st.sampled_from(customers))
    if stream == "click":
        return ClickEvent(f"e{eid}", cid, ts, draw(st.sampled_from(EVENT_TYPES)),
                          draw(session_ids))
    kind = draw(st.sampled_from(["purchase", "purchase", "refund"]))
    return TransactionEvent(f"e{eid}", cid, ts, draw(amounts), kind)


@st.composite
def event_sequences(
    draw: st.DrawFn,
    lateness_ms: int,
    *,
    customers: tuple[str, ...] = CUSTOMERS,
    max_segments: int = 4,
    max_segment_events: int = 12,
    long_span: bool = False,
    per_topic: bool = False,
) -> list[Event]:
    """A sequence of events in arrival order that respects the lateness rule.

    By default the rule is the contract's: no event is more than ``lateness_ms``
    behind the largest timestamp seen so far across all customers and kinds. With
    ``per_topic`` the rule is the engine's per-topic-partition check instead:
    clicks and transactions each have their own running maximum (so one stream may
    run far ahead of the other, and a stream's first event may be much older than
    everything else) -- a superset of the default sequences.

    The sequence is made of segments separated by forward jumps of an anchor time
    (up to 400 days, so windows slide and old day buckets are pruned); inside a
    segment events land on the anchor, move forward a little, arrive late (up to
    exactly ``lateness_ms``), land on day starts/ends or on the day of an earlier
    event (clamped to the lateness limit), or re-emit an earlier event verbatim.
    With ``long_span`` the first jump is 200 to 600 days.
    """
    L = lateness_ms

    def key(stream: str) -> str:
        return stream if per_topic else "all"

    events: list[Event] = []
    his: dict[str, int] = {}  # running max per lateness scope
    anchor = draw(st.integers(10_957, 47_000)) * MS_PER_DAY + draw(time_of_day)  # 2000..2098
    n_segments = draw(st.integers(2 if long_span else 1, max_segments))
    for seg in range(n_segments):
        if seg > 0:
            if long_span and seg == 1:
                jump = draw(st.integers(200, 600))
            else:
                jump = draw(st.one_of(st.sampled_from((*EDGE_DAYS[1:], 120, 201, 250)),
                                      st.integers(1, 400)))
            anchor = (day_of(anchor) + jump) * MS_PER_DAY + draw(time_of_day)
        for i in range(draw(st.integers(1, max_segment_events))):
            stream = "txn" if long_span and not events else draw(
                st.sampled_from(["click", "click", "click", "txn", "txn"]))
            hi = his.get(key(stream))
            mode = "anchor" if i == 0 else draw(st.sampled_from(
                ["anchor", "forward", "forward", "same_day", "late", "late", "late_edge",
                 "day_start", "day_end", "revisit", "revisit", "dup", "dup"]))
            if mode == "dup":
                eligible = [e for e in events if e.ts_ms >= his[key(_stream(e))] - L]
                if eligible:
                    events.append(draw(st.sampled_from(eligible)))
                    continue
                mode = "anchor"
            if mode == "anchor":
                ts = anchor
            elif hi is None:
                # The first event of its scope: nothing to be late against.
                ts = anchor - draw(st.integers(0, 300)) * MS_PER_DAY
            elif mode == "forward":
                ts = (day_of(hi) + draw(st.integers(0, 3))) * MS_PER_DAY + draw(time_of_day)
            elif mode == "same_day":
                ts = day_of(hi) * MS_PER_DAY + draw(time_of_day)
            elif mode == "late":
                ts = hi - draw(st.integers(0, L))
            elif mode == "late_edge":
                ts = hi - L
            elif mode == "revisit":  # another event on the (UTC) day of an earlier one
                ts = day_of(draw(st.sampled_from(events)).ts_ms) * MS_PER_DAY + draw(time_of_day)
            elif mode == "day_start":
                ts = (day_of(hi) - draw(st.integers(0, L // MS_PER_DAY + 1))) * MS_PER_DAY
            else:  # day_end
                ts = (day_of(hi) - draw(st.integers(0, L // MS_PER_DAY + 1))) * MS_PER_DAY - 1
            if hi is not None:
                ts = max(ts, hi - L)  # never later than the engine accepts
            his[key(stream)] = ts if hi is None else max(hi, ts)
            events.append(draw(new_event(len(events), ts, stream, customers)))
    return events


@st.composite
def now_after(draw: st.DrawFn, events: list[Event]) -> int:
    """An engine time ``>=`` every event: at the newest event, at the end of its day,
    on a window edge of some event's day, or much later."""
    hi = max(e.ts_ms for e in events)
    mode = draw(st.sampled_from(["hi", "end_of_day", "edge", "edge", "later"]))
    if mode == "hi":
        return hi
    if mode == "end_of_day":
        return day_of(hi) * MS_PER_DAY + MS_PER_DAY - 1
    if mode == "edge":
        anchor = draw(st.sampled_from(events))
        d = day_of(anchor.ts_ms) + draw(st.sampled_from(EDGE_DAYS))
        return max(hi, d * MS_PER_DAY + draw(time_of_day))
    return hi + draw(st.integers(0, 400 * MS_PER_DAY))


def feed(states: dict[str, CustomerState], chunk: list[Event], lateness_ms: int) -> None:
    """Route a chunk to the customers' states the way the pipeline does (apply_many)."""
    by_customer: dict[str, list[Event]] = {}
    for e in chunk:
        by_customer.setdefault(e.customer_id, []).append(e)
    for cid, evs in by_customer.items():
        states[cid] = apply_many(states.get(cid, empty()), evs, lateness_ms)


def roundtrip(states: dict[str, CustomerState]) -> dict[str, CustomerState]:
    return {cid: decode(encode(s)) for cid, s in states.items()}


def prop(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        # no "explain" phase: it re-runs a failing example ~100 times (minutes here)
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


def test_oracle_covers_every_feature_name() -> None:
    e = [TransactionEvent("t", "alice", 5 * MS_PER_DAY, 10_000),
         ClickEvent("c", "alice", 5 * MS_PER_DAY, LOGIN, "s")]
    want = oracle(e, 6 * MS_PER_DAY, CUSTOMERS)
    assert set(want) == set(CUSTOMERS)
    for feats in want.values():
        assert set(feats) == set(FEATURE_NAMES)
    assert tuple(derive(empty(), 0)) == FEATURE_NAMES


def test_oracle_takes_ids_per_customer_and_topic() -> None:
    """README: ids are a customer's, per input topic. The same id on a click and a purchase
    of one customer, or on two customers' purchases, names different events."""
    M = MS_PER_DAY
    events: list[Event] = [ClickEvent("e1", "alice", 5 * M, LOGIN, "s"),
                           TransactionEvent("e1", "alice", 5 * M + 1, 100_000),
                           TransactionEvent("e1", "bob", 5 * M + 2, 50_000),
                           TransactionEvent("e1", "bob", 5 * M + 2, 50_000)]  # redelivery
    want = oracle(events, 6 * M)
    assert (want["alice"]["purchases_total"], want["alice"]["events_total"]) == (1, 1)
    assert (want["bob"]["purchases_total"], want["bob"]["monetary_total"]) == (1, 5.0)
    for cid in ("alice", "bob"):
        mine = [e for e in events if e.customer_id == cid]
        assert_features_equal(derive(apply_many(empty(), mine), 6 * M), want[cid])


def test_oracle_hand_computed_example() -> None:
    """Pin the oracle itself to hand-computed values so both sides can't drift together."""
    d = 20_000
    M = MS_PER_DAY
    events: list[Event] = [
        TransactionEvent("p1", "alice", d * M + 5, 100_000),  # day d: +10
        TransactionEvent("r0", "alice", (d + 1) * M, 30_000, "refund"),  # refund-only day
        TransactionEvent("p2", "alice", (d + 3) * M, 50_000),  # day d+3: +5 -1 = 4
        TransactionEvent("r1", "alice", (d + 3) * M + 9, 10_000, "refund"),
        TransactionEvent("p3", "alice", (d + 3) * M + 10, 0),
        TransactionEvent("p4", "alice", (d + 9) * M - 1, 20_000),  # day d+8: +2
        TransactionEvent("p4", "alice", (d + 9) * M - 1, 20_000),  # duplicate
        ClickEvent("c1", "alice", (d + 2) * M, LOGIN, "s1"),
        ClickEvent("c2", "alice", (d + 9) * M, "page_view", "s1"),
        ClickEvent("c3", "alice", (d + 9) * M + 1, FEATURE_USE, None),
        ClickEvent("c4", "alice", (d + 9) * M + 2, SUPPORT_TICKET, "s2"),
    ]
    now = (d + 9) * M + 12 * 3_600_000
    f = oracle(events, now)["alice"]
    assert f["first_seen_at"] == _iso(d * M + 5) == "2024-10-04T00:00:00.005Z"
    assert f["tenure_days"] == 9
    assert (f["purchases_total"], f["refunds_total"], f["purchase_days"]) == (4, 2, 3)
    assert f["monetary_total"] == 13.0
    assert f["recency_days"] == 1
    assert (f["purchases_7d"], f["spend_7d"]) == (3, 6.0)  # days d+3..d+9
    assert (f["purchases_30d"], f["spend_30d"]) == (4, 13.0)
    assert (f["bgnbd_frequency"], f["bgnbd_recency"], f["bgnbd_T"]) == (2, 8, 9)
    assert f["bgnbd_monetary"] == 3.0  # mean(4, 2)
    assert f["last_event_at"] == "2024-10-13T00:00:00.002Z"
    assert f["days_since_last_event"] == 0
    assert (f["events_total"], f["events_1d"], f["events_7d"], f["events_30d"]) == (4, 3, 3, 4)
    assert (f["sessions_7d"], f["sessions_30d"]) == (2, 2)
    assert (f["active_days_7d"], f["active_days_30d"]) == (1, 2)
    assert (f["logins_7d"], f["logins_30d"]) == (0, 1)
    assert (f["feature_uses_30d"], f["support_tickets_30d"]) == (1, 1)
    assert f["distinct_event_types_30d"] == 4
    # weeks: k=7 covers d+3..d+9 (3 clicks), k=6 covers d-4..d+2 (1 click)
    y = [0, 0, 0, 0, 0, 0, 1, 3]
    xm, ym = 3.5, sum(y) / 8
    slope = sum((x - xm) * (v - ym) for x, v in enumerate(y)) / sum((x - xm) ** 2
                                                                   for x in range(8))
    assert math.isclose(f["activity_trend_8w"], slope)
    assert_features_equal(derive(apply_many(empty(), events), now), f)


def test_oracle_bgnbd_matches_lifetimes_convention() -> None:
    """The oracle's BG/NBD inputs follow lifetimes' summary_data_from_transaction_data."""
    lifetimes_utils = pytest.importorskip("lifetimes.utils")
    rng = np.random.default_rng(7)
    events: list[Event] = []
    for cid in CUSTOMERS:
        days = rng.choice(np.arange(20_000, 20_200), size=int(rng.integers(1, 12)))
        for i, d in enumerate(days):
            ts = int(d) * MS_PER_DAY + int(rng.integers(0, MS_PER_DAY))
            events.append(TransactionEvent(f"{cid}{i}", cid, ts, int(rng.integers(0, 10**7))))
    now = 20_250 * MS_PER_DAY + 77
    tx = pd.DataFrame({
        "cid": [e.customer_id for e in events],
        "date": pd.to_datetime([e.ts_ms for e in events], unit="ms"),
        "m": [from_units(e.amount_units) for e in events],
    })
    summary = lifetimes_utils.summary_data_from_transaction_data(
        tx, "cid", "date", monetary_value_col="m",
        observation_period_end=pd.Timestamp(now, unit="ms"), freq="D")
    want = oracle(events, now)
    for cid in CUSTOMERS:
        row = summary.loc[cid]
        assert want[cid]["bgnbd_frequency"] == row["frequency"]
        assert want[cid]["bgnbd_recency"] == row["recency"]
        assert want[cid]["bgnbd_T"] == row["T"]
        assert math.isclose(want[cid]["bgnbd_monetary"], row["monetary_value"], rel_tol=1e-9,
                            abs_tol=1e-9)


@pytest.mark.parametrize("lateness_ms", LATENESSES)
@prop(40)
@given(data=st.data())
def test_any_chunking_with_roundtrips_matches_oracle(lateness_ms: int, data: st.DataObject
                                                     ) -> None:
    """Random consecutive chunks fed to apply_many, with random encode/decode round trips
    between chunks, match the oracle after every chunk and at later engine times."""
    per_topic = data.draw(st.booleans(), label="per_topic")
    events = data.draw(event_sequences(lateness_ms, per_topic=per_topic), label="events")
    n = len(events)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=6), label="cuts")) \
        if n > 1 else []
    bounds = [0, *cuts, n]
    rts = data.draw(st.lists(st.booleans(), min_size=len(bounds) - 1,
                             max_size=len(bounds) - 1), label="roundtrips")
    states: dict[str, CustomerState] = {}
    for (a, b), rt in zip(pairwise(bounds), rts, strict=True):
        feed(states, events[a:b], lateness_ms)
        if rt:
            states = roundtrip(states)
        seen = events[:b]
        check_all(states, seen, max(e.ts_ms for e in seen), f"after chunk [{a}:{b}]")
    for now in data.draw(st.lists(now_after(events), min_size=1, max_size=3), label="nows"):
        check_all(states, events, now, "final")
    span = day_of(max(e.ts_ms for e in events)) - day_of(min(e.ts_ms for e in events))
    event(f"span>200d: {span > 200}")


@pytest.mark.parametrize("lateness_ms", LATENESSES)
@prop(25)
@given(data=st.data())
def test_one_by_one_apply_matches_oracle(lateness_ms: int, data: st.DataObject) -> None:
    """Each event through apply() on its own (with random round trips); duplicates leave
    the state unchanged; the end result matches the oracle."""
    per_topic = data.draw(st.booleans(), label="per_topic")
    events = data.draw(event_sequences(lateness_ms, per_topic=per_topic), label="events")
    rts = data.draw(st.lists(st.booleans(), min_size=len(events), max_size=len(events)),
                    label="roundtrips")
    states: dict[str, CustomerState] = {}
    applied: set[str] = set()
    for e, rt in zip(events, rts, strict=True):
        before = states.get(e.customer_id, empty())
        after = apply(before, e, lateness_ms)
        if e.event_id in applied:
            assert after == before, f"duplicate {e.event_id} changed the state"
        applied.add(e.event_id)
        states[e.customer_id] = decode(encode(after)) if rt else after
    check_all(states, events, max(e.ts_ms for e in events), "final at hi")
    check_all(states, events, data.draw(now_after(events), label="now"), "final")


@pytest.mark.parametrize("lateness_ms", LATENESSES)
@prop(25)
@given(data=st.data())
def test_long_spans_fold_old_purchase_days_exactly(lateness_ms: int, data: st.DataObject
                                                   ) -> None:
    """Spans of more than 200 days, so purchase days leave every window and are folded
    into totals; both one-by-one and chunked application match the oracle."""
    per_topic = data.draw(st.booleans(), label="per_topic")
    events = data.draw(event_sequences(lateness_ms, long_span=True, max_segment_events=10,
                                       per_topic=per_topic), label="events")
    span = day_of(max(e.ts_ms for e in events)) - day_of(min(e.ts_ms for e in events))
    assert span >= 200
    one: dict[str, CustomerState] = {}
    for e in events:
        one[e.customer_id] = apply(one.get(e.customer_id, empty()), e, lateness_ms)
    n = len(events)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=4), label="cuts"))
    chunked: dict[str, CustomerState] = {}
    for a, b in pairwise([0, *cuts, n]):
        feed(chunked, events[a:b], lateness_ms)
        chunked = roundtrip(chunked)
    for now in data.draw(st.lists(now_after(events), min_size=1, max_size=2), label="nows"):
        check_all(one, events, now, "one-by-one")
        check_all(chunked, events, now, "chunked")
    # Coverage statistics only (--hypothesis-show-statistics): were purchase days folded?
    event(f"purchase days folded: {any(getattr(s, 'old_purchase_days', 0) for s in one.values())}")


@pytest.mark.parametrize("lateness_ms", [DEFAULT_LATENESS_MS, 30 * MS_PER_DAY,
                                         200 * MS_PER_DAY])
def test_state_stays_bounded_over_two_years(lateness_ms: int) -> None:
    """Two years of daily activity (with late events and duplicates): day buckets,
    sessions, event types and remembered event ids stay within their horizons, and the
    features stay exact."""
    rng = np.random.default_rng(lateness_ms % 1_000_003)
    L = lateness_ms
    ret = retention_days(L)
    state = empty()
    events: list[Event] = []
    by_hash: dict[int, Event] = {}
    hi = -1
    for i, day in enumerate(range(19_000, 19_000 + 730)):
        base = day * MS_PER_DAY
        chunk: list[Event] = []
        for j in range(3):
            et = f"type-{day % 97}" if j == 0 else EVENT_TYPES[(day + j) % len(EVENT_TYPES)]
            chunk.append(ClickEvent(f"c{day}-{j}", "alice",
                                    base + int(rng.integers(0, MS_PER_DAY)), et,
                                    f"s{day}-{j % 2}"))
        if day % 3 == 0:
            chunk.append(TransactionEvent(f"p{day}", "alice", base + 3_600_000,
                                          int(rng.integers(1, 10**6))))
        if day % 10 == 0:
            chunk.append(TransactionEvent(f"r{day}", "alice", base + 7_200_000, 5_000,
                                          "refund"))
        hi = max([hi, *(e.ts_ms for e in chunk)])
        chunk.append(ClickEvent(f"lc{day}", "alice", hi - int(rng.integers(0, L + 1)), LOGIN,
                                f"late-{day}"))
        chunk.append(TransactionEvent(f"lt{day}", "alice", hi - int(rng.integers(0, L + 1)),
                                      10_000))
        eligible = [e for e in events[-400:] if e.ts_ms >= hi - L]
        chunk.append(eligible[int(rng.integers(0, len(eligible)))] if eligible
                     else chunk[0])  # a duplicate
        events.extend(chunk)
        by_hash.update((id_hash(e.event_id), e) for e in chunk)
        state = apply_many(state, chunk, L)
        if i % 7 == 0:
            state = decode(encode(state))

        last = {k: max(e.ts_ms for e in events if _stream(e) == k) for k in ("click", "txn")}
        top_click = day_of(last["click"])
        assert state.max_ts == hi
        for buckets in (state.pdays, state.cdays):
            assert len(buckets) <= ret
            assert max(buckets) - min(buckets) < ret
        assert all(top_click - 30 < d <= top_click for d in state.sessions.values())
        assert all(top_click - 30 < d <= top_click for d in state.event_types.values())
        assert len(state.sessions) <= 3 * 30
        assert len(state.event_types) <= 30 + len(EVENT_TYPES)
        remembered = {**state.seen_ids, **getattr(state, "txn_ids", {})}
        # an id is a duplicate's up to L past its first time, and such a record is
        # accepted up to L behind the newest: ids are kept 2 L (id_horizon_ms)
        assert len(remembered) <= 8 * (2 * L // MS_PER_DAY + 2)
        for h, t in remembered.items():
            assert t >= last[_stream(by_hash[h])] - 2 * L, "id remembered beyond 2 x lateness"
        if i in (100, 400, 729):
            check_all({"alice": state}, events, hi, f"day {i}")
    assert state.old_purchase_days > 0
    check_all({"alice": state}, events, hi + 45 * MS_PER_DAY, "45 days later")
    check_all({"alice": state}, events, hi + 400 * MS_PER_DAY, "400 days later")
    assert len(encode(state)) < 64 * 1024


@prop(60)
@given(data=st.data())
def test_serial_roundtrip(data: st.DataObject) -> None:
    """decode(encode(s)) == s for reachable states, byte-stable, and indistinguishable
    afterwards (same features, same result of applying further events)."""
    lateness_ms = data.draw(st.sampled_from(LATENESSES), label="lateness")
    events = data.draw(event_sequences(lateness_ms, customers=("alice",),
                                       per_topic=data.draw(st.booleans())), label="events")
    k = data.draw(st.integers(0, len(events)), label="split")
    s = apply_many(empty(), events[:k], lateness_ms)
    b = encode(s)
    assert isinstance(b, bytes)
    s2 = decode(b)
    assert s2 == s
    assert encode(s2) == b
    for d in (s2.pdays, s2.cdays):
        assert all(isinstance(key, int) and isinstance(v, list) for key, v in d.items())
    now = data.draw(now_after(events), label="now")
    assert derive(s2, now) == derive(s, now)
    assert apply_many(s2, events[k:], lateness_ms) == apply_many(s, events[k:], lateness_ms)


def test_serial_rejects_unknown_version() -> None:
    import msgpack

    b = encode(apply(empty(), ClickEvent("e", "alice", 5, LOGIN, "s")))
    v = msgpack.unpackb(b, raw=False, strict_map_key=False)
    v[0] = 999
    with pytest.raises(ValueError, match="version"):
        decode(msgpack.packb(v, use_bin_type=True))
    assert decode(encode(empty())) == empty()
