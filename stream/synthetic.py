"""Deterministic synthetic clickstream and transaction events from latent personas.

Every customer has a hidden persona (see :data:`PERSONAS`) that sets how often they
come back, what they do in a session, how often and how much they buy, whether they
churn. The result is realistic enough to test segmentation end to end and to
benchmark the engine, and the true persona of each customer is returned as a
:class:`Truth` so that a clustering can be scored against it.

Model
-----
* Customers: a persona drawn from :data:`DEFAULT_MIX` (or ``mix``). A persona-specific
  share exists before the period (``signup_ms`` up to a year before ``start_ms``); the
  others sign up during it, their first session at the moment of signup.
* Churn: churners always stop, at a time in the first half of the period; every other
  persona stops with its own small probability at a random time after signup.
  ``churn_ms`` is the instant after which the customer never acts again: every event of
  the customer is strictly before it.
* Sessions: a renewal process per customer at a persona rate per active week, times a
  gamma-distributed per-customer activity factor; the gaps are gamma with a persona
  "regularity" shape (habits are more regular than Poisson arrivals). Every customer has
  at least one session. Start times follow a UTC daily rhythm (quiet at night, peak in
  the evening) that is shifted towards midday and busier on weekends.
* A session is one or more clicks 15 s to a few minutes apart sharing a ``session_id``.
  It may open with a ``login`` and close with a ``logout``; the rest follows a
  per-customer mix (a Dirichlet draw around the persona's) of ``page_view``,
  ``search``, ``feature_use``, ``add_to_cart`` and ``support_ticket``.
* A session ends in one or more purchases with a persona (and customer) specific
  probability, right after an ``add_to_cart``. Basket values are lognormal around the
  persona's median. A few percent of purchases are refunded, in full or in part, hours
  to days later.

Personas (rates per active week; see ``_PARAMS``):

* ``power_user``: most sessions (1.6) and clicks, logs in, uses features, buys now and then.
* ``casual_explorer``: sparse one-page visits (0.75), rarely logs in, almost never buys.
* ``struggling_newbie``: mostly recent signups; logs in, opens support tickets, few
  features, hardly buys.
* ``bargain_hunter``: frequent (0.8) short sessions, searches, many small purchases
  (median $9), rarely logs in.
* ``loyal_big_spender``: steady sessions (0.6) that nearly all end in a large purchase
  (median $220), logs in.
* ``churner``: active (1.0) then gone in the first half of the period, hardly buys.

At the default mix over 60 days that is about 11.5 events a customer, 80 % clickstream
and 20 % transactions.

Ids are ``{prefix}{n:06d}`` for customers, ``{customer}-s{k}`` for the k-th session,
``{session}-{j}`` for its j-th click, ``{customer}-p{k}`` for the k-th purchase and
``{purchase}-r`` for its refund. The output depends on every argument and on
:data:`BLOCK_SIZE`.

Approach to memory
------------------
Customers are simulated in blocks of :data:`BLOCK_SIZE`; a block has its own random
stream (``numpy.random.default_rng([seed, block])``) and is simulated vectorised into
compact columns (about 30 bytes an event, against about 1 KB as a dict), sorted by
time. :func:`iter_events` merges the blocks with :func:`heapq.merge` and builds each
event dict only when it is yielded, so 1,000,000 events over 100,000 customers take
about 30 MB of columns instead of some 700 MB of dicts. :func:`generate` consumes the
same stream, so both produce exactly the same events in the same order (by ``ts``,
ties by block, then customer).

>>> clicks, txns, truths = generate(customers=20, days=30, seed=1)
>>> len(truths), truths[0].customer_id
(20, 's000000')
>>> all(a["ts"] <= b["ts"] for a, b in zip(clicks, clicks[1:]))
True
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from os import PathLike
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BLOCK_SIZE",
    "CLICK_TYPES",
    "DEFAULT_MIX",
    "DEFAULT_START_MS",
    "PERSONAS",
    "Truth",
    "generate",
    "iter_events",
    "write_truth",
]

PERSONAS: tuple[str, ...] = (
    "power_user",
    "casual_explorer",
    "struggling_newbie",
    "bargain_hunter",
    "loyal_big_spender",
    "churner",
)

#: Default share of each persona among the customers.
DEFAULT_MIX: Mapping[str, float] = MappingProxyType({
    "power_user": 0.10,
    "casual_explorer": 0.24,
    "struggling_newbie": 0.14,
    "bargain_hunter": 0.18,
    "loyal_big_spender": 0.14,
    "churner": 0.20,
})

#: Clickstream event types, in the order of their internal codes.
CLICK_TYPES: tuple[str, ...] = (
    "page_view", "login", "search", "feature_use", "add_to_cart", "support_ticket", "logout",
)

#: 2025-01-01T00:00:00Z in epoch milliseconds.
DEFAULT_START_MS = 1_735_689_600_000
#: Customers simulated together with one random stream.
BLOCK_SIZE = 4096

_SEC = 1_000
_HOUR = 3_600_000
_DAY = 86_400_000
_WEEK = 7 * _DAY

# Internal event codes: 0..6 index CLICK_TYPES, then the two transaction kinds.
_PAGE_VIEW, _LOGIN, _SEARCH, _FEATURE, _CART, _TICKET, _LOGOUT = range(7)
_PURCHASE, _REFUND = 7, 8
# Codes of the "body" event mix of a session, the order of _Persona.mix.
_BODY = np.array([_PAGE_VIEW, _SEARCH, _FEATURE, _CART, _TICKET], dtype=np.int8)
# Concentration of the per-customer Dirichlet mix around the persona's mix.
_MIX_CONCENTRATION = 25.0


@dataclass(frozen=True, slots=True)
class Truth:
    """The hidden truth about one synthetic customer.

    ``churn_ms`` is the time after which the customer never acts again, ``None`` if
    still active at the end of the period. ``signup_ms`` may precede the period.
    """

    customer_id: str
    persona: str
    signup_ms: int
    churn_ms: int | None


@dataclass(frozen=True, slots=True)
class _Persona:
    sessions_per_week: float  # mean over active weeks, before the customer factor
    clicks_per_session: float  # mean, >= 1
    mix: tuple[float, float, float, float, float]  # page_view search feature cart ticket
    p_login: float  # a session opens with a login
    p_logout: float  # a session of 3+ clicks closes with a logout
    p_purchase: float  # a session ends in a purchase
    extra_purchases: float  # mean further purchases in a purchasing session
    basket_median: float  # USD, of the lognormal basket value
    basket_sigma: float  # of its log
    extra_items: float  # mean items beyond the first
    p_refund: float  # of a purchase
    p_churn: float  # of leaving during the period
    existing: float  # share already signed up at the start
    regularity: float  # gamma shape of the gaps between sessions; 1 = Poisson


_PARAMS: dict[str, _Persona] = {
    "power_user": _Persona(
        sessions_per_week=1.6, clicks_per_session=2.2, mix=(0.25, 0.06, 0.64, 0.045, 0.005),
        p_login=0.9, p_logout=0.15, p_purchase=0.3, extra_purchases=0.1, basket_median=45.0,
        basket_sigma=0.5, extra_items=1.0, p_refund=0.03, p_churn=0.03, existing=0.8,
        regularity=4.0),
    "casual_explorer": _Persona(
        sessions_per_week=0.75, clicks_per_session=1.15, mix=(0.76, 0.20, 0.01, 0.03, 0.002),
        p_login=0.02, p_logout=0.05, p_purchase=0.005, extra_purchases=0.0, basket_median=30.0,
        basket_sigma=0.6, extra_items=0.5, p_refund=0.03, p_churn=0.05, existing=0.8,
        regularity=3.0),
    "struggling_newbie": _Persona(
        sessions_per_week=0.6, clicks_per_session=2.6, mix=(0.22, 0.08, 0.03, 0.02, 0.65),
        p_login=0.9, p_logout=0.1, p_purchase=0.01, extra_purchases=0.0, basket_median=25.0,
        basket_sigma=0.5, extra_items=0.3, p_refund=0.08, p_churn=0.05, existing=0.6,
        regularity=2.5),
    "bargain_hunter": _Persona(
        sessions_per_week=0.8, clicks_per_session=1.2, mix=(0.25, 0.60, 0.01, 0.13, 0.01),
        p_login=0.02, p_logout=0.05, p_purchase=0.85, extra_purchases=0.3, basket_median=9.0,
        basket_sigma=0.45, extra_items=0.8, p_refund=0.06, p_churn=0.05, existing=0.85,
        regularity=3.0),
    "loyal_big_spender": _Persona(
        sessions_per_week=0.6, clicks_per_session=1.4, mix=(0.55, 0.20, 0.02, 0.20, 0.03),
        p_login=0.95, p_logout=0.3, p_purchase=0.95, extra_purchases=0.05, basket_median=220.0,
        basket_sigma=0.45, extra_items=2.0, p_refund=0.03, p_churn=0.02, existing=0.85,
        regularity=4.0),
    "churner": _Persona(
        sessions_per_week=1.0, clicks_per_session=2.0, mix=(0.55, 0.25, 0.05, 0.10, 0.05),
        p_login=0.4, p_logout=0.15, p_purchase=0.02, extra_purchases=0.0, basket_median=35.0,
        basket_sigma=0.6, extra_items=0.5, p_refund=0.05, p_churn=1.0, existing=0.7,
        regularity=2.0),
}
_CHURNER = PERSONAS.index("churner")
_BARGAIN = PERSONAS.index("bargain_hunter")


def _col(name: str) -> npt.NDArray[np.float64]:
    return np.array([getattr(_PARAMS[p], name) for p in PERSONAS], dtype=np.float64)


_RATE, _CLICKS, _P_LOGIN, _P_LOGOUT = (_col(n) for n in (
    "sessions_per_week", "clicks_per_session", "p_login", "p_logout"))
_P_PURCHASE, _EXTRA, _BASKET_MU, _BASKET_SIGMA = (_col(n) for n in (
    "p_purchase", "extra_purchases", "basket_median", "basket_sigma"))
_BASKET_MU = np.log(_BASKET_MU)
_ITEMS, _P_REFUND, _P_CHURN, _EXISTING = (_col(n) for n in (
    "extra_items", "p_refund", "p_churn", "existing"))
_REGULARITY = _col("regularity")
_MIX = np.array([_PARAMS[p].mix for p in PERSONAS], dtype=np.float64)

# Relative session intensity by UTC hour: weekdays peak in the evening, weekends
# start later and are busier around midday.
_WEEKDAY_HOURS = np.array([
    0.25, 0.15, 0.10, 0.08, 0.08, 0.12, 0.30, 0.60, 0.85, 0.90, 0.90, 0.95,
    1.00, 0.95, 0.90, 0.90, 0.95, 1.10, 1.40, 1.70, 1.90, 1.80, 1.30, 0.60])
_WEEKEND_HOURS = np.array([
    0.45, 0.30, 0.20, 0.12, 0.10, 0.10, 0.15, 0.30, 0.55, 0.85, 1.10, 1.25,
    1.30, 1.30, 1.25, 1.20, 1.20, 1.25, 1.40, 1.60, 1.70, 1.50, 1.10, 0.65]) * 1.1

# Property catalogues by click code (logout has none).
_CATALOG: tuple[tuple[str, ...], ...] = (
    ("/", "/home", "/products", "/products/new", "/product/1042", "/product/2210",
     "/product/3377", "/pricing", "/blog", "/account", "/cart", "/help"),
    ("password", "sso", "magic_link", "remember_me"),
    ("sale", "discount", "coupon", "clearance", "free shipping", "cheap headphones",
     "running shoes", "laptop stand", "coffee beans", "gift ideas", "desk lamp", "backpack",
     "how to export", "api docs"),
    ("dashboard", "reports", "export", "api", "integrations", "automation", "sharing",
     "alerts"),
    tuple(f"SKU-{k:04d}" for k in range(1, 241)),
    ("login_problem", "billing", "how_to", "bug", "account_setup", "shipping",
     "refund_request"),
    ("",),
)
_PROP_KEY: tuple[str | None, ...] = ("page", "method", "query", "feature", "sku", "topic", None)
_CATALOG_LEN = np.array([len(c) for c in _CATALOG], dtype=np.int64)
_DEAL_QUERIES = 5  # the first queries of the catalogue are what bargain hunters search
_DEVICES = ("web", "ios", "android")
_DEVICE_P = (0.55, 0.28, 0.17)

_YIELD_CHUNK = 8192


class _Rhythm:
    """Piecewise-constant hourly session intensity over the period, sampled exactly."""

    def __init__(self, start_ms: int, days: int) -> None:
        self.start_ms = start_ms
        hours = np.arange(days * 24, dtype=np.int64)
        abs_hour = start_ms // _HOUR + hours
        weekday = (abs_hour // 24 + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
        hod = abs_hour % 24
        self.w = np.where(weekday >= 5, _WEEKEND_HOURS[hod], _WEEKDAY_HOURS[hod])
        self.cum = np.concatenate(([0.0], np.cumsum(self.w)))
        self.last = len(self.w) - 1

    def _cum_at(self, ts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        x = (ts - self.start_ms) / _HOUR
        k = np.clip(np.floor(x).astype(np.int64), 0, self.last)
        return np.asarray(self.cum[k] + np.clip(x - k, 0.0, 1.0) * self.w[k])

    def sample(self, lo: npt.NDArray[np.int64], hi: npt.NDArray[np.int64],
               u: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Times in ``[lo, hi)`` (within the period) distributed by the rhythm."""
        c_lo, c_hi = self._cum_at(lo), self._cum_at(hi)
        target = c_lo + u * (c_hi - c_lo)
        k = np.clip(np.searchsorted(self.cum, target, side="right") - 1, 0, self.last)
        x = k + (target - self.cum[k]) / self.w[k]
        ts = self.start_ms + np.floor(x * _HOUR).astype(np.int64)
        return np.asarray(np.clip(ts, lo, np.maximum(lo, hi - 1)))


@dataclass(slots=True)
class _Block:
    """One block of customers: their truths and their events as time-sorted columns."""

    ids: list[str]
    devices: list[str]
    truths: list[Truth]
    ts: npt.NDArray[np.int64]
    cust: npt.NDArray[np.int32]
    code: npt.NDArray[np.int8]
    a: npt.NDArray[np.int32]  # session ordinal (click) or purchase ordinal (transaction)
    b: npt.NDArray[np.int32]  # position in the session (click) or items (transaction)
    prop: npt.NDArray[np.int16]  # catalogue index (click)
    amount: npt.NDArray[np.float64]  # transaction amount


def _group_offsets(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return np.asarray(np.cumsum(counts) - counts)


def _simulate(block: int, first: int, n: int, seed: int, start_ms: int, days: int,
              weights: npt.NDArray[np.float64], rhythm: _Rhythm,
              id_prefix: str) -> _Block:
    """Simulate customers ``first .. first + n - 1`` with the block's own random stream."""
    rng = np.random.default_rng([seed, block])
    period = days * _DAY
    end_ms = start_ms + period
    half_ms = start_ms + period // 2

    # --- customers --------------------------------------------------------------
    persona = rng.choice(len(PERSONAS), size=n, p=weights)
    device = rng.choice(len(_DEVICES), size=n, p=_DEVICE_P)
    churner = persona == _CHURNER
    existing = rng.random(n) < _EXISTING[persona]
    back = rng.integers(_HOUR, 365 * _DAY, size=n)
    span = np.where(churner, (period * 3) // 10, period - _HOUR).astype(np.int64)
    starts = np.full(n, start_ms, dtype=np.int64)
    joined = rhythm.sample(starts, starts + np.maximum(span, 1), rng.random(n))
    signup = np.where(existing, start_ms - back, joined)
    active_from = np.maximum(signup, start_ms)

    early_lo = active_from + np.minimum(2 * _DAY, np.maximum(half_ms - active_from, 0) // 2)
    early = early_lo + (rng.random(n) * np.maximum(half_ms - early_lo, 1)).astype(np.int64)
    late = active_from + (rng.uniform(0.1, 1.0, n) * (end_ms - active_from)).astype(np.int64)
    churns = churner | (rng.random(n) < _P_CHURN[persona])
    churn = np.where(churner, early, late)
    until = np.where(churns, churn, end_ms)  # events strictly before this

    activity = rng.gamma(8.0, 0.125, n)
    buy_factor = rng.lognormal(0.0, 0.35, n)
    basket_shift = rng.normal(0.0, 0.2, n)
    alpha = _MIX_CONCENTRATION * _MIX[persona]
    cust_mix = rng.gamma(alpha)
    cust_mix /= cust_mix.sum(axis=1, keepdims=True)
    cust_cdf = np.cumsum(cust_mix, axis=1)[:, :-1]

    # --- sessions ---------------------------------------------------------------
    # A renewal process in "rhythm time": gaps are gamma with the persona's regularity
    # as shape (1 would be Poisson), mapped through the daily and weekly rhythm. Every
    # customer has at least one session; one who joins in the period starts with it.
    expected = _RATE[persona] * (until - active_from) / _WEEK * activity
    shape = _REGULARITY[persona]
    n_cand = (expected + 6.0 * np.sqrt(expected / shape) + 4.0).astype(np.int64)
    c_cust = np.repeat(np.arange(n), n_cand)
    c_first = _group_offsets(n_cand)
    c_head = c_first[c_cust]
    gaps = rng.gamma(shape[c_cust], 1.0 / (shape * np.maximum(expected, 1e-9))[c_cust])
    phase = rng.random(n)
    head = phase * gaps[c_first]
    gaps[c_first] = np.where(existing, np.where(head < 1.0, head, phase), 0.0)
    c_sum = np.cumsum(gaps)
    c_u = c_sum - c_sum[c_head] + gaps[c_head]
    kept = (c_u < 1.0) | (np.arange(len(c_cust)) == c_head)
    s_cust = c_cust[kept]
    s_first = _group_offsets(np.bincount(s_cust, minlength=n))
    s_t = rhythm.sample(active_from[s_cust], until[s_cust], np.minimum(c_u[kept], 1.0))
    s_ord = np.arange(len(s_cust)) - s_first[s_cust]
    s_persona = persona[s_cust]
    n_clicks = np.minimum(1 + rng.poisson(_CLICKS[s_persona] - 1.0), 40).astype(np.int64)
    p_buy = np.minimum(_P_PURCHASE[persona] * buy_factor, 0.97)
    buys = rng.random(len(s_cust)) < p_buy[s_cust]

    # --- clicks -----------------------------------------------------------------
    e_sess = np.repeat(np.arange(len(s_cust)), n_clicks)
    e_first = _group_offsets(n_clicks)
    pos = np.arange(len(e_sess)) - e_first[e_sess]
    gaps = np.where(pos == 0, 0, 15 * _SEC + rng.exponential(90 * _SEC, len(e_sess)))
    csum = np.cumsum(gaps.astype(np.int64))
    e_ts = s_t[e_sess] + csum - csum[e_first[e_sess]]
    e_cust = s_cust[e_sess]
    e_persona = persona[e_cust]
    body = (rng.random(len(e_sess))[:, None] > cust_cdf[e_cust]).sum(axis=1)
    code = _BODY[body]
    opens = rng.random(len(e_sess)) < _P_LOGIN[e_persona]
    code = np.where(pos == 0, np.where(opens, _LOGIN, _PAGE_VIEW), code).astype(np.int8)
    e_len = n_clicks[e_sess]
    last = pos == e_len - 1
    closes = rng.random(len(e_sess)) < _P_LOGOUT[e_persona]
    code[last & (e_len >= 3) & closes] = _LOGOUT
    code[last & (e_len >= 2) & buys[e_sess]] = _CART
    u_prop = rng.random(len(e_sess))
    deal = (code == _SEARCH) & (e_persona == _BARGAIN)
    n_choices = np.where(deal, _DEAL_QUERIES, _CATALOG_LEN[code])
    prop = np.minimum((u_prop * n_choices).astype(np.int64), n_choices - 1)

    # --- purchases ----------------------------------------------------------------
    n_buy = np.where(buys, 1 + rng.poisson(_EXTRA[s_persona]), 0).astype(np.int64)
    p_sess = np.repeat(np.arange(len(s_cust)), n_buy)
    p_first = _group_offsets(n_buy)
    p_gap = (20 * _SEC + rng.exponential(90 * _SEC, len(p_sess))).astype(np.int64)
    p_csum = np.cumsum(p_gap)
    session_end = e_ts[e_first + n_clicks - 1]
    p_ts = session_end[p_sess] + p_csum - p_csum[p_first[p_sess]] + p_gap[p_first[p_sess]]
    p_cust = s_cust[p_sess]
    p_persona = persona[p_cust]
    p_ord = np.arange(len(p_sess)) - _group_offsets(np.bincount(p_cust, minlength=n))[p_cust]
    log_amount = (_BASKET_MU[p_persona] + basket_shift[p_cust]
                  + _BASKET_SIGMA[p_persona] * rng.standard_normal(len(p_sess)))
    amount = np.maximum(np.round(np.exp(log_amount), 2), 0.5)
    items = 1 + rng.poisson(_ITEMS[p_persona])

    # --- refunds ------------------------------------------------------------------
    refunded = rng.random(len(p_sess)) < _P_REFUND[p_persona]
    r_delay = (_HOUR + rng.exponential(3 * _DAY, len(p_sess))).astype(np.int64)
    full = rng.random(len(p_sess)) < 0.6
    part = rng.uniform(0.2, 0.95, len(p_sess))
    r_amount = np.where(full, amount, np.clip(np.round(amount * part, 2), 0.01, amount))
    r_items = np.where(full, items, np.maximum(1, np.floor(items * part))).astype(np.int64)
    r_ts = p_ts + r_delay

    # --- assemble, drop what falls after churn or the end, sort by time -------------
    zeros_p = np.zeros(len(p_sess), dtype=np.int64)
    ts = np.concatenate((e_ts, p_ts, r_ts[refunded]))
    cust = np.concatenate((e_cust, p_cust, p_cust[refunded]))
    codes = np.concatenate((code, np.full(len(p_sess), _PURCHASE),
                            np.full(int(refunded.sum()), _REFUND))).astype(np.int8)
    a = np.concatenate((s_ord[e_sess], p_ord, p_ord[refunded]))
    b = np.concatenate((pos, items, r_items[refunded]))
    props = np.concatenate((prop, zeros_p, zeros_p[refunded]))
    amounts = np.concatenate((np.zeros(len(e_sess)), amount, r_amount[refunded]))
    keep = ts < until[cust]
    ts, cust, codes, a, b, props, amounts = (
        x[keep] for x in (ts, cust, codes, a, b, props, amounts))
    order = np.lexsort((b, a, codes, cust, ts))

    ids = [f"{id_prefix}{first + i:06d}" for i in range(n)]
    truths = [
        Truth(ids[i], PERSONAS[p], int(s), int(c) if ch else None)
        for i, (p, s, c, ch) in enumerate(zip(persona.tolist(), signup.tolist(),
                                                churn.tolist(), churns.tolist(), strict=True))
    ]
    return _Block(
        ids=ids,
        devices=[_DEVICES[d] for d in device.tolist()],
        truths=truths,
        ts=ts[order].astype(np.int64),
        cust=cust[order].astype(np.int32),
        code=codes[order],
        a=a[order].astype(np.int32),
        b=b[order].astype(np.int32),
        prop=props[order].astype(np.int16),
        amount=amounts[order],
    )


def _weights(mix: Mapping[str, float] | None) -> npt.NDArray[np.float64]:
    given = DEFAULT_MIX if mix is None else mix
    unknown = set(given) - set(PERSONAS)
    if unknown:
        raise ValueError(f"unknown personas in mix: {sorted(unknown)}")
    w = np.array([float(given.get(p, 0.0)) for p in PERSONAS])
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("mix weights must be finite, >= 0 and not all zero")
    return np.asarray(w / w.sum())


def _blocks(customers: int, days: int, seed: int, start_ms: int, id_prefix: str,
            mix: Mapping[str, float] | None) -> list[_Block]:
    if customers < 0:
        raise ValueError("customers must be >= 0")
    if days < 1:
        raise ValueError("days must be >= 1")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    weights = _weights(mix)
    rhythm = _Rhythm(start_ms, days)
    return [
        _simulate(k, first, min(BLOCK_SIZE, customers - first), seed, start_ms, days,
                  weights, rhythm, id_prefix)
        for k, first in enumerate(range(0, customers, BLOCK_SIZE))
    ]


def _rows(block: _Block, index: int) -> Iterator[tuple[int, int, int, str, dict[str, Any]]]:
    """Events of one block as ``(ts, block, row, topic, event)``, built lazily."""
    ids, devices = block.ids, block.devices
    for lo in range(0, len(block.ts), _YIELD_CHUNK):
        hi = lo + _YIELD_CHUNK
        cols = zip(block.ts[lo:hi].tolist(), block.cust[lo:hi].tolist(),
                   block.code[lo:hi].tolist(), block.a[lo:hi].tolist(),
                   block.b[lo:hi].tolist(), block.prop[lo:hi].tolist(),
                   block.amount[lo:hi].tolist(), strict=True)
        for row, (ts, c, code, a, b, prop, amount) in enumerate(cols, lo):
            cid = ids[c]
            if code < _PURCHASE:
                session = f"{cid}-s{a}"
                key = _PROP_KEY[code]
                props = ({"device": devices[c]} if key is None
                         else {"device": devices[c], key: _CATALOG[code][prop]})
                yield ts, index, row, "clickstream", {
                    "event_id": f"{session}-{b}",
                    "customer_id": cid,
                    "ts": ts,
                    "event_type": CLICK_TYPES[code],
                    "session_id": session,
                    "properties": props,
                }
            else:
                refund = code == _REFUND
                yield ts, index, row, "transactions", {
                    "event_id": f"{cid}-p{a}-r" if refund else f"{cid}-p{a}",
                    "customer_id": cid,
                    "ts": ts,
                    "amount": amount,
                    "kind": "refund" if refund else "purchase",
                    "currency": "USD",
                    "items": b,
                }


def _stream(blocks: list[_Block]) -> Iterator[tuple[str, dict[str, Any]]]:
    rows = [_rows(blk, k) for k, blk in enumerate(blocks)]
    merged = rows[0] if len(rows) == 1 else heapq.merge(*rows)  # empty if no blocks
    for _ts, _blk, _row, topic, event in merged:
        yield topic, event


def iter_events(customers: int, days: int, seed: int = 0, start_ms: int = DEFAULT_START_MS,
                id_prefix: str = "s", *, mix: Mapping[str, float] | None = None,
                ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(topic, event)`` of every synthetic event in global time order.

    Topics are ``"clickstream"`` and ``"transactions"``. The events are exactly those
    of :func:`generate` with the same arguments; ties in ``ts`` keep a fixed order.
    Arguments are checked and the customers simulated (as compact columns) on the call;
    the blocks are merged by heap and an event's dict is built only when it is yielded
    (see the module docstring).

    Parameters
    ----------
    customers, days, seed, start_ms, id_prefix, mix
        As for :func:`generate`.
    """
    return _stream(_blocks(customers, days, seed, start_ms, id_prefix, mix))


def generate(customers: int, days: int, seed: int = 0, start_ms: int = DEFAULT_START_MS,
             id_prefix: str = "s", *, mix: Mapping[str, float] | None = None,
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Truth]]:
    """Generate a synthetic population and its events.

    Parameters
    ----------
    customers
        Number of customers (ids ``{id_prefix}000000`` upwards).
    days
        Length of the period in days, starting at ``start_ms``.
    seed
        Non-negative random seed; the same arguments always give the same output.
    start_ms
        Start of the period, epoch milliseconds (default 2025-01-01T00:00Z).
    id_prefix
        Prefix of customer ids and so of every other id.
    mix
        Persona weights (default :data:`DEFAULT_MIX`); need not sum to one.

    Returns
    -------
    tuple
        ``(click_events, transaction_events, truths)``; both event lists sorted by ``ts``,
        truths in customer order.
    """
    blocks = _blocks(customers, days, seed, start_ms, id_prefix, mix)
    clicks: list[dict[str, Any]] = []
    txns: list[dict[str, Any]] = []
    for topic, event in _stream(blocks):
        (clicks if topic == "clickstream" else txns).append(event)
    return clicks, txns, [t for blk in blocks for t in blk.truths]


def write_truth(path: str | PathLike[str], truths: Iterable[Truth]) -> int:
    """Write truths as JSON lines (one object per customer); return how many.

    Parameters
    ----------
    path
        File to create or overwrite (UTF-8).
    truths
        As returned by :func:`generate`.
    """
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for t in truths:
            fh.write(json.dumps(asdict(t), separators=(",", ":")) + "\n")
            n += 1
    return n
