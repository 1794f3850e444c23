"""BG/NBD and Gamma-Gamma fits against the lifetimes package on the CDNOW summary."""

from __future__ import annotations

import cdnow_oracle
import numpy as np
import pytest
from lifetimes import BetaGeoFitter, GammaGammaFitter
from lifetimes.utils import summary_data_from_transaction_data

from scorers import clv


@pytest.fixture(scope="module")
def summary():
    df = cdnow_oracle.load()
    return summary_data_from_transaction_data(df, "customer_id", "date",
                                              monetary_value_col="amount", freq="D",
                                              observation_period_end=df["date"].max())


@pytest.fixture(scope="module")
def fitted(summary):
    bg = BetaGeoFitter().fit(summary["frequency"], summary["recency"], summary["T"])
    ours = clv.fit_bgnbd(summary["frequency"], summary["recency"], summary["T"])
    return bg, ours


def test_bgnbd_parameters_match_lifetimes_within_one_percent(fitted) -> None:
    bg, ours = fitted
    for name in ("r", "alpha", "a", "b"):
        assert getattr(ours, name) == pytest.approx(bg.params_[name], rel=0.01), name


def test_p_alive_and_expected_purchases_match_lifetimes_for_the_same_parameters(
        fitted, summary) -> None:
    bg, _ = fitted
    params = clv.BgNbdParams(*(float(bg.params_[k]) for k in ("r", "alpha", "a", "b")))
    x = summary["frequency"].to_numpy()
    t_x = summary["recency"].to_numpy()
    T = summary["T"].to_numpy()
    np.testing.assert_allclose(clv.p_alive(params, x, t_x, T),
                               bg.conditional_probability_alive(x, t_x, T), rtol=1e-6)
    np.testing.assert_allclose(clv.expected_purchases(params, 90, x, t_x, T),
                               bg.conditional_expected_number_of_purchases_up_to_time(
                                   90, x, t_x, T), rtol=1e-6)


def test_gamma_gamma_matches_lifetimes(summary) -> None:
    rep = summary[(summary["frequency"] > 0) & (summary["monetary_value"] > 0)]
    gg = GammaGammaFitter().fit(rep["frequency"], rep["monetary_value"])
    ours = clv.fit_gamma_gamma(summary["frequency"], summary["monetary_value"])
    for name in ("p", "q", "v"):
        assert getattr(ours, name) == pytest.approx(gg.params_[name], rel=0.01), name
    params = clv.GammaGammaParams(*(float(gg.params_[k]) for k in ("p", "q", "v")))
    np.testing.assert_allclose(
        clv.expected_spend(params, rep["frequency"], rep["monetary_value"]),
        gg.conditional_expected_average_profit(rep["frequency"], rep["monetary_value"]),
        rtol=1e-6)


def test_no_clv_where_gamma_gamma_has_no_finite_expectation() -> None:
    """With q <= 1 the population mean spend p v / (q - 1) is not finite (a refit on
    skewed data found q = 0.16: clv_90d of -2.7e12 for customers without repeats), and the
    model has no spend for a repeat customer whose refunds outweigh their purchases."""
    from scorers.scoring import ClvModel, clv_scores_many

    bg = clv.BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426)
    feats = [{"bgnbd_frequency": x, "bgnbd_recency": 30.0, "bgnbd_T": 60.0, "bgnbd_monetary": m}
             for x, m in ((0, 0.0), (3, 40.0), (2, -5.0), (2, 0.0))]
    # zero spends (CDNOW has some) keep a value: p v / (p x + q - 1)
    for q, want in ((0.16, [False, True, False, True]), (3.74, [True, True, False, True])):
        model = ClvModel(bg, clv.GammaGammaParams(p=6.25, q=q, v=15.44), 1)
        got = clv_scores_many(model, feats)
        assert [g["clv_90d"] is not None for g in got] == want, q
        for g, f in zip(got, feats, strict=True):
            assert g["expected_purchases_90d"] is not None  # BG/NBD stays defined
            if g["clv_90d"] is not None:
                x, m = f["bgnbd_frequency"], f["bgnbd_monetary"]
                spend = (6.25 * 15.44 + 6.25 * x * m) / (6.25 * x + q - 1)  # the paper's form
                assert g["clv_90d"] == pytest.approx(g["expected_purchases_90d"] * spend)
                assert g["clv_90d"] > 0
    assert clv_scores_many(ClvModel(bg, None, 1), feats)[2]["clv_90d"] is None  # no fit yet
