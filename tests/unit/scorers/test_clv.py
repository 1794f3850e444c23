"""BG/NBD and Gamma-Gamma fits against the lifetimes package on the CDNOW summary."""

from __future__ import annotations

import contextlib
import io
import math

import cdnow_oracle
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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


def _prefix_summary(until: str):
    df = cdnow_oracle.load()
    df = df[df["date"] < until]
    return summary_data_from_transaction_data(df, "customer_id", "date",
                                              monetary_value_col="amount", freq="D",
                                              observation_period_end=df["date"].max())


@pytest.mark.parametrize("until", ["1997-01-08", "1997-01-15", "1997-03-01"])
def test_bgnbd_fit_on_short_histories_stays_finite_and_at_least_as_likely_as_lifetimes(
        until) -> None:
    # A deployment refits from its first days. There the difference of two betaln values
    # lost every digit at huge a and b, and the fit followed the rounding noise to a = 8.5e15
    # (1997-03-01) or 5.5e307 (1997-01-15), with a likelihood lifetimes puts far below its own.
    summ = _prefix_summary(until)
    x, t_x, big_t = (summ[c].to_numpy() for c in ("frequency", "recency", "T"))
    ours = clv.fit_bgnbd(x, t_x, big_t)
    values = np.array([ours.r, ours.alpha, ours.a, ours.b])
    assert np.isfinite(values).all() and (values > 0).all()
    assert (np.abs(np.log(values[[0, 2, 3]])) <= 20 + 1e-9).all()
    nll = BetaGeoFitter._negative_log_likelihood
    weights = np.ones(len(x))
    ours_nll = nll(np.log(values), x, t_x, big_t, weights, 0.0)
    try:
        bg = BetaGeoFitter().fit(x, t_x, big_t)
    except Exception:  # lifetimes does not converge on the first week
        bg = None
    if bg is not None:
        theirs_nll = nll(np.log(bg.params_[["r", "alpha", "a", "b"]].to_numpy()), x, t_x,
                         big_t, weights, 0.0)
        assert ours_nll <= theirs_nll + 1e-9
        if until == "1997-03-01":  # a well-identified optimum: the same parameters
            for name in ("r", "alpha", "a", "b"):
                assert getattr(ours, name) == pytest.approx(bg.params_[name], rel=0.01), name
    # Scores from the fit are finite for every customer and equal lifetimes' closed forms.
    assert np.isfinite(clv.p_alive(ours, x, t_x, big_t)).all()
    exp90 = clv.expected_purchases(ours, 90, x, t_x, big_t)
    assert np.isfinite(exp90).all()
    ref = BetaGeoFitter()
    ref.params_ = pd.Series({"r": ours.r, "alpha": ours.alpha, "a": ours.a, "b": ours.b})
    theirs = ref.conditional_expected_number_of_purchases_up_to_time(90, x, t_x, big_t)
    # lifetimes' log-space form gives NaN for some customers when a < 1; ours stays finite.
    known = np.isfinite(theirs)
    assert known.mean() > 0.5
    np.testing.assert_allclose(exp90[known], theirs[known], rtol=1e-6)


@pytest.mark.parametrize("until", ["1997-01-08", "1997-01-15", "1997-02-01"])
def test_gamma_gamma_fit_on_short_histories_stays_finite(until) -> None:
    summ = _prefix_summary(until)
    gg = clv.fit_gamma_gamma(summ["frequency"], summ["monetary_value"])
    values = np.array([gg.p, gg.q, gg.v])
    assert np.isfinite(values).all() and (np.abs(np.log(values)) <= 20 + 1e-9).all()
    spend = clv.expected_spend(gg, summ["frequency"], summ["monetary_value"])
    assert np.isfinite(spend[summ["frequency"].to_numpy() > 0]).all()
    rep = summ[(summ["frequency"] > 0) & (summ["monetary_value"] > 0)]
    try:
        ref = GammaGammaFitter().fit(rep["frequency"], rep["monetary_value"])
    except Exception:  # lifetimes does not converge on the first weeks
        return
    nll = GammaGammaFitter._negative_log_likelihood
    args = (rep["frequency"].to_numpy(), rep["monetary_value"].to_numpy(),
            np.ones(len(rep)), 0.0)
    assert nll(np.log(values), *args) <= nll(np.log(ref.params_.to_numpy()), *args) + 1e-9


@given(st.floats(1e-3, 1e18), st.floats(1e-3, 1e18), st.integers(0, 300))
@settings(max_examples=200, deadline=None)
def test_log_beta_ratio_equals_the_exact_product(a, b, x) -> None:
    exact = -math.fsum(math.log1p(a / (b + k)) for k in range(x))
    got = float(clv._log_beta_ratio(a, b, np.array([float(x)]))[0])
    assert got == pytest.approx(exact, rel=1e-9, abs=1e-9)


@given(st.floats(1e-2, 1e18), st.integers(0, 200))
@settings(max_examples=200, deadline=None)
def test_log_poch_equals_the_exact_sum_of_logs(z, n) -> None:
    exact = math.fsum(math.log(z + k) for k in range(n))
    assert float(clv._log_poch(z, n)) == pytest.approx(exact, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("x, t_x, big_t", [
    ([0] * 50, [0] * 50, [0] * 50),     # every purchaser bought for the first time today
    ([0] * 50, [0] * 50, [5] * 50),     # nobody has bought twice yet
    ([2] * 50, [0] * 50, [0] * 50),     # inconsistent, but again no time observed
])
def test_bgnbd_refuses_data_that_cannot_identify_it(x, t_x, big_t) -> None:
    """The likelihood is flat there: the optimiser would return its start (a = 1), and
    the expected purchases' (a + b + x - 1) / (a - 1) would be infinite."""
    with pytest.raises(ValueError, match="repeat purchases"):
        clv.fit_bgnbd(x, t_x, big_t)


@pytest.mark.parametrize("x, t_x, big_t", [
    ([2, 1, 0], [5, 3, 0], [10, -2, 4]),   # a first purchase after the observation end
    ([2, 1, 0], [5, 9, 0], [10, 6, 4]),    # a repeat purchase after it
    ([2, 1, 0], [5, 3, 0], [10, float("nan"), 4]),
])
def test_bgnbd_refuses_customers_observed_before_their_purchases(x, t_x, big_t) -> None:
    """Such a row made the likelihood NaN everywhere, and the optimiser's starting point
    (r = a = b = 1) came back as the fit, which was stored and served."""
    with pytest.raises(ValueError, match="out of range"):
        clv.fit_bgnbd(x, t_x, big_t)


@pytest.mark.parametrize("x, m", [([0, 0, 0], [0.0, 0.0, 0.0]), ([1, 2], [-5.0, -3.0]),
                                  ([0, 3], [12.0, 0.0])])
def test_gamma_gamma_refuses_data_without_a_repeat_customer_of_positive_spend(x, m) -> None:
    with pytest.raises(ValueError, match="positive mean spend"):
        clv.fit_gamma_gamma(x, m)


def test_scores_of_parameters_at_a_degenerate_point_are_null_not_infinite() -> None:
    """Parameters stored by an older version from such data (a = 1 exactly): no
    infinite expected purchases or CLV reach the rules, whose comparisons would take
    -inf as a real number (``clv_90d < 20`` would match everyone)."""
    from scorers.scoring import ClvModel, clv_scores_many

    model = ClvModel(clv.BgNbdParams(r=1.0, alpha=0.1, a=1.0, b=1.0),
                     clv.GammaGammaParams(p=1.0, q=1.0, v=1.0), 1)
    feats = [{"bgnbd_frequency": x, "bgnbd_recency": x, "bgnbd_T": x, "bgnbd_monetary": m}
             for x, m in ((0, 0.0), (1, 20.0))]
    for got in clv_scores_many(model, feats):
        assert got["expected_purchases_90d"] is None and got["clv_90d"] is None
        assert got["p_alive"] is None or math.isfinite(got["p_alive"])


def _expected_purchases_decimal(p: clv.BgNbdParams, t: float, x: int, t_x: float,
                                T: float) -> float:
    """The BG/NBD conditional expectation (Fader, Hardie and Lee 2005, eq. 10) with its
    2F1 summed term by term in 60-digit decimals: no scipy, no transformation."""
    from decimal import Decimal, getcontext

    getcontext().prec = 60
    r, alpha, a, b = (Decimal(repr(v)) for v in (p.r, p.alpha, p.a, p.b))
    t_, x_, tx_, T_ = (Decimal(repr(float(v))) for v in (t, x, t_x, T))
    A, B, C = r + x_, b + x_, a + b + x_ - 1
    z = t_ / (alpha + T_ + t_)
    total = term = Decimal(1)
    n = 0
    while n < 10 or abs(term) > Decimal("1e-40") * abs(total):
        term = term * (A + n) * (B + n) / ((C + n) * (n + 1)) * z
        total += term
        n += 1
    second = 1 - total * ((alpha + T_) / (alpha + t_ + T_)) ** A
    first = (a + b + x_ - 1) / (a - 1)
    denom = 1 + (a / (b + x_ - 1) * ((alpha + T_) / (alpha + tx_)) ** A if x > 0 else 0)
    return float(first * second / denom)


@pytest.mark.parametrize("r,alpha", [(1e3, 9.965e3), (3e4, 3e4 * 9.965), (1e6, 9.965e6),
                                     (2.5e8, 2.5e8 * 9.965), (3e4, 3e3), (5e4, 2e3)])
def test_expected_purchases_stay_finite_and_exact_for_a_huge_r(r: float, alpha: float) -> None:
    """A fit of customers whose purchase rates barely differ sends r and alpha up together
    (r / alpha fixed); scipy's 2F1 gives NaN past r of about 2e4, which made every
    customer's expected purchases and CLV null. The last two: rates of 10 and 25 purchase
    days a day, where the series' sum passes the largest double."""
    p = clv.BgNbdParams(r=r, alpha=alpha, a=0.815, b=15.22)
    x = np.array([35, 0, 1, 4, 120])
    t_x = np.array([327.0, 0.0, 10.0, 200.0, 700.0])
    T = np.array([344.0, 30.0, 400.0, 210.0, 730.0])
    got = clv.expected_purchases(p, 90.0, x, t_x, T)
    assert np.isfinite(got).all()
    for i in range(len(x)):
        want = _expected_purchases_decimal(p, 90.0, int(x[i]), t_x[i], T[i])
        assert got[i] == pytest.approx(want, rel=1e-8, abs=1e-12), (i, got[i], want)
    # a single customer gives the same number as in a column
    assert clv.expected_purchases(p, 90.0, 35, 327.0, 344.0) == pytest.approx(got[0],
                                                                              rel=1e-12)


def _hyp2f1_decimal(a: float, b: float, c: float, z: float) -> float:
    """2F1(a, b; c; z) summed term by term in 50-digit decimals (0 <= z < 1, positive
    parameters: every term positive)."""
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    a_, b_, c_, z_ = (Decimal(repr(v)) for v in (a, b, c, z))
    total = term = Decimal(1)
    n = 0
    while n < 10 or term > Decimal("1e-30") * total:
        term = term * (a_ + n) * (b_ + n) / ((c_ + n) * (n + 1)) * z_
        total += term
        n += 1
    return float(total)


@settings(max_examples=150, deadline=None)
@given(st.floats(0.05, 500.0), st.floats(0.05, 50.0), st.floats(0.05, 600.0),
       st.floats(0.0, 0.5))
def test_the_2f1_series_is_exact_where_expected_purchases_sums_it(
        a: float, b: float, c: float, z: float) -> None:
    """2F1(r + x, b + x; a + b + x - 1; t / (alpha + T + t)): every term positive. (Not
    against scipy: its 2F1(207, 1; 104; 0.5) is 6.7e31, the sum 19.01.)"""
    want = _hyp2f1_decimal(a, b, c, z)
    got = float(clv.hyp2f1_series(a, b, c, z)[()])
    if want < 1e300:
        assert got == pytest.approx(want, rel=1e-10)
    assert float(clv.hyp2f1_series(207.0, 1.0, 104.0, 0.5)[()]) == pytest.approx(
        19.010285736651658, rel=1e-12)


def test_the_2f1_series_refuses_what_it_cannot_sum() -> None:
    """NaN outside |z| < 1 and for a NaN parameter (at once, not after every term), the
    series' own value where c is negative (terms change sign: scipy's value there)."""
    import time

    from scipy.special import hyp2f1

    assert np.isnan(clv.hyp2f1_series(1.0, 1.0, 1.0, 2.0)[()])
    assert np.isnan(clv.hyp2f1_series([1.0, 1.0], 1.0, 1.0, [-1.5, 0.5])).tolist() == [True,
                                                                                      False]
    t0 = time.process_time()
    assert np.isnan(clv.hyp2f1_series(math.nan, 1.0, 1.0, 0.5)[()])
    assert time.process_time() - t0 < 0.05
    assert clv.hyp2f1_series(3.0, 0.5, -0.2, 0.3)[()] == pytest.approx(
        float(hyp2f1(3.0, 0.5, -0.2, 0.3)), rel=1e-12)
    # its logarithm past the largest double, against a decimal sum
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    total = term = Decimal(1)
    for n in range(20_000):
        term = term * (1000 + n) * (1000 + n) / ((1 + n) * (n + 1)) * Decimal("0.5")
        total += term
    got = clv.hyp2f1_series(1000.0, 1000.0, 1.0, 0.5, log=True)[()]
    assert got > 710 and got == pytest.approx(float(total.ln()), rel=1e-12)
    assert np.isinf(clv.hyp2f1_series(1000.0, 1000.0, 1.0, 0.5)[()])


def _gg_nll(params: tuple[float, float, float], x: np.ndarray, m: np.ndarray) -> float:
    """lifetimes' own Gamma-Gamma negative log-likelihood at ``params``."""
    return float(GammaGammaFitter._negative_log_likelihood(
        np.log(np.asarray(params, dtype=float)), x, m, np.ones(len(x)), 0.0))


def _lifetimes_gg(x: np.ndarray, m: np.ndarray) -> tuple[float, float, float] | None:
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a fit it doubts
            fit = GammaGammaFitter().fit(x, m)
    except Exception:  # lifetimes does not converge on every sample
        return None
    return tuple(float(v) for v in fit.params_[["p", "q", "v"]])


def test_gamma_gamma_fit_does_not_stop_on_the_ridge_below_the_maximum() -> None:
    """Eight repeat customers where a single start ran out along the p -> inf, v -> 0 ridge
    and stopped at a lower likelihood than lifetimes' fit of the same data."""
    x = np.array([4, 2, 1, 1, 4, 1, 1, 4], dtype=float)
    m = np.array([10.07, 16.87, 21.07, 11.96, 24.48, 4.04, 10.9, 35.95])
    ref = _lifetimes_gg(x, m)
    assert ref is not None
    gg = clv.fit_gamma_gamma(x, m)
    assert _gg_nll((gg.p, gg.q, gg.v), x, m) <= _gg_nll(ref, x, m) + 1e-9
    assert gg.p == pytest.approx(ref[0], rel=0.02) and gg.q == pytest.approx(ref[1], rel=0.02)


def test_gamma_gamma_fit_is_at_least_as_likely_as_lifetimes_on_samples_of_the_model() -> None:
    """Samples drawn from the Gamma-Gamma model itself, over a wide range of parameters:
    the fit's likelihood is never below lifetimes' fit of the same sample."""
    rng = np.random.default_rng(11)
    compared = 0
    for _ in range(40):
        p, q, v = np.exp(rng.uniform(np.log([0.5, 1.5, 1.0]), np.log([15.0, 15.0, 100.0])))
        n = int(rng.choice([50, 200]))
        x = rng.integers(1, 12, n).astype(float)
        m = rng.gamma(p * x, 1 / (rng.gamma(q, 1 / v, n) * x))
        ref = _lifetimes_gg(x, m)
        if ref is None:
            continue
        compared += 1
        gg = clv.fit_gamma_gamma(x, m)
        assert _gg_nll((gg.p, gg.q, gg.v), x, m) <= _gg_nll(ref, x, m) + 1e-6 * n, (p, q, v, n)
    assert compared >= 25
