"""Batch recomputation of the CDNOW features with pandas and lifetimes (the oracle)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from lifetimes.utils import summary_data_from_transaction_data

from stream.replay import cdnow_path


def load() -> pd.DataFrame:
    df = pd.read_csv(cdnow_path(), sep=r"\s+", skiprows=1, header=None,
                     names=["customer_id", "date", "qty", "amount"], dtype={"customer_id": str,
                                                                           "date": str})
    df["date"] = pd.to_datetime(df["date"], format="%Y%m%d")
    return df


def expected_features(df: pd.DataFrame) -> pd.DataFrame:
    end = df["date"].max()
    s = summary_data_from_transaction_data(df, "customer_id", "date", monetary_value_col="amount",
                                           freq="D", observation_period_end=end)
    g = df.groupby("customer_id")
    out = pd.DataFrame({
        "bgnbd_frequency": s["frequency"],
        "bgnbd_recency": s["recency"],
        "bgnbd_T": s["T"],
        "bgnbd_monetary": s["monetary_value"],
        "purchases_total": g.size(),
        "purchase_days": g["date"].nunique(),
        "monetary_total": g["amount"].sum(),
        "recency_days": (end - g["date"].max()).dt.days,
    })
    for w in (7, 30, 90):
        recent = df[df["date"] >= end - pd.Timedelta(days=w - 1)].groupby("customer_id")
        out[f"purchases_{w}d"] = recent.size().reindex(out.index, fill_value=0)
        out[f"spend_{w}d"] = recent["amount"].sum().reindex(out.index, fill_value=0.0)
    return out


def mismatches(expected: pd.DataFrame, actual: dict[str, dict[str, Any]]) -> list[str]:
    """Human-readable differences between the oracle and the engine's features."""
    bad = []
    if set(expected.index) != set(actual):
        bad.append(f"customer sets differ: {len(expected)} expected, {len(actual)} stored")
    for cid, row in expected.iterrows():
        f = actual.get(cid)
        if f is None:
            continue
        for col, want in row.items():
            got = f[col]
            if not math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-6):
                bad.append(f"{cid}.{col}: engine {got} != batch {want}")
    return bad
