"""CDNOW through the real broker and a worker: every customer's features equal the batch oracle."""

from __future__ import annotations

import random
from pathlib import Path

import cdnow_oracle
import orjson
import pytest

from stream.replay import cdnow_events, cdnow_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_cdnow_features_equal_lifetimes_and_pandas_with_duplicates_and_a_second_replay(
        deployment, tmp_path: Path) -> None:
    events = cdnow_events(cdnow_path())
    rng = random.Random(11)
    # 10% of the events are produced a second time, a few positions later (as a retrying
    # producer would), so duplicates really reach the state and must be counted once.
    records: list[tuple[bytes, bytes]] = []
    delayed: list[tuple[int, bytes, bytes]] = []
    for i, e in enumerate(events):
        rec = (e["customer_id"].encode(), orjson.dumps(e))
        records.append(rec)
        if rng.random() < 0.10:
            delayed.append((i + rng.randint(1, 50), *rec))
        while delayed and delayed[0][0] <= i:
            _, k, v = delayed.pop(0)
            records.append((k, v))
    records += [(k, v) for _, k, v in delayed]
    assert len(records) > len(events) * 1.08

    deployment.start_worker(tmp_path)
    deployment.produce("transactions", records)
    deployment.cli("wait", "--timeout", "600")

    df = cdnow_oracle.load()
    expected = cdnow_oracle.expected_features(df)
    assert len(expected) == 23_570
    now, feats = deployment.features()
    assert now == int(df["date"].max().timestamp() * 1000)
    assert cdnow_oracle.mismatches(expected, feats) == []

    # CLV population parameters fitted from the streamed state equal lifetimes' fit.
    from lifetimes import BetaGeoFitter, GammaGammaFitter
    from lifetimes.utils import summary_data_from_transaction_data

    fit = orjson.loads(deployment.cli("clv", "fit", "--json").stdout)
    summ = summary_data_from_transaction_data(df, "customer_id", "date",
                                              monetary_value_col="amount", freq="D",
                                              observation_period_end=df["date"].max())
    bg = BetaGeoFitter().fit(summ["frequency"], summ["recency"], summ["T"])
    assert fit["customers"] == 23_570
    assert fit["bgnbd"]["time_unit"] == "days"
    for k in ("r", "alpha", "a", "b"):
        assert fit["bgnbd"][k] == pytest.approx(bg.params_[k], rel=0.01), k
    rep = summ[(summ["frequency"] > 0) & (summ["monetary_value"] > 0)]
    gg = GammaGammaFitter().fit(rep["frequency"], rep["monetary_value"])
    for k in ("p", "q", "v"):
        assert fit["gamma_gamma"][k] == pytest.approx(gg.params_[k], rel=0.01), k

    # Replaying the whole input again changes nothing.
    deployment.cli("replay", "cdnow")
    deployment.cli("wait", "--timeout", "600")
    _, again = deployment.features()
    assert again == feats
