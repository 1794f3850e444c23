"""Offline evaluation: replay events through features and labels as the engine does.

:func:`replay` folds an event-time-ordered sequence of :mod:`features.events` objects
into per-customer :mod:`features.state` and :mod:`scorers.labels` state, the way the
streaming engine evaluates customers:

* at each event of a customer: apply it, resolve what it proves (:func:`on_event`),
  resolve what time has settled (:func:`on_time`), then observe the customer;
* on a periodic sweep of all customers (every ``sweep_days`` of event time): resolve
  what time has settled, then observe.

Engine time is the largest event timestamp so far; events more than ``lateness_ms``
behind it are dropped as the engine would dead-letter them. The result lists the
labelled examples in resolution order with the engine time of each resolution, and
every customer's final features.

The helpers score an :class:`~scorers.online.OnlineModel` prequentially
(:func:`prequential`) and on a time split (:func:`time_split`, :func:`holdout_auc`),
with an exact rank-based ROC AUC (:func:`roc_auc`).

>>> from features.events import TransactionEvent, MS_PER_DAY
>>> evs = [TransactionEvent(f"t{d}", "c1", d * MS_PER_DAY, 10_000) for d in (0, 3, 10, 200)]
>>> r = replay(evs, models=("churn",))
>>> [(e.example.y, (e.example.resolved_ts_ms - e.example.obs_ts_ms) // MS_PER_DAY)
...  for e in r.resolved]
[(0, 3), (1, 190)]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from scipy.stats import rankdata

from features.events import (
    MS_PER_DAY,
    ClickEvent,
    Event,
    TransactionEvent,
    epoch_ms,
    to_units,
)
from features.state import DEFAULT_LATENESS_MS, CustomerState, apply, derive, empty
from scorers.labels import (
    CHURN_HORIZON_CLICKS_MS,
    CHURN_HORIZON_TRANSACTIONS_MS,
    INPUT_NAMES,
    MODELS,
    Example,
    LabelState,
    observe,
    on_event,
    on_time,
    wants_observation,
)
from scorers.online import OnlineModel


@dataclass(frozen=True, slots=True)
class Resolved:
    """An example and the engine time at which it was resolved."""

    now_ms: int
    example: Example


@dataclass(slots=True)
class ReplayResult:
    """What :func:`replay` produced."""

    resolved: list[Resolved]
    features: dict[str, dict[str, Any]]
    end_ms: int
    dropped_late: int = 0
    pending: dict[str, LabelState] = field(default_factory=dict)

    def examples(self, model: str) -> list[Resolved]:
        """The resolved examples of one model, in resolution order."""
        return [r for r in self.resolved if r.example.model == model]


def _ts_ms(v: Any) -> int:
    if isinstance(v, int | float):
        return int(v)
    dt = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return epoch_ms(dt)


def to_event(topic: str, d: Mapping[str, Any]) -> Event:
    """A feature event from a raw ``clickstream`` / ``transactions`` message (no validation).

    >>> to_event("transactions", {"event_id": "e", "customer_id": "c", "ts": 0,
    ...                           "amount": 2.5}).amount_units
    25000
    """
    ts = _ts_ms(d["ts"])
    cid = str(d["customer_id"])
    if topic == "clickstream":
        return ClickEvent(str(d["event_id"]), cid, ts, str(d["event_type"]), d.get("session_id"))
    units = to_units(abs(float(d["amount"])))
    if d.get("kind") == "refund":
        return TransactionEvent(str(d["event_id"]), cid, ts, units, "refund")
    return TransactionEvent(str(d["event_id"]), cid, ts, units)


def replay(
    events: Iterable[Event],
    *,
    lateness_ms: int = DEFAULT_LATENESS_MS,
    sweep_days: int = 7,
    models: tuple[str, ...] = MODELS,
    min_gap_days: int = 7,
    churn_horizon_clicks_ms: int = CHURN_HORIZON_CLICKS_MS,
    churn_horizon_transactions_ms: int = CHURN_HORIZON_TRANSACTIONS_MS,
    final_features: bool = True,
) -> ReplayResult:
    """Replay events (in event-time order) through feature state and delayed labels."""
    states: dict[str, CustomerState] = {}
    labels: dict[str, LabelState] = {}
    clicks: set[str] = set()
    out: list[Resolved] = []
    sweep_ms = sweep_days * MS_PER_DAY
    now = -1
    next_sweep: int | None = None
    dropped = 0

    def evaluate(cid: str) -> None:
        ls, done = on_time(labels[cid], cid, now, lateness_ms)
        out.extend(Resolved(now, e) for e in done)
        if wants_observation(ls, now, min_gap_days=min_gap_days, models=models):
            ls = observe(ls, cid, derive(states[cid], now), now,
                         has_clickstream=cid in clicks, min_gap_days=min_gap_days,
                         churn_horizon_clicks_ms=churn_horizon_clicks_ms,
                         churn_horizon_transactions_ms=churn_horizon_transactions_ms,
                         models=models)
        labels[cid] = ls

    for ev in events:
        if now >= 0 and ev.ts_ms < now - lateness_ms:
            dropped += 1
            continue
        now = max(now, ev.ts_ms)
        cid = ev.customer_id
        states[cid] = apply(states.get(cid, empty()), ev, lateness_ms)
        if isinstance(ev, ClickEvent):
            clicks.add(cid)
        is_purchase = isinstance(ev, TransactionEvent) and ev.kind == "purchase"
        ls, done = on_event(labels.get(cid, LabelState()), cid, ev.ts_ms, is_purchase)
        out.extend(Resolved(now, e) for e in done)
        labels[cid] = ls
        evaluate(cid)
        if next_sweep is None:
            next_sweep = (now // sweep_ms + 1) * sweep_ms
        elif now >= next_sweep:
            for other in labels:
                evaluate(other)
            next_sweep = (now // sweep_ms + 1) * sweep_ms
    feats = {c: derive(s, now) for c, s in states.items()} if final_features else {}
    return ReplayResult(out, feats, now, dropped, labels)


def roc_auc(y: Sequence[int] | Any, p: Sequence[float] | Any) -> float:
    """Exact ROC AUC (Mann-Whitney, ties count half); NaN if a class is missing.

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    ya = np.asarray(y, dtype=bool)
    ranks = rankdata(np.asarray(p, dtype=float))
    npos = int(ya.sum())
    nneg = len(ya) - npos
    if npos == 0 or nneg == 0:
        return float("nan")
    return float((ranks[ya].sum() - npos * (npos + 1) / 2) / (npos * nneg))


@dataclass(frozen=True, slots=True)
class Prequential:
    """Prequential scores: each example scored by the model before it learned from it."""

    auc: float
    scored: int
    positives: int
    y: list[int]
    p: list[float]
    at_ms: list[int]
    examples: list[Example]


def prequential(model: OnlineModel, resolved: Iterable[Resolved], *, warmup: int = 0
                ) -> Prequential:
    """Feed examples to ``model`` in order, scoring each one first.

    Scores count once the model is ready and ``warmup`` examples (of any model) went by;
    examples of other models are skipped.
    """
    ys: list[int] = []
    ps: list[float] = []
    at: list[int] = []
    scored: list[Example] = []
    for n, r in enumerate(resolved):
        e = r.example
        if e.model != model.name:
            continue
        p = model.predict_one(e.x)
        if p is not None and n >= warmup:
            ys.append(e.y)
            ps.append(p)
            at.append(r.now_ms)
            scored.append(e)
        model.learn(e)
    auc = roc_auc(ys, ps) if ys else float("nan")
    return Prequential(auc, len(ys), sum(ys), ys, ps, at, scored)


def time_split(resolved: Sequence[Resolved], split_ms: int
               ) -> tuple[list[Resolved], list[Resolved]]:
    """Training examples (resolved before ``split_ms``) and test examples (observed after).

    Nothing the test set knows could have been learned from: every training label was
    settled before the first test observation.
    """
    train = [r for r in resolved if r.now_ms < split_ms]
    test = [r for r in resolved if r.example.obs_ts_ms >= split_ms]
    return train, test


def holdout_auc(model: OnlineModel, train: Iterable[Resolved], test: Sequence[Resolved]
                ) -> float:
    """Learn ``train`` in order, then the ROC AUC of the frozen model on ``test``."""
    for r in train:
        model.learn(r.example)
    ps = model.predict_many([r.example.x for r in test])
    if any(p is None for p in ps):
        raise ValueError("the model is not ready after the training examples")
    return roc_auc([r.example.y for r in test], ps)


def to_matrix(examples: Iterable[Example], names: Sequence[str] = INPUT_NAMES
              ) -> tuple[Any, Any]:
    """``(X, y)`` numpy arrays of examples, columns in ``names`` order."""
    rows = list(examples)
    x = np.array([[e.x.get(n, 0.0) for n in names] for e in rows], dtype=float)
    y = np.array([e.y for e in rows], dtype=int)
    return x, y


__all__ = [
    "Prequential",
    "ReplayResult",
    "Resolved",
    "holdout_auc",
    "prequential",
    "replay",
    "roc_auc",
    "time_split",
    "to_event",
    "to_matrix",
]
