"""The independent batch oracle of every contract feature, computed with pandas.

:func:`oracle` recomputes every feature from a raw list of events with pandas
group-bys and filters; it never calls into ``features.state``. The property tests
hold the incremental state to it, and the fault-injection suite holds the state a
worker left in Redis to it.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from features.events import (
    FEATURE_USE,
    LOGIN,
    MS_PER_DAY,
    SUPPORT_TICKET,
    UNITS_PER_CURRENCY,
    Event,
    TransactionEvent,
    day_of,
    from_units,
)
from features.state import FEATURE_NAMES

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_ms(ts_ms: Any) -> str | None:
    """RFC 3339 UTC with milliseconds and ``Z``, by integer arithmetic only."""
    if ts_ms is None or pd.isna(ts_ms):
        return None
    secs, ms = divmod(int(ts_ms), 1000)
    return f"{_EPOCH + timedelta(seconds=secs):%Y-%m-%dT%H:%M:%S}.{ms:03d}Z"


def _frame(events: list[Event]) -> pd.DataFrame:
    """One row per distinct event: ids are a customer's, per input topic (README), so the
    same id of another customer, or of a click and a purchase, is another event; a
    redelivery carries identical content."""
    rows: dict[tuple[str, bool, str], tuple[Any, ...]] = {}
    for e in events:
        if isinstance(e, TransactionEvent):
            row = (e.customer_id, e.ts_ms, e.kind, e.amount_units, None, None)
        else:
            row = (e.customer_id, e.ts_ms, "click", 0, e.event_type, e.session_id)
        rows.setdefault((e.customer_id, isinstance(e, TransactionEvent), e.event_id), row)
    cols = list(zip(*rows.values(), strict=True)) or [()] * 6
    df = pd.DataFrame({
        "event_id": pd.Series([k[2] for k in rows], dtype=object),
        "customer_id": pd.Series(cols[0], dtype=object),
        "ts": pd.Series(cols[1], dtype="int64"),
        "kind": pd.Series(cols[2], dtype=object),
        "amount": pd.Series(cols[3], dtype="int64"),
        "event_type": pd.Series(cols[4], dtype=object),
        "session_id": pd.Series(cols[5], dtype=object),
    })
    assert not df[["customer_id", "kind", "event_id"]].duplicated().any()
    df["day"] = df["ts"] // MS_PER_DAY
    df["signed"] = df["amount"].where(df["kind"] == "purchase",
                                      (-df["amount"]).where(df["kind"] == "refund", 0))
    df["is_purchase"] = (df["kind"] == "purchase").astype("int64")
    return df


def oracle(
    events: list[Event], now_ms: int, customers: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """Every contract feature of every customer, recomputed in batch from the raw events.

    ``customers`` adds customers that may have no events at all. Every window or kind
    filter is a boolean mask over the deduplicated event frame; counts, sums, distinct
    counts and extremes are then a handful of pandas group-bys per customer.
    """
    df = _frame(events)
    today = day_of(now_ms)
    idx = pd.Index(sorted(set(df["customer_id"]) | set(customers)), name="customer_id")
    cid = df["customer_id"].to_numpy(dtype=object)
    day = df["day"].to_numpy()
    ts = df["ts"].to_numpy()
    kind = df["kind"].to_numpy(dtype=object)
    etype = df["event_type"].to_numpy(dtype=object)
    session = df["session_id"].to_numpy(dtype=object)
    signed = df["signed"].to_numpy()
    is_pur = kind == "purchase"
    is_ref = kind == "refund"
    is_tx = is_pur | is_ref
    is_clk = kind == "click"

    def in_window(days: int) -> np.ndarray:
        return (day >= today - (days - 1)) & (day <= today)

    def masked(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.where(mask, values, None).astype(object)

    # Additive quantities: one 0/1 (or signed money) column each, summed per customer.
    add: dict[str, np.ndarray] = {
        "purchases_total": is_pur,
        "refunds_total": is_ref,
        "monetary_units": np.where(is_tx, signed, 0),
        "events_total": is_clk,
    }
    for w in (7, 30, 90):
        add[f"purchases_{w}d"] = is_pur & in_window(w)
        add[f"spend_units_{w}d"] = np.where(is_tx & in_window(w), signed, 0)
    for w in (1, 7, 30):
        add[f"events_{w}d"] = is_clk & in_window(w)
    for w in (7, 30):
        add[f"logins_{w}d"] = is_clk & in_window(w) & (etype == LOGIN)
    add["feature_uses_30d"] = is_clk & in_window(30) & (etype == FEATURE_USE)
    add["support_tickets_30d"] = is_clk & in_window(30) & (etype == SUPPORT_TICKET)
    # Week k covers days [today - 7*(8-k) + 1, today - 7*(7-k)], k = 0..7.
    for k in range(8):
        lo, hi = today - 7 * (8 - k) + 1, today - 7 * (7 - k)
        add[f"week{k}"] = is_clk & (day >= lo) & (day <= hi)
    sums = (pd.DataFrame({k: v.astype("int64") for k, v in add.items()}, index=cid)
            .groupby(level=0).sum().reindex(idx, fill_value=0))

    # Distinct counts: values masked to None outside their filter (nunique skips them).
    distinct = pd.DataFrame({
        "purchase_days": masked(day, is_pur),
        "sessions_7d": masked(session, is_clk & in_window(7)),
        "sessions_30d": masked(session, is_clk & in_window(30)),
        "active_days_7d": masked(day, is_clk & in_window(7)),
        "active_days_30d": masked(day, is_clk & in_window(30)),
        "distinct_event_types_30d": masked(etype, is_clk & in_window(30)),
    }, index=cid).groupby(level=0).nunique().reindex(idx, fill_value=0)

    # Extremes: NaN outside the filter (min/max skip it), NaN for customers without any.
    ext = pd.DataFrame({
        "first_seen_ts": ts.astype(float),
        "purchase_ts": np.where(is_pur, ts, np.nan),
        "click_ts": np.where(is_clk, ts, np.nan),
    }, index=cid).groupby(level=0)
    lows, highs = ext.min().reindex(idx), ext.max().reindex(idx)

    # BG/NBD inputs: one row per (customer, purchase day) with the day's net spend.
    per_day = df[is_tx].groupby(["customer_id", "day"])[["is_purchase", "signed"]].sum()
    pdays = per_day[per_day["is_purchase"] > 0].reset_index()
    first_day = pdays.groupby("customer_id")["day"].transform("min")
    pdays["repeat"] = (pdays["day"] != first_day).astype("int64")
    pdays["repeat_net"] = pdays["signed"].where(pdays["repeat"] == 1, 0)
    g = pdays.groupby("customer_id")
    bg = pd.DataFrame({
        "n_days": g.size(), "first_day": g["day"].min(), "last_day": g["day"].max(),
        "n_repeat": g["repeat"].sum(), "repeat_net": g["repeat_net"].sum(),
    }).reindex(idx)

    def opt_int(v: Any) -> int | None:
        return None if pd.isna(v) else int(v)

    out: dict[str, dict[str, Any]] = {}
    for c in idx:
        s, u, b = sums.loc[c], distinct.loc[c], bg.loc[c]
        first_seen = opt_int(lows.loc[c, "first_seen_ts"])
        first_pur = opt_int(lows.loc[c, "purchase_ts"])
        last_pur = opt_int(highs.loc[c, "purchase_ts"])
        last_click = opt_int(highs.loc[c, "click_ts"])
        f: dict[str, Any] = {
            "first_seen_at": iso_ms(first_seen),
            "tenure_days": None if first_seen is None else today - first_seen // MS_PER_DAY,
            "first_purchase_at": iso_ms(first_pur),
            "last_purchase_at": iso_ms(last_pur),
            "purchases_total": int(s["purchases_total"]),
            "refunds_total": int(s["refunds_total"]),
            "purchase_days": int(u["purchase_days"]),
            "monetary_total": from_units(int(s["monetary_units"])),
            "recency_days": None if last_pur is None else today - last_pur // MS_PER_DAY,
        }
        for w in (7, 30, 90):
            f[f"purchases_{w}d"] = int(s[f"purchases_{w}d"])
            f[f"spend_{w}d"] = from_units(int(s[f"spend_units_{w}d"]))
        if pd.isna(b["n_days"]):
            f.update(bgnbd_frequency=None, bgnbd_recency=None, bgnbd_T=None,
                     bgnbd_monetary=None)
        else:
            n_rep = int(b["n_repeat"])
            f["bgnbd_frequency"] = int(b["n_days"]) - 1
            f["bgnbd_recency"] = int(b["last_day"]) - int(b["first_day"])
            f["bgnbd_T"] = today - int(b["first_day"])
            f["bgnbd_monetary"] = (int(b["repeat_net"]) / n_rep / UNITS_PER_CURRENCY
                                   if n_rep else 0.0)
        f["last_event_at"] = iso_ms(last_click)
        f["days_since_last_event"] = (None if last_click is None
                                      else today - last_click // MS_PER_DAY)
        f["events_total"] = int(s["events_total"])
        for w in (1, 7, 30):
            f[f"events_{w}d"] = int(s[f"events_{w}d"])
        for w in (7, 30):
            f[f"sessions_{w}d"] = int(u[f"sessions_{w}d"])
            f[f"active_days_{w}d"] = int(u[f"active_days_{w}d"])
            f[f"logins_{w}d"] = int(s[f"logins_{w}d"])
        f["feature_uses_30d"] = int(s["feature_uses_30d"])
        f["support_tickets_30d"] = int(s["support_tickets_30d"])
        f["distinct_event_types_30d"] = int(u["distinct_event_types_30d"])
        weeks = np.array([s[f"week{k}"] for k in range(8)], dtype=float)
        f["activity_trend_8w"] = float(np.polyfit(np.arange(8, dtype=float), weeks, 1)[0])
        out[c] = f
    return out


_FLOAT_FEATURES = frozenset(
    {"monetary_total", "spend_7d", "spend_30d", "spend_90d", "bgnbd_monetary",
     "activity_trend_8w"})
_STR_FEATURES = frozenset({"first_seen_at", "first_purchase_at", "last_purchase_at",
                           "last_event_at"})
_INT_FEATURES = frozenset(FEATURE_NAMES) - _FLOAT_FEATURES - _STR_FEATURES


def assert_features_equal(got: dict[str, Any], want: dict[str, Any], ctx: str = "") -> None:
    assert tuple(got) == FEATURE_NAMES, ctx
    assert set(want) == set(FEATURE_NAMES), ctx
    bad = []
    for name in FEATURE_NAMES:
        g, w = got[name], want[name]
        if w is None or g is None:
            ok = g is None and w is None
        elif name in _FLOAT_FEATURES:
            ok = isinstance(g, float) and math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-9)
        elif name in _STR_FEATURES:
            ok = isinstance(g, str) and g == w
        else:
            ok = isinstance(g, int) and not isinstance(g, bool) and g == w
        if not ok:
            bad.append(f"{name}: got {g!r}, want {w!r}")
    assert not bad, f"{ctx}\n" + "\n".join(bad)
