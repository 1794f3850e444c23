"""Customer lifetime value: BG/NBD (Fader, Hardie & Lee 2005) and Gamma-Gamma (Fader & Hardie 2013).

Pure math on the BG/NBD inputs of :mod:`features.state` (``x`` = ``bgnbd_frequency``,
``t_x`` = ``bgnbd_recency``, ``T`` = ``bgnbd_T``, all in days; ``m`` = ``bgnbd_monetary``).
Population parameters are maximum-likelihood fits (scipy); per-customer expressions are the
closed forms of the papers, in the same parameterisation as the ``lifetimes`` package.

>>> p = BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426)
>>> round(p_alive(p, x=2, t_x=30.43, T=38.86), 4)
0.7266
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize
from scipy.special import betaln, gammaln, hyp2f1


@dataclass(frozen=True)
class BgNbdParams:
    """BG/NBD population parameters; ``alpha`` is in days."""

    r: float
    alpha: float
    a: float
    b: float

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "time_unit": "days"}


@dataclass(frozen=True)
class GammaGammaParams:
    """Gamma-Gamma spend model parameters."""

    p: float
    q: float
    v: float


# Repeat purchase days above this use ``betaln`` directly (a customer with more repeat days
# than this has bought on most days for over a century).
_MAX_SUM_TERMS = 50_000
# Fits search each parameter's logarithm within these bounds (about 2e-9 to 5e8): beyond
# them the likelihood is flat to double precision, and a parameter there means "as good as
# infinite or zero" for every score computed from it.
_LOG_BOUND = 20.0


def _arr(v: ArrayLike) -> NDArray[np.float64]:
    return np.asarray(v, dtype=float)


def _log_beta_ratio(a: float, b: float, x: NDArray[np.float64]) -> NDArray[np.float64]:
    """``betaln(a, b + x) - betaln(a, b)``, accurate also where ``a`` and ``b`` are huge.

    The difference of two ``betaln`` values loses every digit once ``a`` and ``b`` reach about
    1e12 (each term is then about 1e13 or more), and a fit that follows the noise runs off
    towards infinity. For whole ``x`` (repeat purchase days always are) it is the finite sum
    ``-sum(log1p(a / (b + k)) for k < x)``, which has no cancellation.
    """
    whole = x.size > 0 and bool(np.all((x >= 0) & (x == np.floor(x))))
    top = int(x.max()) if whole else 0
    if not whole or top > _MAX_SUM_TERMS:
        return betaln(a, b + x) - betaln(a, b)  # type: ignore[no-any-return]
    terms = np.cumsum(-np.log1p(a / (b + np.arange(top, dtype=float))))
    return np.concatenate(([0.0], terms))[x.astype(np.int64)]


def _log_poch(z: Any, a: Any) -> Any:
    """``gammaln(z + a) - gammaln(z)``, accurate also where ``z`` is huge.

    The plain difference loses about ``z * log(z)`` machine epsilons; for ``z`` above 1e7
    (and ``a`` small beside it) the Stirling series of the difference is used instead:
    ``a log z + a (a - 1) / (2 z) - a (a - 1) (2 a - 1) / (12 z**2)``, whose next term is
    below ``a**4 / z**3``.
    """
    z, a = np.asarray(z, dtype=float), np.asarray(a, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        series = (a * np.log(z) + a * (a - 1) / (2 * z)
                  - a * (a - 1) * (2 * a - 1) / (12 * z * z))
    big = (z > 1e7) & (np.abs(a) < 1e-5 * z)
    return np.where(big, series, gammaln(z + a) - gammaln(z))


def bgnbd_loglik(params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike
                 ) -> NDArray[np.float64]:
    """Per-customer BG/NBD log-likelihood."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    x, t_x, T = _arr(x), _arr(t_x), _arr(T)
    a1 = _log_poch(r, x) + r * np.log(alpha)
    a2 = _log_beta_ratio(a, b, x)
    a3 = -(r + x) * np.log(alpha + T)
    with np.errstate(divide="ignore"):
        a4 = np.log(a) - np.log(b + np.maximum(x, 1) - 1) - (r + x) * np.log(alpha + t_x)
    tail = np.where(x > 0, np.logaddexp(a3, a4), a3)
    return a1 + a2 + tail  # type: ignore[no-any-return]


def fit_bgnbd(x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> BgNbdParams:
    """Maximum-likelihood BG/NBD parameters (identical customers are pooled by weight).

    Raises :class:`ValueError` when the data cannot identify them: no customer with a
    repeat purchase, or none observed for any time (every ``T`` 0), where the
    likelihood is flat and the optimiser would hand back its starting point.
    """
    x, t_x, T = _arr(x), _arr(t_x), _arr(T)
    if not (x > 0).any() or not (T > 0).any():
        raise ValueError("BG/NBD needs customers with repeat purchases and some time "
                         "observed (bgnbd_frequency > 0 and bgnbd_T > 0)")
    if not (np.isfinite(x) & np.isfinite(t_x) & np.isfinite(T)).all() or (
            (x < 0) | (t_x < 0) | (t_x > T)).any():
        raise ValueError("BG/NBD inputs out of range: every customer needs "
                         "0 <= bgnbd_recency <= bgnbd_T and bgnbd_frequency >= 0")
    rows, weights = np.unique(np.column_stack([x, t_x, T]), axis=0, return_counts=True)
    ux, ut, uT = rows[:, 0], rows[:, 1], rows[:, 2]
    # Work in a time unit where T is about 10, as the likelihood is badly scaled in days.
    scale = 10.0 / max(float(uT.max()), 1.0)

    def nll(logp: NDArray[np.float64]) -> float:
        r, alpha, a, b = np.exp(logp)
        ll = bgnbd_loglik(BgNbdParams(r, alpha, a, b), ux, ut * scale, uT * scale)
        return float(-(weights * ll).sum() / weights.sum())

    best = None
    bounds = [(-_LOG_BOUND, _LOG_BOUND)] * 4
    for start in (np.zeros(4), np.log([0.5, 1.0, 0.5, 2.0])):
        res = minimize(nll, start, method="Nelder-Mead", bounds=bounds,
                       options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20_000,
                                "maxfev": 40_000})
        res = minimize(nll, res.x, method="L-BFGS-B", bounds=bounds,
                       options={"ftol": 1e-15, "gtol": 1e-10})
        if best is None or res.fun < best.fun or not np.isfinite(best.fun):
            best = res
    assert best is not None
    if not np.isfinite(best.fun):
        raise ValueError("the BG/NBD likelihood is not finite at any point tried")
    r, alpha, a, b = np.exp(best.x)
    return BgNbdParams(float(r), float(alpha / scale), float(a), float(b))


def p_alive(params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> Any:
    """Probability the customer is still alive at ``T``."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    x, t_x, T = _arr(x), _arr(t_x), _arr(T)
    log_div = (r + x) * np.log((alpha + T) / (alpha + t_x)) + np.log(
        a / (b + np.maximum(x, 1) - 1))
    out = np.where(x > 0, 1.0 / (1.0 + np.exp(log_div)), 1.0)
    return out if out.ndim else float(out)


def expected_purchases(params: BgNbdParams, t: float, x: ArrayLike, t_x: ArrayLike,
                       T: ArrayLike) -> Any:
    """Expected repeat purchases in the next ``t`` days given the customer's history."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    x, t_x, T = _arr(x), _arr(t_x), _arr(T)
    _a, _b, _c = r + x, b + x, a + b + x - 1
    z = t / (alpha + T + t)
    hyp = hyp2f1(_a, _b, _c, z)
    first = (a + b + x - 1) / (a - 1)
    second = np.asarray(1 - hyp * ((alpha + T) / (alpha + t + T)) ** (r + x), dtype=float)
    lost = ~np.isfinite(second)
    if lost.any():
        # scipy's 2F1 gives NaN for a large first parameter (r + x past about 2e4: a fit
        # of customers whose rates barely differ sends r and alpha up together). Its
        # series has positive terms here (0 < z < 1, b + x > 0, and a + b + x - 1 > 0 but
        # for a customer without repeat purchases when a + b < 1), so summing it loses no
        # digits; it is kept in logarithms, (1 - z)^(r + x) applied there too.
        shape = second.shape
        second = second.reshape(-1).copy()
        idx = np.flatnonzero(lost.reshape(-1))

        def pick(v: Any) -> NDArray[np.float64]:
            return np.broadcast_to(v, shape).reshape(-1)[idx]

        log_sum = hyp2f1_series(pick(_a), pick(_b), pick(_c), pick(z), log=True)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            second[idx] = 1 - np.exp(log_sum + pick(_a) * np.log1p(-pick(z)))
        second = second.reshape(shape)
    with np.errstate(over="ignore"):  # a ratio past the largest double: the customer is gone
        odds = (a / (b + x - 1 + (x == 0))) * ((alpha + T) / (alpha + t_x)) ** (r + x)
    denom = 1 + np.where(x > 0, odds, 0.0)  # not 0 x inf for a customer without repeats
    out = first * second / denom
    return out if np.ndim(out) else float(out)


def hyp2f1_series(a: ArrayLike, b: ArrayLike, c: ArrayLike, z: ArrayLike,
                  max_terms: int = 20_000, log: bool = False) -> NDArray[np.float64]:
    """The Gauss hypergeometric function 2F1(a, b; c; z) by its power series, for |z| < 1
    and finite parameters (NaN otherwise, or where it does not converge within
    ``max_terms`` terms). With ``log``, the natural logarithm of a positive sum: the
    terms are rescaled as they grow, so a sum past the largest double still has one.

    >>> from scipy.special import hyp2f1
    >>> bool(np.isclose(hyp2f1_series(3.5, 1.2, 20.0, 0.3)[()], hyp2f1(3.5, 1.2, 20.0, 0.3)))
    True
    >>> hyp2f1_series([1.0, 1.0], 1.0, 1.0, [2.0, 0.5]).tolist()  # 1 / (1 - z) inside
    [nan, 2.0]
    """
    a, b, c, z = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (a, b, c, z)))
    total = np.ones(a.shape)
    term = np.ones(a.shape)
    offset = np.zeros(a.shape)  # the sum is total * e^offset
    usable = (np.abs(z) < 1) & np.isfinite(a) & np.isfinite(b) & np.isfinite(c)
    going = usable.copy()
    # Terms may grow until n passes |z| max(|a|, |b|) and |c| (the ratio of two terms
    # tends to z); only then can a term too small to move the sum end it.
    grows_until = np.maximum(np.abs(z) * np.maximum(np.abs(a), np.abs(b)), np.abs(c))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for n in range(max_terms):
            term = np.where(going, term * (a + n) * (b + n) / ((c + n) * (n + 1)) * z, 0.0)
            total = total + term
            big = np.abs(total) > 1e250
            if big.any():
                term = np.where(big, term / 1e250, term)
                total = np.where(big, total / 1e250, total)
                offset = offset + np.where(big, 250 * np.log(10.0), 0.0)
            going &= ~((np.abs(term) <= 1e-17 * np.abs(total)) & (n + 1 > grows_until))
            going &= np.isfinite(total)
            if not going.any():
                break
        bad = going | ~usable | ~np.isfinite(total)
        out = np.log(total) + offset if log else total * np.exp(offset)
    return np.where(bad, np.nan, out)


def gamma_gamma_loglik(params: GammaGammaParams, x: ArrayLike, m: ArrayLike
                       ) -> NDArray[np.float64]:
    """Per-customer Gamma-Gamma log-likelihood (customers with x > 0 and m > 0)."""
    p, q, v = params.p, params.q, params.v
    x, m = _arr(x), _arr(m)
    return (  # type: ignore[no-any-return]
        _log_poch(p * x, q) - gammaln(q) + q * np.log(v)
        + (p * x - 1) * np.log(m) + (p * x) * np.log(x) - (p * x + q) * np.log(x * m + v)
    )


def fit_gamma_gamma(x: ArrayLike, m: ArrayLike) -> GammaGammaParams:
    """Maximum-likelihood Gamma-Gamma parameters from repeat customers (x > 0, m > 0)."""
    x, m = _arr(x), _arr(m)
    keep = (x > 0) & (m > 0)
    if not keep.any():
        raise ValueError("Gamma-Gamma needs customers with repeat purchases and a positive "
                         "mean spend (bgnbd_frequency > 0 and bgnbd_monetary > 0)")
    x, m = x[keep], m[keep]

    def nll(logp: NDArray[np.float64]) -> float:
        p, q, v = np.exp(logp)
        return float(-gamma_gamma_loglik(GammaGammaParams(p, q, v), x, m).mean())

    bounds = [(-_LOG_BOUND, _LOG_BOUND)] * 3
    # The likelihood has a ridge towards p -> inf, v -> 0 (spend without heterogeneity):
    # from p = q = v = 1 alone Nelder-Mead can run out along it and stop below the maximum.
    # Other starts put the population mean spend p v / (q - 1) at the sample's.
    mean = float(np.mean(m))
    starts = [np.zeros(3)] + [np.log([p, q, mean * (q - 1) / p])
                              for p, q in ((1.0, 3.0), (4.0, 3.0), (2.0, 8.0), (8.0, 1.5))]
    best = None
    for start in starts:
        res = minimize(nll, np.clip(start, -_LOG_BOUND, _LOG_BOUND), method="Nelder-Mead",
                       bounds=bounds, options={"xatol": 1e-10, "fatol": 1e-12,
                                               "maxiter": 20_000, "maxfev": 40_000})
        res = minimize(nll, res.x, method="L-BFGS-B", bounds=bounds,
                       options={"ftol": 1e-15, "gtol": 1e-10})
        if best is None or res.fun < best.fun or not np.isfinite(best.fun):
            best = res
    assert best is not None
    if not np.isfinite(best.fun):
        raise ValueError("the Gamma-Gamma likelihood is not finite at any point tried")
    p, q, v = np.exp(best.x)
    return GammaGammaParams(float(p), float(q), float(v))


def expected_spend(params: GammaGammaParams, x: ArrayLike, m: ArrayLike) -> Any:
    """Expected mean spend per purchase; the population mean for customers without repeats.

    NaN where the model gives no finite positive expectation: the population mean
    ``p v / (q - 1)`` exists only for ``q > 1``, a customer's posterior mean only for
    ``p x + q > 1``, and the model describes spends, so a repeat customer whose refunds
    outweigh their purchases (``m < 0``) has none either.

    >>> expected_spend(GammaGammaParams(p=6.25, q=0.5, v=15.44), [0, 3, 2], [0.0, 40.0, -5.0])
    array([        nan, 46.38356164,         nan])
    """
    p, q, v = params.p, params.q, params.v
    x, m = _arr(x), _arr(m)
    with np.errstate(divide="ignore", invalid="ignore"):
        population = p * v / (q - 1) if q > 1 else np.nan
        individual = (p * v + p * x * m) / (p * x + q - 1)
    out = np.where(x > 0, np.where((p * x + q > 1) & (m >= 0), individual, np.nan), population)
    return out if out.ndim else float(out)
