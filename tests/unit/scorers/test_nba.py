"""Next-best action: catalogue validation, hold-out assignment, cooldown, cap, attribution, lift."""

from __future__ import annotations

import math
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scorers.nba import (
    DAY_MS,
    WEEK_MS,
    ActionCatalogue,
    ActionCatalogueError,
    Conversion,
    Decision,
    Exposure,
    NbaState,
    counter_field,
    counter_fields,
    decide,
    default_actions,
    expire,
    holdout_point,
    in_holdout,
    lift_table,
    load_actions,
    on_purchase,
    parse_counter_field,
)

SCHEMES = {
    "rfm": ["Champions", "Loyal", "Potential Loyalist", "New Customers", "Promising",
            "Need Attention", "About to Sleep", "At Risk", "Can't Lose Them", "Hibernating",
            "Lost", "Prospects"],
    "lifecycle": ["Power User", "New Activator", "Casual Explorer", "Struggling Newbie",
                  "Likely to Churn", "High Potential", "Dormant", "Steady"],
}

SMALL = """
defaults: {holdout_share: 0.0, cooldown_days: 10, attribution_days: 5}
max_actions_per_7d: 2
rules:
  - {scheme: rfm, to: At Risk, action_id: win-back, channel: email, priority: 10}
  - {scheme: rfm, to: At Risk, from: [Champions], action_id: vip-call, channel: call,
     priority: 90, cooldown_days: 30}
  - {scheme: rfm, to: New Customers, from: [null], action_id: welcome, channel: email}
  - {scheme: rfm, to: Lost, action_id: last-chance, channel: sms, holdout_share: 1.0}
  - {scheme: lifecycle, to: Dormant, action_id: push, channel: push}
"""


@pytest.fixture
def cat() -> ActionCatalogue:
    return load_actions(SMALL, SCHEMES)


# -- catalogue ----------------------------------------------------------------------------


def test_default_catalogue_is_valid_for_the_default_segments() -> None:
    c = default_actions(SCHEMES)
    assert len(c.version) == 12
    assert c.version == default_actions().version
    ids = {r.action_id for r in c.rules}
    assert {"win-back-email", "service-recovery-call", "upsell-offer", "welcome-series",
            "reactivation-push"} <= ids
    channels = {r.action_id: r.channel for r in c.rules}
    assert channels["service-recovery-call"] == "call"
    _, d = decide(c, NbaState(), "c1", "rfm", "Loyal", "Champions", 0)
    assert d is not None and d.action_id == "upsell-offer"
    _, d = decide(c, NbaState(), "c1", "rfm", "Loyal", "At Risk", 0)
    assert d is not None and d.action_id == "win-back-email"


def test_defaults_fill_rules_and_yaml_file_loads(tmp_path: Path, cat: ActionCatalogue) -> None:
    rule = cat.rules[0]
    assert (rule.cooldown_days, rule.attribution_days, rule.holdout_share) == (10, 5, 0.0)
    assert cat.rules[1].cooldown_days == 30
    assert cat.rules[2].from_ == (None,)
    f = tmp_path / "a.yaml"
    f.write_text(SMALL)
    assert load_actions(f).version == load_actions(str(f)).version == cat.version


def test_version_follows_content_not_formatting(cat: ActionCatalogue) -> None:
    reformatted = SMALL.replace("{holdout_share: 0.0, cooldown_days: 10, attribution_days: 5}",
                                "\n  attribution_days: 5\n  cooldown_days: 10\n  holdout_share: 0")
    assert load_actions(reformatted).version == cat.version
    assert load_actions(SMALL.replace("priority: 90", "priority: 91")).version != cat.version


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (SMALL.replace("scheme: lifecycle", "scheme: lifecycel"), "'lifecycel'"),
        (SMALL.replace("to: Dormant", "to: Dormnat"), "'Dormnat'"),
        (SMALL.replace("from: [Champions]", "from: [Champs]"), "'Champs'"),
        (SMALL.replace("channel: sms", "channel: fax"), "channel"),
        (SMALL.replace("holdout_share: 1.0", "holdout_share: 1.5"), "holdout_share"),
        (SMALL.replace("priority: 90", "priority: high"), "priority"),
        (SMALL.replace("channel: push}", "channel: push, colour: red}"), "colour"),
        (SMALL.replace("action_id: push", "action_id: 'a|b'"), "action_id"),
        (SMALL.replace("action_id: push", "action_id: last-chance"), "'last-chance'"),
        ("- just a list", "mapping"),
        ("rules: [", "YAML"),
        (SMALL + "rules: []\n", "duplicate key 'rules' at line 11, column 1"),
        (SMALL.replace("cooldown_days: 30", "cooldown_days: .inf"),
         "rules.1.cooldown_days: Input should be a finite number"),
        (SMALL.replace("cooldown_days: 10", "cooldown_days: 1e9"),
         "defaults.cooldown_days: Input should be less than or equal to 36500"),
        (SMALL.replace("attribution_days: 5", "attribution_days: .inf"),
         "defaults.attribution_days: Input should be a finite number"),
        (SMALL.replace("holdout_share: 1.0", "holdout_share: .nan"),
         "rules.3.holdout_share: Input should be a finite number"),
        ("rules: []\n? [a]\n: 1\n", "not a list or mapping at line 2, column 3"),
        ("rules: " + "[" * 20_000 + "]" * 20_000, "nested deeper than"),
        ("r: &r {scheme: rfm, to: Lost, action_id: a, channel: sms}\nrules: [*r, *r]\n",
         "aliases (*name) are not allowed"),
        # rules that could never fire
        (SMALL.replace("from: [Champions]", "from: []"), "rules.1: Value error, 'from' is empty"),
        (SMALL.replace("from: [Champions]", "from: [At Risk]"),
         "rules.1: Value error, 'from' names only 'to' ('At Risk')"),
        # numbers only: YAML's true and "7" are no counts or days
        (SMALL.replace("max_actions_per_7d: 2", "max_actions_per_7d: true"),
         "max_actions_per_7d: Value error, Input should be a valid number, not True"),
        (SMALL.replace("cooldown_days: 10", "cooldown_days: '7'"),
         "defaults.cooldown_days: Value error, Input should be a valid number, not '7'"),
        (SMALL.replace("priority: 90", "priority: true"), "rules.1.priority"),
        (SMALL.replace("holdout_share: 1.0", "holdout_share: yes"), "rules.3.holdout_share"),
    ],
)
def test_catalogue_errors_name_the_problem(text: str, needle: str) -> None:
    with pytest.raises(ActionCatalogueError) as exc:
        load_actions(text, SCHEMES)
    assert needle in str(exc.value)


def test_a_file_not_utf8_names_the_file_and_the_bad_byte(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes(SMALL.replace("At Risk", "\xe0 risque").encode("latin-1"))
    with pytest.raises(ActionCatalogueError) as exc:
        load_actions(f)
    assert str(exc.value) == (f"cannot read action catalogue {str(f)!r}: not UTF-8 text: "
                              "byte 0xe0 at line 5, column 23")


def test_unknown_names_are_only_checked_when_schemes_are_given() -> None:
    text = SMALL.replace("to: Dormant", "to: Dormnat")
    assert load_actions(text).rules[-1].to == "Dormnat"


# -- hold-out -----------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.05, 0.1, 0.2, 0.5])
def test_holdout_share_within_one_point_and_independent_across_actions(share: float) -> None:
    customers = [f"c{i}" for i in range(10_000)]
    a = [in_holdout(c, "win-back", share) for c in customers]
    b = [in_holdout(c, "upsell", share) for c in customers]
    assert abs(sum(a) / 1e4 - share) < 0.01
    assert abs(sum(b) / 1e4 - share) < 0.01
    both = sum(x and y for x, y in zip(a, b, strict=True)) / 1e4
    # Binomial standard error of the joint share, with a 4-sigma margin.
    assert abs(both - share * share) < 4 * math.sqrt(share * share * (1 - share * share) / 1e4)


def test_salt_reshuffles_the_holdout() -> None:
    customers = [f"c{i}" for i in range(2_000)]
    plain = {c for c in customers if in_holdout(c, "a", 0.5)}
    salted = {c for c in customers if in_holdout(c, "a", 0.5, salt="2024-q3")}
    assert 0.4 < len(plain & salted) / len(plain) < 0.6


@given(st.text(max_size=30), st.text(max_size=30), st.floats(0, 1))
def test_holdout_is_deterministic_and_monotone_in_share(cid: str, aid: str, share: float) -> None:
    assert in_holdout(cid, aid, share) == in_holdout(cid, aid, share)
    u = holdout_point(cid, aid)
    assert 0.0 <= u < 1.0
    assert in_holdout(cid, aid, share) == (u < share)
    assert not in_holdout(cid, aid, 0.0) and in_holdout(cid, aid, 1.0)


# -- decide: priority, cooldown, cap ------------------------------------------------------


def test_priority_and_from_restrictions(cat: ActionCatalogue) -> None:
    _, d = decide(cat, NbaState(), "c1", "rfm", "Champions", "At Risk", 0)
    assert d == Decision("vip-call", "call", 90, False)
    _, d = decide(cat, NbaState(), "c1", "rfm", "Loyal", "At Risk", 0)
    assert d == Decision("win-back", "email", 10, False)
    _, d = decide(cat, NbaState(), "c1", "rfm", None, "New Customers", 0)
    assert d is not None and d.action_id == "welcome"
    _, d = decide(cat, NbaState(), "c1", "rfm", "Lost", "New Customers", 0)
    assert d is None
    _, d = decide(cat, NbaState(), "c1", "lifecycle", "Loyal", "At Risk", 0)
    assert d is None
    s, d = decide(cat, NbaState(), "c1", "rfm", "At Risk", "At Risk", 0)
    assert d is None and s.is_empty


def test_cooldown_blocks_repeat_and_falls_through_to_next_best(cat: ActionCatalogue) -> None:
    s, d = decide(cat, NbaState(), "c1", "rfm", "Champions", "At Risk", 0)
    assert d is not None and d.action_id == "vip-call"
    # 29 days later: vip-call (30 d cooldown) is cooling down, the next-best rule fires.
    s, d = decide(cat, s, "c1", "rfm", "Champions", "At Risk", 29 * DAY_MS)
    assert d is not None and d.action_id == "win-back"
    s, d = decide(cat, s, "c1", "rfm", "Champions", "At Risk", 30 * DAY_MS)
    assert d is not None and d.action_id == "vip-call"
    # win-back was sent at day 29; 10 d cooldown.
    _, d = decide(cat, s, "c1", "rfm", "Loyal", "At Risk", 38 * DAY_MS)
    assert d is None
    _, d = decide(cat, s, "c1", "rfm", "Loyal", "At Risk", 39 * DAY_MS)
    assert d is not None and d.action_id == "win-back"


def test_frequency_cap_counts_every_action_in_seven_days(cat: ActionCatalogue) -> None:
    s, d1 = decide(cat, NbaState(), "c1", "rfm", None, "New Customers", 0)
    s, d2 = decide(cat, s, "c1", "rfm", "Loyal", "At Risk", DAY_MS)
    s, d3 = decide(cat, s, "c1", "lifecycle", "Steady", "Dormant", 2 * DAY_MS)
    assert d1 and d2 and d3 is None
    assert s.recent == (0, DAY_MS)
    # Once the first send is 7 days old the cap frees one slot.
    s, d4 = decide(cat, s, "c1", "lifecycle", "Steady", "Dormant", WEEK_MS)
    assert d4 is not None and d4.action_id == "push"
    assert s.recent == (DAY_MS, WEEK_MS)


def test_holdout_arm_counts_for_cooldown_and_cap_and_is_exposed(cat: ActionCatalogue) -> None:
    s, d = decide(cat, NbaState(), "c1", "rfm", "Hibernating", "Lost", 0)
    assert d == Decision("last-chance", "sms", 0, True)
    assert s.pending == (Exposure("last-chance", "Lost", True, 0, 5 * DAY_MS),)
    assert s.last_sent == {"last-chance": 0} and s.recent == (0,)
    _, d = decide(cat, s, "c1", "rfm", "Hibernating", "Lost", DAY_MS)
    assert d is None


actions = st.sampled_from([
    ("rfm", "Champions", "At Risk"), ("rfm", "Loyal", "At Risk"), ("rfm", None, "New Customers"),
    ("rfm", "Hibernating", "Lost"), ("lifecycle", "Steady", "Dormant"),
])


@settings(max_examples=200)
@given(st.lists(st.tuples(actions, st.integers(0, 3 * DAY_MS)), max_size=30))
def test_cap_and_cooldown_hold_for_any_sequence(steps: list[tuple[tuple[str, str | None, str],
                                                                  int]]) -> None:
    c = load_actions(SMALL)
    s, t = NbaState(), 0
    sent: list[tuple[str, int]] = []
    for (scheme, frm, to), gap in steps:
        t += gap
        s, d = decide(c, s, "cust", scheme, frm, to, t)
        if d is not None:
            sent.append((d.action_id, t))
        assert NbaState.from_dict(msgpack.unpackb(msgpack.packb(s.to_dict()))) == s
    for i, (_, t0) in enumerate(sent):
        assert sum(1 for _, t1 in sent[i:] if t1 < t0 + WEEK_MS) <= c.max_actions_per_7d
    for aid, t0 in sent:
        cd = c.rule_for(aid).cooldown_ms  # type: ignore[union-attr]
        assert not any(a == aid and t0 < t1 < t0 + cd for a, t1 in sent)


# -- attribution --------------------------------------------------------------------------


def test_attribution_window_edges(cat: ActionCatalogue) -> None:
    s, _ = decide(cat, NbaState(), "c1", "rfm", "Loyal", "At Risk", 1_000)
    until = 1_000 + 5 * DAY_MS
    assert on_purchase(s, 1_000) == (s, [])  # at exposure time: not caused by it
    assert on_purchase(s, 999) == (s, [])
    assert on_purchase(s, until + 1) == (s, [])
    s2, conv = on_purchase(s, until)
    assert conv == [Conversion("win-back", "At Risk", False, 1_000, until)]
    assert s2.pending == ()
    # Converts once only.
    assert on_purchase(s2, until)[1] == []
    s3, conv = on_purchase(s, 1_001)
    assert len(conv) == 1 and s3.pending == ()


def test_one_purchase_converts_every_open_exposure(cat: ActionCatalogue) -> None:
    s, _ = decide(cat, NbaState(), "c1", "rfm", None, "New Customers", 0)
    s, _ = decide(cat, s, "c1", "rfm", "Loyal", "At Risk", DAY_MS)
    s, conv = on_purchase(s, 2 * DAY_MS)
    assert [c.action_id for c in conv] == ["welcome", "win-back"]


def test_expire_drops_closed_windows_after_lateness(cat: ActionCatalogue) -> None:
    s, _ = decide(cat, NbaState(), "c1", "rfm", "Loyal", "At Risk", 0)
    until = 5 * DAY_MS
    assert expire(s, until + DAY_MS, DAY_MS).pending == s.pending
    assert expire(s, until + DAY_MS + 1, DAY_MS).pending == ()
    late = expire(s, 100 * DAY_MS, DAY_MS, cat)
    assert late.is_empty
    # Without the catalogue cooldown memory is kept.
    assert expire(s, 100 * DAY_MS, DAY_MS).last_sent == {"win-back": 0}


def test_exposures_wait_on_the_partitions_time_and_sends_age_on_engine_time() -> None:
    """An exposure waits for a purchase while the customer's partition still accepts one
    inside its window (``settled_now_ms``); the cap's record of sends ages on engine time."""
    s = NbaState({}, (0,), (Exposure("a", "High", False, 0, 5 * DAY_MS),))
    at = expire(s, 100 * DAY_MS, DAY_MS, settled_now_ms=6 * DAY_MS)
    assert at.pending == s.pending and at.recent == ()
    assert expire(s, 100 * DAY_MS, DAY_MS, settled_now_ms=6 * DAY_MS + 1).pending == ()


def test_exposures_waiting_on_a_quiet_partition_are_bounded() -> None:
    """A partition whose purchases stay quiet would keep every window open: the newest
    MAX_PENDING_EXPOSURES are kept, and is_quiet agrees with expire."""
    from scorers.nba import MAX_PENDING_EXPOSURES, is_quiet

    many = tuple(Exposure("a", "High", False, d * DAY_MS, (d + 1) * DAY_MS) for d in range(40))
    s = NbaState({}, (), many)
    kept = expire(s, 200 * DAY_MS, DAY_MS, settled_now_ms=0)
    assert kept.pending == many[-MAX_PENDING_EXPOSURES:]
    assert not is_quiet(s.to_dict(), [], 200 * DAY_MS, DAY_MS, settled_now_ms=0)
    assert is_quiet(kept.to_dict(), [], 200 * DAY_MS, DAY_MS, settled_now_ms=0)


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 30)), max_size=24),
       st.lists(st.integers(0, 90), max_size=6), st.integers(0, 120), st.integers(0, 120),
       st.integers(0, 10))
@settings(max_examples=300, deadline=None)
def test_is_quiet_says_exactly_when_purchases_and_expiry_change_nothing(
        windows: list[tuple[int, int]], purchases: list[int], now: int, settled: int,
        lateness: int) -> None:
    from scorers.nba import is_quiet, on_purchase

    pending = tuple(Exposure("a", "High", False, a * DAY_MS, (a + w) * DAY_MS)
                    for a, w in windows)
    s = NbaState({}, tuple(a * DAY_MS for a, _ in windows[:3]), pending)
    after = s
    for ts in purchases:
        after, _ = on_purchase(after, ts * DAY_MS)
    after = expire(after, now * DAY_MS, lateness * DAY_MS, settled_now_ms=settled * DAY_MS)
    quiet = is_quiet(s.to_dict(), [t * DAY_MS for t in purchases], now * DAY_MS,
                     lateness * DAY_MS, settled_now_ms=settled * DAY_MS)
    assert quiet == (after.to_dict() == s.to_dict())


# -- counters and lift --------------------------------------------------------------------


def test_counter_fields_round_trip() -> None:
    f = counter_field("win-back", "Can't Lose Them", False, "converted")
    assert f == "win-back|Can't Lose Them|treated|converted"
    assert parse_counter_field(f) == ("win-back", "Can't Lose Them", "treated", "converted")
    inc = counter_fields(
        [Exposure("a", "Lost", True, 0, 1), Exposure("a", "Lost", True, 0, 1)],
        [Conversion("a", "Lost", False, 0, 1)],
    )
    assert inc == {"a|Lost|holdout|exposed": 2, "a|Lost|treated|converted": 1}


def test_lift_table_matches_hand_computation() -> None:
    counters = {
        b"win-back|At Risk|treated|exposed": b"900",
        b"win-back|At Risk|treated|converted": b"135",
        b"win-back|At Risk|holdout|exposed": b"100",
        b"win-back|At Risk|holdout|converted": b"10",
        b"welcome|New Customers|treated|exposed": b"50",
    }
    rows = lift_table(counters)
    assert [(r["action_id"], r["segment"]) for r in rows] == [
        ("welcome", "New Customers"), ("win-back", "At Risk")]
    w, r = rows
    assert w["holdout_rate"] is None and w["uplift"] is None and w["relative_lift"] is None
    assert w["p_value"] is None and w["treated_rate"] == 0.0 and w["holdout_ci"] is None
    assert (r["treated_exposed"], r["treated_converted"]) == (900, 135)
    assert (r["holdout_exposed"], r["holdout_converted"]) == (100, 10)
    assert r["treated_rate"] == pytest.approx(0.15)
    assert r["holdout_rate"] == pytest.approx(0.10)
    assert r["uplift"] == pytest.approx(0.05)
    assert r["relative_lift"] == pytest.approx(0.5)
    # Pooled rate 145/1000; se = sqrt(.145*.855*(1/900+1/100)); z = .05/se; p = 2(1-Phi(z)).
    se = math.sqrt(0.145 * 0.855 * (1 / 900 + 1 / 100))
    z = 0.05 / se
    assert z == pytest.approx(1.34718, abs=1e-4)
    assert r["p_value"] == pytest.approx(0.177924, abs=1e-5)
    lo, hi = r["treated_ci"]
    assert lo == pytest.approx(0.128161, abs=1e-5)  # scipy binomtest(135, 900), wilson
    assert hi == pytest.approx(0.174814, abs=1e-5)


def test_lift_table_zero_holdout_rate_has_no_relative_lift() -> None:
    rows = lift_table({"a|S|treated|exposed": 10, "a|S|treated|converted": 2,
                       "a|S|holdout|exposed": 10})
    assert rows[0]["uplift"] == pytest.approx(0.2) and rows[0]["relative_lift"] is None
    assert rows[0]["p_value"] == pytest.approx(0.136037, abs=1e-5)


def test_a_rule_that_can_still_fire_from_another_segment_is_kept() -> None:
    """``from: [Champions, At Risk]`` into At Risk fires from Champions."""
    cat = load_actions(SMALL.replace("from: [Champions]", "from: [Champions, At Risk]"),
                       SCHEMES)
    assert cat.rules[1].matches("rfm", "Champions", "At Risk")


def test_a_whole_number_written_with_a_point_is_still_one() -> None:
    cat = load_actions(SMALL.replace("priority: 90", "priority: 90.0"), SCHEMES)
    assert cat.rules[1].priority == 90
    with pytest.raises(ActionCatalogueError, match=r"rules\.1\.priority"):
        load_actions(SMALL.replace("priority: 90", "priority: 90.5"), SCHEMES)
