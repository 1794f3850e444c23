"""One evaluation of a group of customers: scores, segments, migrations, labels, actions.

Pure: the stream layer hands in each customer's feature state, profile and the
events just applied, plus a :class:`ScoringContext` (engine time, population
sketch, models, rules); it gets back the new profile and everything to commit
with it atomically: migration events, labelled examples and counter increments.
The same function serves the ingest path (customers with new events) and the
timer sweep (customers whose segment may move because time or the population
moved), so both follow identical rules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from features.events import MS_PER_DAY, Event, TransactionEvent
from features.state import CustomerState, derive, iso
from scorers import clv, rfm
from scorers.profile import Profile

#: Redis hash (per partition) of the RFM population sketch.
RFM_HASH = "rfm"
#: Redis hash (per partition) of segment populations, field ``scheme|segment``.
SEGMENT_HASH = "seg"
#: Redis hash (per partition) of action exposure and conversion counters.
ACTION_HASH = "nba"
#: Horizon of the BG/NBD expectations, in days.
CLV_HORIZON_DAYS = 90


class BatchModel(Protocol):
    """A probabilistic model scoring many input vectors at once."""

    version: int

    def predict_many(self, xs: Sequence[Mapping[str, float]]) -> Sequence[float | None]: ...


class Clusterer(Protocol):
    version: int

    def predict_many(self, rows: Sequence[Mapping[str, Any]]) -> Sequence[str | None]: ...


@dataclass(frozen=True)
class ClvModel:
    """Fitted population parameters of the CLV models and their version."""

    bgnbd: clv.BgNbdParams
    gamma_gamma: clv.GammaGammaParams | None
    version: int


@dataclass
class ScoringContext:
    """Everything shared by all customers of one evaluation."""

    now_ms: int
    wall_ms: int
    lateness_ms: int
    population: rfm.Population = field(default_factory=rfm.Population.empty)
    catalogue: Any | None = None  # scorers.rules.Catalogue
    actions: Any | None = None  # scorers.nba.ActionCatalogue
    clv: ClvModel | None = None
    models: Mapping[str, BatchModel] = field(default_factory=dict)
    personas: Clusterer | None = None
    #: keyword options of :func:`scorers.labels.observe`; None disables labelling
    label_options: Mapping[str, Any] | None = None
    #: engine time behind which no event of these customers can still be accepted late
    #: (lateness is judged per input partition); defaults to ``now_ms - lateness_ms``
    settled_ms: int | None = None

    @property
    def today(self) -> int:
        return self.now_ms // MS_PER_DAY

    def model_versions(self) -> dict[str, int]:
        out = {name: m.version for name, m in self.models.items()}
        if self.personas is not None:
            out["cluster"] = self.personas.version
        if self.clv is not None:
            out["clv"] = self.clv.version
        return out


@dataclass
class CustomerInput:
    """One customer to evaluate."""

    customer_id: str
    state: CustomerState
    profile: Profile
    events: Sequence[Event] = ()
    #: the input record that caused this evaluation; None for a timer sweep
    trigger: Mapping[str, Any] | None = None


@dataclass
class Outcome:
    """What one evaluation of a customer produced."""

    customer_id: str
    profile: Profile
    changed: bool
    features: dict[str, Any]
    scores: dict[str, Any]
    migrations: list[dict[str, Any]] = field(default_factory=list)
    examples: list[Any] = field(default_factory=list)
    increments: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, table: str, fld: str, delta: int) -> None:
        row = self.increments.setdefault(table, {})
        row[fld] = row.get(fld, 0) + delta


def migration_id(customer_id: str, scheme: str, frm: str | None, to: str, cause: str) -> str:
    """Deterministic id of a migration: the same cause always yields the same id.

    >>> migration_id("c1", "rfm", None, "Loyal", "t:0:5") == migration_id(
    ...     "c1", "rfm", None, "Loyal", "t:0:5")
    True
    """
    raw = "\x1f".join((customer_id, scheme, frm or "", to, cause)).encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def wall_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def clv_scores(model: ClvModel | None, f: Mapping[str, Any]) -> dict[str, float | None]:
    """``p_alive``, ``expected_purchases_90d`` and ``clv_90d`` from the BG/NBD inputs."""
    x = f.get("bgnbd_frequency")
    if model is None or x is None:
        return {"p_alive": None, "expected_purchases_90d": None, "clv_90d": None}
    t_x, t_big = f["bgnbd_recency"], f["bgnbd_T"]
    alive = float(clv.p_alive(model.bgnbd, x, t_x, t_big))
    expected = float(clv.expected_purchases(model.bgnbd, CLV_HORIZON_DAYS, x, t_x, t_big))
    value = None
    if model.gamma_gamma is not None:
        spend = float(clv.expected_spend(model.gamma_gamma, x, f.get("bgnbd_monetary") or 0.0))
        value = expected * spend
    return {"p_alive": alive, "expected_purchases_90d": expected, "clv_90d": value}


def _batch_predictions(inputs: Sequence[CustomerInput], feats: list[dict[str, Any]],
                       ctx: ScoringContext) -> tuple[dict[str, Sequence[float | None]],
                                                     Sequence[str | None]]:
    preds: dict[str, Sequence[float | None]] = {}
    xs: list[dict[str, float]] = []
    if ctx.models:
        from scorers.labels import model_inputs

        xs = [model_inputs(f) for f in feats]
    for name, model in ctx.models.items():
        preds[name] = model.predict_many(xs)
    clusters: Sequence[str | None] = [None] * len(inputs)
    if ctx.personas is not None:
        clusters = ctx.personas.predict_many(feats)
    return preds, clusters


#: Which model produces which score.
MODEL_SCORES = {"churn": "churn_probability", "purchase_7d": "purchase_propensity_7d"}


def evaluate(inputs: Sequence[CustomerInput], ctx: ScoringContext) -> list[Outcome]:
    """Evaluate a group of customers at ``ctx.now_ms``."""
    feats = [derive(c.state, ctx.now_ms) for c in inputs]
    preds, clusters = _batch_predictions(inputs, feats, ctx)
    all_scores = []
    for i in range(len(inputs)):
        scores: dict[str, Any] = dict(ctx.population.score(feats[i], ctx.today))
        scores.update(clv_scores(ctx.clv, feats[i]))
        for model_name, score_name in MODEL_SCORES.items():
            p = preds.get(model_name)
            scores[score_name] = p[i] if p is not None else None
        scores["cluster"] = clusters[i]
        all_scores.append(scores)
    moving = _moving(inputs, feats, all_scores, ctx)
    return [_evaluate_one(c, feats[i], all_scores[i], ctx, moving[i])
            for i, c in enumerate(inputs)]


def _moving(inputs: Sequence[CustomerInput], feats: list[dict[str, Any]],
            scores: list[dict[str, Any]], ctx: ScoringContext) -> list[set[str]]:
    """Per customer, the schemes whose segment may change (a vectorised pre-filter).

    The vectorised evaluation follows :func:`scorers.rules.assign` exactly (minimum
    dwell, hysteresis for the incumbent segment, first match wins); customers it finds
    unchanged skip the scalar path, which remains the authority for everyone else.
    """
    import numpy as np

    from scorers.conditions import Columns

    n = len(inputs)
    out: list[set[str]] = [set() for _ in range(n)]
    if ctx.catalogue is None or n == 0:
        return out
    for name, scheme in ctx.catalogue.schemes.items():
        cols: dict[str, list[Any]] = {}
        for key in scheme.names:
            src = scores if key in scores[0] else feats
            cols[key] = [row.get(key) for row in src]
        columns = Columns(cols, n)
        current = [c.profile.segments.get(name) for c in inputs]
        incumbent = np.array([cur[0] if cur else None for cur in current], dtype=object)
        since = np.array([cur[1] if cur else 0 for cur in current], dtype=np.int64)
        known = np.isin(incumbent, list(scheme.segment_names))
        held = known & (ctx.now_ms < since + scheme.min_dwell_ms)
        result = np.full(n, scheme.fallback, dtype=object)
        free = np.ones(n, dtype=np.bool_)
        for seg in scheme.segments:
            hit = seg.condition.evaluate_columns(columns)
            if scheme.hysteresis:
                hit |= (incumbent == seg.name) & known & seg.condition.evaluate_columns(
                    columns, dict(scheme.hysteresis))
            hit &= free
            result[hit] = seg.name
            free &= ~hit
        for i in np.flatnonzero(~held & (result != incumbent)):
            out[int(i)].add(name)
    return out


def _evaluate_one(c: CustomerInput, f: dict[str, Any], scores: dict[str, Any],
                  ctx: ScoringContext, moving: set[str]) -> Outcome:
    profile = c.profile
    o = Outcome(c.customer_id, profile, False, f, scores)
    # population sketch
    contrib = rfm.contribution(f, ctx.today)
    for fld, d in rfm.deltas(profile.rfm, contrib).items():
        o.add(RFM_HASH, fld, d)
    profile = replace(profile, rfm=contrib)
    profile = _labels(c, f, profile, o, ctx)
    profile = _actions_on_events(c, profile, o, ctx)
    if ctx.catalogue is not None and (moving or any(
            s not in ctx.catalogue.schemes for s in profile.segments)):
        profile = _segments(c, f, scores, profile, o, ctx, moving)
    o.profile = profile
    o.changed = profile != c.profile
    return o


def _labels(c: CustomerInput, f: Mapping[str, Any], profile: Profile, o: Outcome,
            ctx: ScoringContext) -> Profile:
    if ctx.label_options is None:
        return profile
    from scorers import labels

    st = labels.LabelState.from_dict(profile.labels)
    for e in sorted(c.events, key=lambda e: e.ts_ms):
        is_purchase = isinstance(e, TransactionEvent) and e.kind == "purchase"
        st, ex = labels.on_event(st, c.customer_id, e.ts_ms, is_purchase)
        o.examples.extend(ex)
    settled = ctx.settled_ms if ctx.settled_ms is not None else ctx.now_ms - ctx.lateness_ms
    # on_time waits ``lateness`` past the horizon itself; hand it the settled time as "now".
    st, ex = labels.on_time(st, c.customer_id, settled + ctx.lateness_ms, ctx.lateness_ms)
    o.examples.extend(ex)
    st = labels.observe(st, c.customer_id, f, ctx.now_ms,
                        has_clickstream=f.get("last_event_at") is not None,
                        **ctx.label_options)
    return replace(profile, labels=st.to_dict())


def _actions_on_events(c: CustomerInput, profile: Profile, o: Outcome,
                       ctx: ScoringContext) -> Profile:
    if ctx.actions is None or not profile.nba:
        return profile
    from scorers import nba

    st = nba.NbaState.from_dict(profile.nba)
    for e in sorted(c.events, key=lambda e: e.ts_ms):
        if isinstance(e, TransactionEvent) and e.kind == "purchase":
            st, conversions = nba.on_purchase(st, e.ts_ms)
            for conv in conversions:
                o.add(ACTION_HASH, nba.counter_field(conv.action_id, conv.segment,
                                                     conv.holdout, "converted"), 1)
    st = nba.expire(st, ctx.now_ms, ctx.lateness_ms, ctx.actions)
    return replace(profile, nba=st.to_dict())


def _segments(c: CustomerInput, f: dict[str, Any], scores: dict[str, Any], profile: Profile,
              o: Outcome, ctx: ScoringContext, moving: set[str]) -> Profile:
    from scorers.rules import SegmentState, assign

    catalogue = ctx.catalogue
    assert catalogue is not None
    values = {**f, **scores}
    segments = dict(profile.segments)
    for gone in [s for s in segments if s not in catalogue.schemes]:
        o.add(SEGMENT_HASH, f"{gone}|{segments.pop(gone)[0]}", -1)
    for name, scheme in catalogue.schemes.items():
        if name not in moving:
            continue
        cur = segments.get(name)
        current = SegmentState(cur[0], cur[1]) if cur else None
        a = assign(scheme, values, current, ctx.now_ms)
        if cur is not None and a.segment == cur[0]:
            continue
        frm = cur[0] if cur else None
        if cur is not None:
            o.add(SEGMENT_HASH, f"{name}|{frm}", -1)
        o.add(SEGMENT_HASH, f"{name}|{a.segment}", 1)
        segments[name] = (a.segment, ctx.now_ms)
        cause = _cause(c.trigger, ctx.now_ms)
        mid = migration_id(c.customer_id, name, frm, a.segment, cause)
        action, profile = _decide_action(c.customer_id, name, frm, a.segment, profile, o, ctx)
        used = sorted(n for n in scheme.names if n in f)
        o.migrations.append({
            "migration_id": mid,
            "customer_id": c.customer_id,
            "scheme": name,
            "from_segment": frm,
            "to_segment": a.segment,
            "at": iso(ctx.now_ms),
            "emitted_at": wall_iso(ctx.wall_ms),
            "reason": a.reason,
            "features": {k: f[k] for k in used},
            "scores": scores,
            "rules_version": catalogue.version,
            "model_versions": ctx.model_versions(),
            "action": action,
            "trigger": dict(c.trigger) if c.trigger else {"sweep": True},
        })
        profile = profile.with_migration(
            (ctx.now_ms, name, frm, a.segment, mid, action["action_id"] if action else None))
    return replace(profile, segments=segments)


def _cause(trigger: Mapping[str, Any] | None, now_ms: int) -> str:
    if trigger is None:
        return f"sweep:{now_ms}"
    return f"{trigger.get('topic')}:{trigger.get('partition')}:{trigger.get('offset')}"


def _decide_action(customer_id: str, scheme: str, frm: str | None, to: str, profile: Profile,
                   o: Outcome, ctx: ScoringContext) -> tuple[dict[str, Any] | None, Profile]:
    if ctx.actions is None:
        return None, profile
    from scorers import nba

    st = nba.NbaState.from_dict(profile.nba)
    st, decision = nba.decide(ctx.actions, st, customer_id, scheme, frm, to, ctx.now_ms)
    profile = replace(profile, nba=st.to_dict())
    if decision is None:
        return None, profile
    o.add(ACTION_HASH, nba.counter_field(decision.action_id, to, decision.holdout, "exposed"), 1)
    return {"action_id": decision.action_id, "channel": decision.channel,
            "priority": decision.priority, "holdout": decision.holdout}, profile
