"""Tests of the synthetic persona event generator (stream.synthetic)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Any

import pytest

from stream import synthetic
from stream.schemas import ClickstreamIn, TransactionIn
from stream.synthetic import (
    CLICK_TYPES,
    DEFAULT_START_MS,
    PERSONAS,
    Truth,
    generate,
    iter_events,
    write_truth,
)

DAY = 86_400_000
Events = tuple[list[dict[str, Any]], list[dict[str, Any]], list[Truth]]


@pytest.fixture(scope="module")
def small() -> Events:
    return generate(300, 30, seed=11)


@pytest.fixture(scope="module")
def population() -> Events:
    """A default-mix population big enough for per-persona statistics (~35k events)."""
    return generate(3000, 60, seed=5)


def _by_persona(truths: list[Truth]) -> dict[str, str]:
    return {t.customer_id: t.persona for t in truths}


# --- determinism and the streaming API ---------------------------------------------


def test_same_seed_same_events(small: Events) -> None:
    assert generate(300, 30, seed=11) == small


def test_different_seed_different_events(small: Events) -> None:
    clicks, txns, truths = generate(300, 30, seed=12)
    assert clicks != small[0]
    assert txns != small[1]
    assert [t.persona for t in truths] != [t.persona for t in small[2]]


def test_iter_events_equals_generate(small: Events) -> None:
    stream = list(iter_events(300, 30, seed=11))
    assert [e for topic, e in stream if topic == "clickstream"] == small[0]
    assert [e for topic, e in stream if topic == "transactions"] == small[1]
    assert {topic for topic, _ in stream} == {"clickstream", "transactions"}
    ts = [e["ts"] for _, e in stream]
    assert ts == sorted(ts)


def test_iter_events_merges_many_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "BLOCK_SIZE", 37)  # 300 customers -> 9 blocks
    clicks, txns, truths = generate(300, 20, seed=3)
    stream = list(iter_events(300, 20, seed=3))
    assert [e for t, e in stream if t == "clickstream"] == clicks
    assert [e for t, e in stream if t == "transactions"] == txns
    ts = [e["ts"] for _, e in stream]
    assert ts == sorted(ts)
    assert [t.customer_id for t in truths] == [f"s{i:06d}" for i in range(300)]


def test_each_list_sorted_by_ts(small: Events) -> None:
    for events in small[:2]:
        ts = [e["ts"] for e in events]
        assert ts == sorted(ts)


def test_empty_population() -> None:
    assert generate(0, 10) == ([], [], [])
    assert list(iter_events(0, 10)) == []


@pytest.mark.parametrize("kwargs", [
    {"customers": -1, "days": 10},
    {"customers": 5, "days": 0},
    {"customers": 5, "days": 10, "seed": -1},
    {"customers": 5, "days": 10, "mix": {"vampire": 1.0}},
    {"customers": 5, "days": 10, "mix": {"churner": 0.0}},
])
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        generate(**kwargs)
    with pytest.raises(ValueError):
        iter_events(**kwargs)  # checked on the call, not on the first next()


# --- contract ----------------------------------------------------------------------


def test_events_validate_against_engine_schemas(small: Events) -> None:
    clicks, txns, _ = small
    for e in clicks:
        model = ClickstreamIn.model_validate(e)
        assert model.to_event().event_type == e["event_type"]
        assert set(e) == {"event_id", "customer_id", "ts", "event_type", "session_id",
                          "properties"}
        assert e["event_type"] in CLICK_TYPES
        assert isinstance(e["properties"], dict) and len(e["properties"]) <= 3
    for e in txns:
        TransactionIn.model_validate(e)
        assert set(e) == {"event_id", "customer_id", "ts", "amount", "kind", "currency",
                          "items"}
        assert e["kind"] in ("purchase", "refund")
        assert e["currency"] == "USD"
        assert isinstance(e["amount"], float) and e["amount"] > 0
        assert round(e["amount"], 2) == e["amount"]
        assert isinstance(e["items"], int) and e["items"] >= 1
        assert isinstance(e["ts"], int)


def test_event_ids_unique(population: Events) -> None:
    clicks, txns, _ = population
    ids = [e["event_id"] for e in clicks] + [e["event_id"] for e in txns]
    assert len(ids) == len(set(ids))


def test_ids_follow_prefix() -> None:
    clicks, txns, truths = generate(40, 10, seed=1, id_prefix="bench-")
    ids = {t.customer_id for t in truths}
    assert all(c.startswith("bench-") for c in ids)
    for e in clicks + txns:
        assert e["customer_id"] in ids
        assert e["event_id"].startswith(e["customer_id"] + "-")
    for e in clicks:
        assert e["session_id"].startswith(e["customer_id"] + "-s")
        assert e["event_id"].startswith(e["session_id"] + "-")


def test_events_within_signup_churn_and_period(population: Events) -> None:
    clicks, txns, truths = population
    truth = {t.customer_id: t for t in truths}
    end = DEFAULT_START_MS + 60 * DAY
    for e in clicks + txns:
        t = truth[e["customer_id"]]
        assert DEFAULT_START_MS <= e["ts"] < end
        assert e["ts"] >= t.signup_ms
        assert t.churn_ms is None or e["ts"] < t.churn_ms


def test_signups_and_churn(population: Events) -> None:
    _, _, truths = population
    end = DEFAULT_START_MS + 60 * DAY
    existing = sum(t.signup_ms < DEFAULT_START_MS for t in truths) / len(truths)
    assert 0.5 < existing < 0.95  # some exist at the start, the rest join during the period
    joined = [t.signup_ms for t in truths if t.signup_ms >= DEFAULT_START_MS]
    assert max(joined) - min(joined) > 40 * DAY  # spread over the period
    for t in truths:
        if t.persona == "churner":
            assert t.churn_ms is not None
            assert max(t.signup_ms, DEFAULT_START_MS) <= t.churn_ms <= DEFAULT_START_MS + 30 * DAY
        elif t.churn_ms is not None:
            assert t.signup_ms <= t.churn_ms < end
    others = [t for t in truths if t.persona != "churner"]
    assert 0 < sum(t.churn_ms is not None for t in others) < 0.15 * len(others)


def test_every_customer_acts(population: Events) -> None:
    clicks, _, truths = population
    assert {e["customer_id"] for e in clicks} == {t.customer_id for t in truths}


def test_refunds_follow_their_purchase(population: Events) -> None:
    _, txns, _ = population
    purchases = {e["event_id"]: e for e in txns if e["kind"] == "purchase"}
    refunds = [e for e in txns if e["kind"] == "refund"]
    assert 0.01 < len(refunds) / len(purchases) < 0.10
    for r in refunds:
        p = purchases[r["event_id"].removesuffix("-r")]
        assert r["customer_id"] == p["customer_id"]
        assert r["ts"] > p["ts"]
        assert 0 < r["amount"] <= p["amount"]
        assert r["items"] <= p["items"]


def test_sessions_are_short_bursts(population: Events) -> None:
    clicks, _, _ = population
    span: dict[str, list[int]] = {}
    owner: dict[str, str] = {}
    for e in clicks:
        s = span.setdefault(e["session_id"], [e["ts"], e["ts"]])
        s[1] = e["ts"]
        assert owner.setdefault(e["session_id"], e["customer_id"]) == e["customer_id"]
    lengths = sorted(b - a for a, b in span.values())
    assert lengths[len(lengths) // 2] < 10 * 60_000  # median session under 10 minutes
    assert lengths[-1] < 3 * 3_600_000
    multi = sum(1 for x in lengths if x > 0) / len(lengths)
    assert multi > 0.3  # a good share of sessions has several events


def test_daily_and_weekly_rhythm(population: Events) -> None:
    clicks, _, _ = population
    starts = [e["ts"] for e in clicks if e["event_id"].endswith("-0")]
    hours = Counter((ts // 3_600_000) % 24 for ts in starts)
    evening = sum(hours[h] for h in range(18, 23))
    night = sum(hours[h] for h in range(1, 6))
    assert evening > 3 * night
    # weekends (1970-01-01 was a Thursday) are busier per day than weekdays
    weekday = Counter((ts // DAY + 3) % 7 for ts in starts)
    weekend_per_day = (weekday[5] + weekday[6]) / 2
    weekday_per_day = sum(weekday[d] for d in range(5)) / 5
    assert weekend_per_day > weekday_per_day


# --- persona behaviour ---------------------------------------------------------------


def _persona_stats(events: Events) -> dict[str, dict[str, float]]:
    clicks, txns, truths = events
    persona = _by_persona(truths)
    n = Counter(persona.values())
    types: dict[str, Counter[str]] = defaultdict(Counter)
    sessions: dict[str, set[str]] = defaultdict(set)
    spend: dict[str, list[float]] = defaultdict(list)
    for e in clicks:
        p = persona[e["customer_id"]]
        types[p][e["event_type"]] += 1
        sessions[p].add(e["session_id"])
    for e in txns:
        if e["kind"] == "purchase":
            spend[persona[e["customer_id"]]].append(e["amount"])
    out = {}
    for p in PERSONAS:
        total = sum(types[p].values())
        out[p] = {
            "clicks": total / n[p],
            "sessions": len(sessions[p]) / n[p],
            "tickets": types[p]["support_ticket"] / total,
            "features": types[p]["feature_use"] / total,
            "logins": types[p]["login"] / len(sessions[p]),
            "purchases": len(spend[p]) / n[p],
            "basket": sum(spend[p]) / max(len(spend[p]), 1),
            "spend": sum(spend[p]) / n[p],
        }
    return out


def _top(stats: dict[str, dict[str, float]], key: str) -> str:
    return max(PERSONAS, key=lambda p: stats[p][key])


def test_persona_behaviour_differs_as_designed(population: Events) -> None:
    s = _persona_stats(population)
    assert _top(s, "tickets") == "struggling_newbie"
    assert s["struggling_newbie"]["tickets"] > 3 * max(
        s[p]["tickets"] for p in PERSONAS if p != "struggling_newbie")
    assert _top(s, "features") == "power_user"
    assert _top(s, "sessions") == "power_user"
    assert _top(s, "clicks") == "power_user"
    assert _top(s, "basket") == "loyal_big_spender"
    assert _top(s, "spend") == "loyal_big_spender"
    assert _top(s, "purchases") == "bargain_hunter"
    assert min(PERSONAS, key=lambda p: s[p]["basket"] if s[p]["purchases"] > 0.5 else 1e9) \
        == "bargain_hunter"
    assert s["loyal_big_spender"]["basket"] > 10 * s["bargain_hunter"]["basket"]
    # casual explorers: sparse, shallow sessions, hardly ever log in or buy
    assert s["casual_explorer"]["clicks"] / s["casual_explorer"]["sessions"] < 1.5
    assert s["casual_explorer"]["logins"] < 0.1
    assert s["casual_explorer"]["purchases"] < 0.2
    assert s["churner"]["clicks"] < s["casual_explorer"]["clicks"]


def test_churners_are_silent_in_the_second_half(population: Events) -> None:
    clicks, txns, truths = population
    persona = _by_persona(truths)
    half = DEFAULT_START_MS + 30 * DAY
    assert not [e for e in clicks + txns
                if persona[e["customer_id"]] == "churner" and e["ts"] >= half]


def test_click_transaction_split_and_volume(population: Events) -> None:
    clicks, txns, truths = population
    share = len(txns) / (len(clicks) + len(txns))
    assert 0.15 <= share <= 0.25  # ~20 % transactions, +-5 points
    per_customer = (len(clicks) + len(txns)) / len(truths)
    assert 7 <= per_customer <= 15  # roughly 10 events per customer over 60 days


def test_mix_selects_personas() -> None:
    _, txns, truths = generate(50, 14, seed=2, mix={"loyal_big_spender": 2.0})
    assert {t.persona for t in truths} == {"loyal_big_spender"}
    assert txns


def test_unaligned_start() -> None:
    start = 1_700_000_123_457
    clicks, txns, _ = generate(100, 7, seed=4, start_ms=start)
    assert all(start <= e["ts"] < start + 7 * DAY for e in clicks + txns)


# --- truth ---------------------------------------------------------------------------


def test_write_truth_round_trip(tmp_path: Any, small: Events) -> None:
    truths = small[2]
    path = tmp_path / "truth.jsonl"
    assert write_truth(path, truths) == len(truths)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [Truth(**r) for r in rows] == truths
    assert rows[0] == asdict(truths[0])
    assert set(rows[0]) == {"customer_id", "persona", "signup_ms", "churn_ms"}
