"""Delayed labels for the online models: observations now, outcomes later.

A model such as churn learns from *examples*: the customer's model inputs at an
observation time ``t`` and what happened next. The outcome is only known later, so
each customer keeps a :class:`LabelState` with at most one pending
:class:`Observation` per model; events and the passing of time resolve them into
:class:`Example` records that a learner consumes.

Models and labels (``h`` is the observation's horizon):

* ``churn``: 1 when the customer has no event of any kind in ``(t, t + h]``; ``h`` is
  30 days for customers with clickstream and 90 days for transaction-only customers.
* ``purchase_7d``: 1 when the customer makes a purchase in ``(t, t + 7 days]``.

An event resolves an observation the moment it proves the outcome (churn 0, purchase
1). The opposite outcome is only certain once no event inside the horizon can still
arrive: :func:`on_time` waits until engine time is *more* than ``horizon + lateness``
past the observation, because the engine accepts an event exactly ``lateness``
behind its newest one.

Everything here is pure: functions return new states, and states and examples
convert to plain msgpack- or JSON-able values.

>>> from features.events import MS_PER_DAY
>>> feats = {"purchases_total": 1, "monetary_total": 20.0, "recency_days": 0}
>>> s = observe(LabelState(), "c1", feats, 10 * MS_PER_DAY, has_clickstream=False)
>>> sorted(s.pending)
['churn', 'purchase_7d']
>>> s, done = on_event(s, "c1", 13 * MS_PER_DAY, is_purchase=True)
>>> sorted((e.model, e.y) for e in done)
[('churn', 0), ('purchase_7d', 1)]
>>> s.pending
{}
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any

import msgpack
import orjson

from features.events import MS_PER_DAY
from features.record import record
from features.serial import packb

CHURN = "churn"
PURCHASE_7D = "purchase_7d"
#: Every model with delayed labels, in a fixed order.
MODELS: tuple[str, ...] = (CHURN, PURCHASE_7D)

#: Churn horizon of customers with clickstream.
CHURN_HORIZON_CLICKS_MS = 30 * MS_PER_DAY
#: Churn horizon of transaction-only customers (purchases are rarer than visits).
CHURN_HORIZON_TRANSACTIONS_MS = 90 * MS_PER_DAY
#: Horizon of the purchase propensity label.
PURCHASE_HORIZON_MS = 7 * MS_PER_DAY


def _num(v: Any) -> float:
    return 0.0 if v is None else float(v)


def _log(v: Any) -> float:
    return math.log1p(max(0.0, _num(v)))


_LOG_COUNTS = (
    "purchases_total", "purchase_days", "monetary_total", "refunds_total",
    "purchases_7d", "purchases_30d", "purchases_90d", "spend_7d", "spend_30d", "spend_90d",
    "bgnbd_frequency", "bgnbd_recency", "bgnbd_T", "bgnbd_monetary", "tenure_days",
    "events_total", "events_1d", "events_7d", "events_30d", "sessions_7d", "sessions_30d",
    "active_days_7d", "active_days_30d", "logins_7d", "logins_30d",
    "distinct_event_types_30d", "feature_uses_30d", "support_tickets_30d",
)

_LOG_KEYS = tuple((n, f"log_{n}") for n in _LOG_COUNTS)

#: Names of the model inputs :func:`model_inputs` produces, in order.
INPUT_NAMES: tuple[str, ...] = (
    "has_purchase", "has_repeat", "has_clickstream",
    *(f"log_{n}" for n in _LOG_COUNTS),
    "log_recency_days", "log_days_since_last_event", "log_days_inactive",
    "log_mean_gap_days", "overdue", "activity_trend_8w",
)
# A short tag of the input layout: pending observations stored under another layout
# are dropped on load rather than misread.
INPUT_SCHEMA = hashlib.blake2b("|".join(INPUT_NAMES).encode(), digest_size=4).hexdigest()


def model_inputs(features: Mapping[str, Any]) -> dict[str, float]:
    """The numeric model inputs of a customer's derived features.

    Counts and money are ``log1p``-transformed (negative money counts as 0); a missing
    value becomes 0 next to a ``has_*`` indicator saying whether it exists. Keys are
    :data:`INPUT_NAMES`, in order.

    >>> x = model_inputs({"purchases_total": 3, "bgnbd_frequency": 2, "bgnbd_recency": 20,
    ...                   "recency_days": 40})
    >>> x["has_purchase"], x["has_clickstream"], round(x["overdue"], 3)
    (1.0, 0.0, 1.316)
    >>> len(x) == len(INPUT_NAMES)
    True
    """
    f = features
    purchases = _num(f.get("purchases_total"))
    freq = _num(f.get("bgnbd_frequency"))
    has_clicks = _num(f.get("events_total")) > 0 or f.get("days_since_last_event") is not None
    x: dict[str, float] = {
        "has_purchase": 1.0 if purchases > 0 else 0.0,
        "has_repeat": 1.0 if freq > 0 else 0.0,
        "has_clickstream": 1.0 if has_clicks else 0.0,
    }
    log1p, get = math.log1p, f.get
    for n, key in _LOG_KEYS:
        v = get(n)
        # _log() inlined for None and plain numbers (NaN and negatives fail ``v > 0``)
        if v is None:
            x[key] = 0.0
        elif type(v) is int or type(v) is float:
            x[key] = log1p(v) if v > 0 else 0.0
        else:
            x[key] = _log(v)
    recency, idle = f.get("recency_days"), f.get("days_since_last_event")
    known = [float(v) for v in (recency, idle) if v is not None]
    gap = _num(f.get("bgnbd_recency")) / freq if freq > 0 else 0.0
    x["log_recency_days"] = _log(recency)
    x["log_days_since_last_event"] = _log(idle)
    x["log_days_inactive"] = _log(min(known)) if known else 0.0
    x["log_mean_gap_days"] = math.log1p(gap)
    # How overdue the next purchase is relative to the customer's own rhythm.
    x["overdue"] = _log(recency) - math.log1p(gap) if freq > 0 else 0.0
    trend = _num(f.get("activity_trend_8w"))
    x["activity_trend_8w"] = math.copysign(math.log1p(abs(trend)), trend)
    return x


def customer_hash(customer_id: str) -> str:
    """A stable pseudonym of a customer id (16 hex digits) for example records.

    >>> customer_hash("c1") == customer_hash("c1"), len(customer_hash("c1"))
    (True, 16)
    """
    return hashlib.blake2b(customer_id.encode("utf-8"), digest_size=8).hexdigest()


def example_id(customer_id: str, model: str, obs_ts_ms: int) -> str:
    """Deterministic id of the example of one observation (redeliveries share it)."""
    key = f"{customer_id}\x1f{model}\x1f{obs_ts_ms}".encode()
    return hashlib.blake2b(key, digest_size=12).hexdigest()


@record
class Observation:
    """A pending snapshot: model inputs ``x`` at ``obs_ts_ms``, outcome due by the horizon."""

    model: str
    obs_ts_ms: int
    x: dict[str, float]
    horizon_ms: int

    def __init__(self, model: str, obs_ts_ms: int, x: dict[str, float],
                 horizon_ms: int) -> None:
        w: Any = self
        w.model = model
        w.obs_ts_ms = obs_ts_ms
        w.x = x
        w.horizon_ms = horizon_ms

    @property
    def end_ms(self) -> int:
        """The last instant inside the horizon."""
        return self.obs_ts_ms + self.horizon_ms


@record
class Example:
    """A resolved observation: inputs ``x`` and label ``y`` (0 or 1), ready to learn from."""

    example_id: str
    model: str
    customer_hash: str
    obs_ts_ms: int
    resolved_ts_ms: int
    x: dict[str, float]
    y: int

    def __init__(self, example_id: str, model: str, customer_hash: str, obs_ts_ms: int,
                 resolved_ts_ms: int, x: dict[str, float], y: int) -> None:
        w: Any = self
        w.example_id = example_id
        w.model = model
        w.customer_hash = customer_hash
        w.obs_ts_ms = obs_ts_ms
        w.resolved_ts_ms = resolved_ts_ms
        w.x = x
        w.y = y

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return {"example_id": self.example_id, "model": self.model,
                "customer_hash": self.customer_hash, "obs_ts_ms": self.obs_ts_ms,
                "resolved_ts_ms": self.resolved_ts_ms, "x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Example:
        """Inverse of :meth:`to_dict`."""
        return cls(str(d["example_id"]), str(d["model"]), str(d["customer_hash"]),
                   int(d["obs_ts_ms"]), int(d["resolved_ts_ms"]),
                   {str(k): float(v) for k, v in d["x"].items()}, int(d["y"]))

    def to_bytes(self) -> bytes:
        """JSON bytes for the examples topic."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> Example:
        """Inverse of :meth:`to_bytes`."""
        return cls.from_dict(orjson.loads(data))


_GET_INPUTS = operator.itemgetter(*INPUT_NAMES)


def _input_list(x: Mapping[str, float]) -> list[float]:
    """Inputs in :data:`INPUT_NAMES` order, 0.0 for any missing."""
    try:
        return list(_GET_INPUTS(x))
    except KeyError:
        return [x.get(n, 0.0) for n in INPUT_NAMES]


@record
class LabelState:
    """A customer's pending observations and the time of the latest one, per model.

    Treat as immutable: the functions of this module return new states.
    """

    pending: dict[str, Observation] = field(default_factory=dict)
    last_obs_ms: dict[str, int] = field(default_factory=dict)

    def __init__(self, pending: dict[str, Observation] | None = None,
                 last_obs_ms: dict[str, int] | None = None) -> None:
        w: Any = self
        w.pending = {} if pending is None else pending
        w.last_obs_ms = {} if last_obs_ms is None else last_obs_ms

    def to_dict(self) -> dict[str, Any]:
        """Plain msgpack-able form.

        Inputs are stored sparsely (the indexes into :data:`INPUT_NAMES` of the non-zero
        values, then those values) in ``"x"``, and observations taken with the same inputs
        (every model observed at one time) share one entry; ``pending`` refers to it by
        index. Values are kept exactly.
        """
        vectors: list[list[list[Any]]] = []
        seen: dict[tuple[float, ...], int] = {}
        pending: dict[str, list[int]] = {}
        for m, o in self.pending.items():
            xs = tuple(_input_list(o.x))
            k = seen.get(xs)
            if k is None:
                k = seen[xs] = len(vectors)
                nz = [i for i, v in enumerate(xs) if v != 0.0]
                vectors.append([nz, [xs[i] for i in nz]])
            pending[m] = [o.obs_ts_ms, o.horizon_ms, k]
        return {"schema": INPUT_SCHEMA, "pending": pending, "last": dict(self.last_obs_ms),
                "x": vectors}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelState:
        """Inverse of :meth:`to_dict`; observations of another input layout are dropped.

        Also reads the earlier dense form (a list of every input in place of the index).
        """
        pending: dict[str, Observation] = {}
        if d.get("schema") == INPUT_SCHEMA:
            vectors = d.get("x", [])
            for m, (ts, horizon, ref) in d.get("pending", {}).items():
                if isinstance(ref, int):
                    x = dict.fromkeys(INPUT_NAMES, 0.0)
                    nz, vals = vectors[ref]
                    for i, v in zip(nz, vals, strict=True):
                        x[INPUT_NAMES[i]] = float(v)
                else:
                    x = {n: float(v) for n, v in zip(INPUT_NAMES, ref, strict=True)}
                pending[str(m)] = Observation(str(m), int(ts), x, int(horizon))
        last = {str(m): int(t) for m, t in d.get("last", {}).items()}
        return cls(pending, last)

    def encode(self) -> bytes:
        """Compact msgpack bytes (for the state store)."""
        return packb(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> LabelState:
        """Inverse of :meth:`encode`."""
        return cls.from_dict(msgpack.unpackb(data, raw=False))


def churn_horizon_ms(has_clickstream: bool, *, clicks_ms: int = CHURN_HORIZON_CLICKS_MS,
                     transactions_ms: int = CHURN_HORIZON_TRANSACTIONS_MS) -> int:
    """Churn horizon of a customer."""
    return clicks_ms if has_clickstream else transactions_ms


def wants_observation(state: LabelState, now_ms: int, *, min_gap_days: int = 7,
                      models: tuple[str, ...] = MODELS) -> bool:
    """Whether :func:`observe` would take a snapshot now (lets callers skip deriving features)."""
    gap = min_gap_days * MS_PER_DAY
    return any(
        m not in state.pending and now_ms - state.last_obs_ms.get(m, now_ms - gap) >= gap
        for m in models
    )


def observe(
    state: LabelState,
    customer_id: str,
    features: Mapping[str, Any],
    now_ms: int,
    *,
    has_clickstream: bool,
    min_gap_days: int = 7,
    churn_horizon_clicks_ms: int = CHURN_HORIZON_CLICKS_MS,
    churn_horizon_transactions_ms: int = CHURN_HORIZON_TRANSACTIONS_MS,
    purchase_horizon_ms: int = PURCHASE_HORIZON_MS,
    models: tuple[str, ...] = MODELS,
    inputs: Mapping[str, float] | None = None,
) -> LabelState:
    """Snapshot the customer for every model with nothing pending.

    At most one observation per model per ``min_gap_days``. ``features`` are the
    customer's derived features at engine time ``now_ms``; call this after the events
    of the batch went through :func:`on_event`, so that they do not count as outcomes.
    ``inputs``, if given, must be ``model_inputs(features)`` (a caller that already has
    them saves computing them again). ``customer_id`` is part of the contract for
    symmetry with the other steps.
    """
    del customer_id
    if not wants_observation(state, now_ms, min_gap_days=min_gap_days, models=models):
        return state
    gap = min_gap_days * MS_PER_DAY
    x = dict(inputs) if inputs is not None else model_inputs(features)
    pending, last = dict(state.pending), dict(state.last_obs_ms)
    for m in models:
        if m in pending or now_ms - last.get(m, now_ms - gap) < gap:
            continue
        if m == CHURN:
            horizon = churn_horizon_ms(has_clickstream, clicks_ms=churn_horizon_clicks_ms,
                                       transactions_ms=churn_horizon_transactions_ms)
        elif m == PURCHASE_7D:
            horizon = purchase_horizon_ms
        else:
            raise ValueError(f"unknown model {m!r}")
        pending[m] = Observation(m, now_ms, x, horizon)
        last[m] = now_ms
    return LabelState(pending, last)


def is_quiet(
    stored: Mapping[str, Any],
    events: Sequence[tuple[int, bool]],
    settled_now_ms: int,
    lateness_ms: int,
    now_ms: int,
    *,
    min_gap_days: int = 7,
    churn_horizon_clicks_ms: int = CHURN_HORIZON_CLICKS_MS,
    churn_horizon_transactions_ms: int = CHURN_HORIZON_TRANSACTIONS_MS,
    purchase_horizon_ms: int = PURCHASE_HORIZON_MS,
    models: tuple[str, ...] = MODELS,
) -> bool:
    """Whether a stored state (a :meth:`LabelState.to_dict`) stays exactly as it is.

    True when :func:`on_event` for each ``(ts_ms, is_purchase)`` of ``events``, then
    :func:`on_time` at ``settled_now_ms`` and :func:`observe` at ``now_ms`` (with these
    options) would resolve nothing and observe nothing, and ``stored`` already is in
    :meth:`LabelState.to_dict` form. Callers then keep ``stored`` and skip decoding the
    pending model inputs, which is most of the cost of a customer with nothing due.

    >>> s = observe(LabelState(), "c1", {}, 10 * MS_PER_DAY, has_clickstream=True)
    >>> is_quiet(s.to_dict(), [(9 * MS_PER_DAY, True)], 11 * MS_PER_DAY, 0, 11 * MS_PER_DAY)
    True
    >>> is_quiet(s.to_dict(), [(12 * MS_PER_DAY, True)], 12 * MS_PER_DAY, 0, 12 * MS_PER_DAY)
    False
    """
    del churn_horizon_clicks_ms, churn_horizon_transactions_ms, purchase_horizon_ms
    head = _headers(stored)
    if head is None:
        return False
    for ts_ms, is_purchase in events:
        if on_event(head, "", ts_ms, is_purchase)[1]:
            return False
    if on_time(head, "", settled_now_ms, lateness_ms)[1]:
        return False
    return not wants_observation(head, now_ms, min_gap_days=min_gap_days, models=models)


def _headers(stored: Mapping[str, Any]) -> LabelState | None:
    """The state of a canonical stored dict without its model inputs, else None."""
    if (len(stored) != 4 or stored.get("schema") != INPUT_SCHEMA
            or "pending" not in stored or "last" not in stored or "x" not in stored):
        return None
    pending: dict[str, Observation] = {}
    vectors = stored["x"]
    for m, (ts, horizon, ref) in stored["pending"].items():
        if not isinstance(ref, int) or not 0 <= ref < len(vectors):
            return None
        pending[str(m)] = Observation(str(m), int(ts), {}, int(horizon))
    return LabelState(pending, {str(m): int(t) for m, t in stored["last"].items()})


def _example(customer_id: str, o: Observation, resolved_ms: int, y: int) -> Example:
    return Example(example_id(customer_id, o.model, o.obs_ts_ms), o.model,
                   customer_hash(customer_id), o.obs_ts_ms, resolved_ms, o.x, y)


def on_event(state: LabelState, customer_id: str, ts_ms: int, is_purchase: bool
             ) -> tuple[LabelState, list[Example]]:
    """Resolve what an event at ``ts_ms`` proves: activity (churn 0) and, if a purchase, 1.

    Only an event strictly after the observation and within its horizon counts; a late
    event from before the observation resolves nothing.
    """
    done: list[Example] = []
    pending = dict(state.pending)
    for m, o in state.pending.items():
        if not o.obs_ts_ms < ts_ms <= o.end_ms:
            continue
        if m == CHURN:
            done.append(_example(customer_id, o, ts_ms, 0))
        elif m == PURCHASE_7D and is_purchase:
            done.append(_example(customer_id, o, ts_ms, 1))
        else:
            continue
        del pending[m]
    if not done:
        return state, done
    return LabelState(pending, dict(state.last_obs_ms)), done


def due_ms(state: LabelState, lateness_ms: int) -> int | None:
    """The earliest engine time at which :func:`on_time` resolves something, if any."""
    ends = [o.end_ms + lateness_ms + 1 for o in state.pending.values()]
    return min(ends) if ends else None


def on_time(state: LabelState, customer_id: str, now_ms: int, lateness_ms: int
            ) -> tuple[LabelState, list[Example]]:
    """Resolve observations no event can still resolve: churn 1, purchase 0.

    That is the case once ``now_ms > obs_ts + horizon + lateness``. ``now_ms`` must be
    a time behind which no event of this customer can still be accepted late: the
    engine time when lateness is judged globally, or the oldest of the newest accepted
    timestamps of the customer's input partitions when it is judged per partition.
    """
    done: list[Example] = []
    pending = dict(state.pending)
    for m, o in state.pending.items():
        if now_ms > o.end_ms + lateness_ms:
            done.append(_example(customer_id, o, now_ms, 1 if m == CHURN else 0))
            del pending[m]
    if not done:
        return state, done
    return LabelState(pending, dict(state.last_obs_ms)), done


__all__ = [
    "CHURN",
    "INPUT_NAMES",
    "MODELS",
    "PURCHASE_7D",
    "Example",
    "LabelState",
    "Observation",
    "churn_horizon_ms",
    "customer_hash",
    "due_ms",
    "example_id",
    "is_quiet",
    "model_inputs",
    "observe",
    "on_event",
    "on_time",
    "wants_observation",
]
