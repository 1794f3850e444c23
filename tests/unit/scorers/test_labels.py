"""Delayed labels against an independent pandas computation from raw event times."""

from __future__ import annotations

import msgpack
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.events import MS_PER_DAY
from scorers.labels import (
    CHURN,
    INPUT_NAMES,
    PURCHASE_7D,
    Example,
    LabelState,
    due_ms,
    example_id,
    model_inputs,
    observe,
    on_event,
    on_time,
    wants_observation,
)

DAY = MS_PER_DAY
LATENESS = 7 * DAY
FEATS = {"purchases_total": 2, "monetary_total": 30.0, "recency_days": 3,
         "bgnbd_frequency": 1, "bgnbd_recency": 5, "events_total": 4,
         "days_since_last_event": 1}


def _horizon(model: str, clicks: bool) -> int:
    if model == PURCHASE_7D:
        return 7 * DAY
    return (30 if clicks else 90) * DAY


# A step is (kind, value): an event arriving ("click"/"buy", lag behind engine time
# and advance of engine time), or a tick of engine time with no event of the customer.
_step = st.one_of(
    st.tuples(st.sampled_from(["click", "buy"]),
              st.integers(0, 40 * DAY), st.integers(0, LATENESS)),
    st.tuples(st.just("tick"), st.integers(0, 40 * DAY), st.just(0)),
)


def _run(steps: list[tuple[str, int, int]], clicks: bool
         ) -> tuple[list[Example], list[tuple[int, bool]], LabelState, list[int]]:
    """Drive one customer through the engine's order of calls; return examples and events."""
    state = LabelState()
    now = 0
    examples: list[Example] = []
    events: list[tuple[int, bool]] = []
    obs_times: list[int] = []
    for kind, advance, lag in steps:
        now += advance
        if kind != "tick":
            ts = max(0, now - lag)  # a late event, at most LATENESS behind engine time
            is_buy = kind == "buy"
            events.append((ts, is_buy))
            state, done = on_event(state, "c1", ts, is_buy)
            examples += done
        state, done = on_time(state, "c1", now, LATENESS)
        examples += done
        before = dict(state.pending)
        state = observe(state, "c1", FEATS, now, has_clickstream=clicks)
        obs_times += [o.obs_ts_ms for m, o in state.pending.items() if m not in before]
        assert set(state.pending) <= {CHURN, PURCHASE_7D}
    return examples, events, state, obs_times


def _oracle(events: list[tuple[int, bool]], model: str, t: int, horizon: int) -> int:
    df = pd.DataFrame(events, columns=["ts", "buy"])
    inside = df[(df.ts > t) & (df.ts <= t + horizon)]
    if model == CHURN:
        return int(inside.empty)
    return int(inside.buy.any())


@settings(max_examples=150, deadline=None)
@given(st.lists(_step, min_size=1, max_size=40), st.booleans())
def test_labels_match_pandas_oracle(steps: list[tuple[str, int, int]], clicks: bool) -> None:
    examples, events, state, _ = _run(steps, clicks)
    # Let every pending observation expire, with no further event.
    end = max([o.end_ms for o in state.pending.values()], default=0) + LATENESS + 1
    state, done = on_time(state, "c1", end, LATENESS)
    examples += done
    assert state.pending == {}
    assert len({e.example_id for e in examples}) == len(examples)
    for e in examples:
        horizon = _horizon(e.model, clicks)
        assert e.y == _oracle(events, e.model, e.obs_ts_ms, horizon), e
        assert e.example_id == example_id("c1", e.model, e.obs_ts_ms)
        assert e.resolved_ts_ms > e.obs_ts_ms


@settings(max_examples=100, deadline=None)
@given(st.lists(_step, min_size=1, max_size=40), st.booleans())
def test_observations_respect_min_gap(steps: list[tuple[str, int, int]], clicks: bool) -> None:
    state = LabelState()
    now = 0
    last: dict[str, int] = {}
    for _kind, advance, _ in steps:
        now += advance
        state, _done = on_time(state, "c1", now, LATENESS)
        new = observe(state, "c1", FEATS, now, has_clickstream=clicks, min_gap_days=7)
        for m, o in new.pending.items():
            if m not in state.pending:
                assert o.obs_ts_ms == now
                assert now - last.get(m, -(10**15)) >= 7 * DAY
                last[m] = now
        state = new


def test_lateness_boundary() -> None:
    s = observe(LabelState(), "c1", FEATS, 0, has_clickstream=True)
    end = 30 * DAY
    assert due_ms(s, LATENESS) == 7 * DAY + LATENESS + 1  # the purchase observation
    # Engine time exactly horizon + lateness past the observation: an event at the end of
    # the horizon is still accepted, so nothing is settled yet.
    s2, done = on_time(s, "c1", end + LATENESS, LATENESS)
    assert [e.model for e in done] == [PURCHASE_7D] and CHURN in s2.pending
    _, done = on_event(s2, "c1", end, is_purchase=False)
    assert [(e.model, e.y) for e in done] == [(CHURN, 0)]
    # One millisecond later, no event inside the horizon can still arrive.
    _, done = on_time(s2, "c1", end + LATENESS + 1, LATENESS)
    assert [(e.model, e.y, e.resolved_ts_ms) for e in done] == [(CHURN, 1, end + LATENESS + 1)]


def test_events_outside_the_horizon_resolve_nothing() -> None:
    s = observe(LabelState(), "c1", FEATS, 10 * DAY, has_clickstream=False)
    assert s.pending[CHURN].horizon_ms == 90 * DAY
    for ts in (10 * DAY, 5 * DAY, 100 * DAY + 1):  # same instant, late, past the horizon
        s2, done = on_event(s, "c1", ts, is_purchase=True)
        assert done == [] and s2 is s
    s2, done = on_event(s, "c1", 17 * DAY, is_purchase=False)  # activity, not a purchase
    assert [(e.model, e.y) for e in done] == [(CHURN, 0)] and PURCHASE_7D in s2.pending


def test_models_can_be_restricted() -> None:
    s = observe(LabelState(), "c1", FEATS, 0, has_clickstream=True, models=(CHURN,))
    assert list(s.pending) == [CHURN]
    assert wants_observation(s, 7 * DAY, models=(PURCHASE_7D,))
    assert not wants_observation(s, 7 * DAY, models=(CHURN,))


_floats = st.floats(-1e6, 1e6, allow_nan=False)


@given(st.dictionaries(st.sampled_from([CHURN, PURCHASE_7D]),
                       st.tuples(st.integers(0, 2**42), st.integers(1, 2**36),
                                 st.lists(_floats, min_size=len(INPUT_NAMES),
                                          max_size=len(INPUT_NAMES)))),
       st.dictionaries(st.sampled_from([CHURN, PURCHASE_7D]), st.integers(0, 2**42)))
def test_label_state_round_trip(pending: dict[str, tuple[int, int, list[float]]],
                                last: dict[str, int]) -> None:
    from scorers.labels import Observation

    s = LabelState({m: Observation(m, t, dict(zip(INPUT_NAMES, xs, strict=True)), h)
                    for m, (t, h, xs) in pending.items()}, last)
    assert LabelState.decode(s.encode()) == s
    assert LabelState.from_dict(s.to_dict()) == s


def test_label_state_of_another_input_layout_drops_pending() -> None:
    s = observe(LabelState(), "c1", FEATS, 0, has_clickstream=True)
    d = s.to_dict()
    d["schema"] = "00000000"
    back = LabelState.from_dict(d)
    assert back.pending == {} and back.last_obs_ms == s.last_obs_ms


@given(st.text(min_size=1), st.integers(0, 2**42), st.integers(0, 1),
       st.dictionaries(st.sampled_from(INPUT_NAMES), _floats))
def test_example_round_trip(cid: str, ts: int, y: int, x: dict[str, float]) -> None:
    e = Example(example_id(cid, CHURN, ts), CHURN, "ab" * 8, ts, ts + 1, x, y)
    assert Example.from_bytes(e.to_bytes()) == e


def test_example_ids_are_deterministic_and_distinct() -> None:
    assert example_id("c1", CHURN, 5) == example_id("c1", CHURN, 5)
    ids = {example_id(c, m, t) for c in ("c1", "c2") for m in (CHURN, PURCHASE_7D)
           for t in (0, 1)}
    assert len(ids) == 8


def test_model_inputs_handle_missing_values() -> None:
    x = model_inputs({})
    assert list(x) == list(INPUT_NAMES) and all(v == 0.0 for v in x.values())
    x = model_inputs({"monetary_total": -5.0, "activity_trend_8w": -3.0,
                      "days_since_last_event": 2, "recency_days": 9})
    assert x["log_monetary_total"] == 0.0 and x["activity_trend_8w"] < 0
    assert x["has_clickstream"] == 1.0
    assert x["log_days_inactive"] == pytest.approx(x["log_days_since_last_event"])


def test_label_state_stores_shared_sparse_inputs_and_reads_the_dense_form() -> None:
    s = observe(LabelState(), "c1", FEATS, 0, has_clickstream=True)
    assert len(s.pending) == 2
    d = s.to_dict()
    # Both models observed at once: one stored vector, only its non-zero inputs.
    assert len(d["x"]) == 1
    nz, vals = d["x"][0]
    assert all(v != 0.0 for v in vals) and len(nz) < len(INPUT_NAMES)
    assert LabelState.from_dict(d) == s
    dense = dict(d, pending={m: [o.obs_ts_ms, o.horizon_ms, [o.x.get(n, 0.0) for n in INPUT_NAMES]]
                             for m, o in s.pending.items()})
    del dense["x"]
    assert LabelState.from_dict(dense) == s
    compact = len(msgpack.packb(d, use_bin_type=True))
    assert compact < len(msgpack.packb(dense, use_bin_type=True)) / 2
