"""RFM population sketch: merging, removal, exactness of R and F, the M error bound."""

from __future__ import annotations

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from scorers import rfm

money = st.floats(min_value=-50, max_value=5_000, allow_nan=False).map(lambda x: round(x, 2))
customer = st.tuples(st.integers(0, 400), st.integers(1, 40), money)  # last day, days, total


def exact(df: pd.DataFrame, col: str, larger_is_better: bool) -> pd.Series:
    v = df[col] if larger_is_better else -df[col]
    return ((1 + (5 * (v.rank(method="min") - 1)) // len(v)).clip(upper=5)).astype(int)


@settings(max_examples=150, deadline=None)
@given(st.lists(customer, min_size=1, max_size=80), st.integers(1, 4))
def test_merged_partition_sketches_score_like_the_exact_rule(rows, parts) -> None:
    today = 500
    hashes: list[dict[str, int]] = [{} for _ in range(parts)]
    for i, (last, days, total) in enumerate(rows):
        f = {"purchase_days": days, "recency_days": today - last, "monetary_total": total}
        for k, d in rfm.deltas(None, rfm.contribution(f, today)).items():
            hashes[i % parts][k] = hashes[i % parts].get(k, 0) + d
    pop = rfm.Population.from_hashes(hashes)
    df = pd.DataFrame(rows, columns=["last", "days", "total"])
    df["recency"] = today - df["last"]
    want_r = exact(df, "recency", larger_is_better=False)
    want_f = exact(df, "days", larger_is_better=True)
    want_m = exact(df, "total", larger_is_better=True)
    buckets = df["total"].map(rfm.money_bucket)
    for i, (_, days, total) in enumerate(rows):
        got = pop.score({"purchase_days": days, "recency_days": int(df["recency"][i]),
                         "monetary_total": total}, today)
        assert got["rfm_r"] == want_r[i]
        assert got["rfm_f"] == want_f[i]
        # M: only customers sharing the bucket with a smaller total are miscounted.
        same = int(((buckets == buckets[i]) & (df["total"] < total)).sum())
        lo = 1 + (5 * (int((df["total"] < total).sum()) - same)) // len(df)
        assert min(5, lo) <= got["rfm_m"] <= want_m[i]
        assert want_m[i] - got["rfm_m"] <= 1 or same > len(df) // 5


@settings(max_examples=100, deadline=None)
@given(st.lists(customer, min_size=2, max_size=40), st.data())
def test_removing_old_contributions_equals_building_from_scratch(rows, data) -> None:
    today = 500
    hist: dict[str, int] = {}
    current = {}
    for i, (last, days, total) in enumerate(rows):
        f = {"purchase_days": days, "recency_days": today - last, "monetary_total": total}
        current[i] = rfm.contribution(f, today)
        for k, d in rfm.deltas(None, current[i]).items():
            hist[k] = hist.get(k, 0) + d
    # Some customers change: their old fields go, the new ones come.
    for i in data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=10)):
        last, days, total = data.draw(customer)
        new = rfm.contribution({"purchase_days": days, "recency_days": today - last,
                                "monetary_total": total}, today)
        for k, d in rfm.deltas(current[i], new).items():
            hist[k] = hist.get(k, 0) + d
        current[i] = new
    scratch: dict[str, int] = {}
    for c in current.values():
        for k in c or ():
            scratch[k] = scratch.get(k, 0) + 1
    assert {k: v for k, v in hist.items() if v} == scratch


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(-5, 60), st.integers(1, 6), min_size=1, max_size=20))
def test_thresholds_determine_every_score(counts) -> None:
    pop = rfm.Population.from_hashes([{f"f:{k}": v for k, v in counts.items()}])
    t = pop.f.thresholds()
    for v in range(-7, 63):
        below = pop.f.strictly_below(v)
        want = rfm.rank_score(below, pop.total)
        needed = [-(-(k - 1) * pop.total // 5) for k in range(2, 6)]
        got = 1 + sum(1 for th, need in zip(t, needed, strict=True)
                      if (th is None and below >= need) or (th is not None and v > th))
        assert got == want


@settings(max_examples=100, deadline=None)
@given(st.lists(customer, max_size=30), st.lists(customer, max_size=10),
       st.lists(customer, max_size=10))
def test_updating_a_population_equals_building_it_with_the_changes(rows, more, probes) -> None:
    today = 500
    feats = [{"purchase_days": d, "recency_days": today - last, "monetary_total": t}
             for last, d, t in rows + more]
    contribs = [rfm.contribution(f, today) for f in feats]
    hist: dict[str, int] = {}
    for c in contribs[:len(rows)]:
        for k, d in rfm.deltas(None, c).items():
            hist[k] = hist.get(k, 0) + d
    changes: dict[str, int] = {}
    # the new customers join, and the first old one (if any) leaves
    for old, new in [(None, c) for c in contribs[len(rows):]] + [(c, None) for c in contribs[:1]]:
        for k, d in rfm.deltas(old, new).items():
            changes[k] = changes.get(k, 0) + d
    merged = dict(hist)
    for k, d in changes.items():
        merged[k] = merged.get(k, 0) + d
    base = rfm.Population.from_hashes([hist])
    want = rfm.Population.from_hashes([merged])
    half = len(changes) // 2  # the same changes applied in two steps
    first = dict(list(changes.items())[:half])
    rest = dict(list(changes.items())[half:])
    for got in (base.updated(changes), base.updated(first).updated(rest)):
        assert got.total == want.total
        for f in feats + [{"purchase_days": d, "recency_days": today - last, "monetary_total": t}
                          for last, d, t in probes]:
            assert got.score(f, today) == want.score(f, today), f


def test_changes_a_stale_sketch_lacks_never_rank_below_nobody() -> None:
    """A sketch read before a customer's previous contribution was committed lacks it; the
    changes that replace it then take away what is not there. Scores stay within 1 to 5."""
    today = 500
    other = {"purchase_days": 40, "recency_days": 0, "monetary_total": 1e6}
    base = rfm.Population.from_hashes([rfm.deltas(None, rfm.contribution(other, today))])
    old = {"purchase_days": 1, "recency_days": 0, "monetary_total": 500.0}
    new = {"purchase_days": 2, "recency_days": 0, "monetary_total": 900.0}
    pop = base.updated(rfm.deltas(rfm.contribution(old, today), rfm.contribution(new, today)))
    for f in (new, other, old):
        got = pop.score(f, today)
        assert all(1 <= got[k] <= 5 for k in ("rfm_r", "rfm_f", "rfm_m")), (f, got)


@settings(max_examples=150, deadline=None)
@given(st.lists(customer, min_size=0, max_size=60), customer, st.data())
def test_a_rank_from_the_sketch_fields_equals_the_score_of_the_features(rows, me, data) -> None:
    """What a sweep compares with the stored score: ranked from the fields alone, overlays
    included, exactly as from the features they came from."""
    today = 500
    hist: dict[str, int] = {}
    for last, days, total in rows:
        f = {"purchase_days": days, "recency_days": today - last, "monetary_total": total}
        for k, d in rfm.deltas(None, rfm.contribution(f, today)).items():
            hist[k] = hist.get(k, 0) + d
    pop = rfm.Population.from_hashes([hist])
    if data.draw(st.booleans()):  # an overlay, as an evaluated group ranks in
        last, days, total = data.draw(customer)
        g = {"purchase_days": days, "recency_days": today - last, "monetary_total": total}
        pop = pop.updated(rfm.deltas(None, rfm.contribution(g, today)))
    last, days, total = me
    f = {"purchase_days": days, "recency_days": today - last, "monetary_total": total}
    assert pop.rank_of(rfm.contribution(f, today)) == pop.score(f, today)["rfm"]
    none = {"purchase_days": 0, "recency_days": None, "monetary_total": 0.0}
    assert pop.rank_of(rfm.contribution(none, today)) is None is pop.score(none, today)["rfm"]
