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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from features.events import MS_PER_DAY, Event, TransactionEvent
from features.state import CustomerState, derive, iso
from scorers import clv, labels, nba, rfm
from scorers.profile import HISTORY_LIMIT, Profile

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
    #: identifies every input of an evaluation but the customer's own state, the population
    #: sketch and engine time ("": unknown): the scoring process, rules, actions and model
    #: versions. Kept in evaluated profiles with the engine day (see :func:`is_current`).
    context_key: str = ""

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
    #: engine time behind which no event of this customer can still be accepted late (it
    #: depends on the customer's input partition); None: the context's ``settled_ms``
    settled_ms: int | None = None

    def __init__(self, customer_id: str, state: CustomerState, profile: Profile,
                 events: Sequence[Event] = (), trigger: Mapping[str, Any] | None = None,
                 settled_ms: int | None = None) -> None:
        self.customer_id = customer_id
        self.state = state
        self.profile = profile
        self.events = events
        self.trigger = trigger
        self.settled_ms = settled_ms


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

    def __init__(self, customer_id: str, profile: Profile, changed: bool,
                 features: dict[str, Any], scores: dict[str, Any],
                 migrations: list[dict[str, Any]] | None = None,
                 examples: list[Any] | None = None,
                 increments: dict[str, dict[str, int]] | None = None) -> None:
        self.customer_id = customer_id
        self.profile = profile
        self.changed = changed
        self.features = features
        self.scores = scores
        self.migrations = [] if migrations is None else migrations
        self.examples = [] if examples is None else examples
        self.increments = {} if increments is None else increments

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
    """RFC 3339 UTC string of a wall-clock epoch-millisecond time.

    >>> wall_iso(1_750_000_000_000)
    '2025-06-15T15:06:40.000Z'
    """
    text = iso(ms) if ms >= 0 else None
    if text is not None:
        return text
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_NO_CLV: dict[str, float | None] = {"p_alive": None, "expected_purchases_90d": None,
                                    "clv_90d": None}


def clv_scores(model: ClvModel | None, f: Mapping[str, Any]) -> dict[str, float | None]:
    """``p_alive``, ``expected_purchases_90d`` and ``clv_90d`` from the BG/NBD inputs."""
    return clv_scores_many(model, [f])[0]


def clv_scores_many(model: ClvModel | None, feats: Sequence[Mapping[str, Any]]
                    ) -> list[dict[str, float | None]]:
    """:func:`clv_scores` of many customers, with the closed forms evaluated as arrays."""
    out = [dict(_NO_CLV) for _ in feats]
    if model is None:
        return out
    rows = [i for i, f in enumerate(feats) if f.get("bgnbd_frequency") is not None]
    if not rows:
        return out
    import numpy as np

    def column(name: str) -> Any:
        return np.array([feats[i][name] for i in rows], dtype=float)

    x, t_x, t_big = column("bgnbd_frequency"), column("bgnbd_recency"), column("bgnbd_T")
    alive = clv.p_alive(model.bgnbd, x, t_x, t_big).tolist()
    expected = clv.expected_purchases(model.bgnbd, CLV_HORIZON_DAYS, x, t_x, t_big).tolist()
    spend: list[float] | None = None
    if model.gamma_gamma is not None:
        m = np.array([feats[i].get("bgnbd_monetary") or 0.0 for i in rows], dtype=float)
        spend = clv.expected_spend(model.gamma_gamma, x, m).tolist()
    isfinite = math.isfinite
    for k, i in enumerate(rows):
        o = out[i]
        # no value where a model gives no finite answer (parameters at a bound, say)
        a, e = alive[k], expected[k]
        o["p_alive"] = a if isfinite(a) else None
        o["expected_purchases_90d"] = e if isfinite(e) else None
        c = e * spend[k] if spend is not None else math.nan
        o["clv_90d"] = c if isfinite(c) else None
    return out


#: Which model produces which score.
MODEL_SCORES = {"churn": "churn_probability", "purchase_7d": "purchase_propensity_7d"}


def _all_scores(feats: list[dict[str, Any]], xs: Sequence[Mapping[str, float]] | None,
                ctx: ScoringContext, population: rfm.Population | None = None
                ) -> list[dict[str, Any]]:
    """Every score of every customer, in the order of the score contract; RFM ranks them
    in ``population`` (default: the context's)."""
    n = len(feats)
    preds: Mapping[str, Sequence[float | None]] = {}
    if ctx.models:
        from scorers.online import predict_models  # loaded with the models already

        preds = predict_models(ctx.models, xs or [])
    clusters: Sequence[str | None] = [None] * n
    if ctx.personas is not None:
        clusters = ctx.personas.predict_many(feats)
    clvs = clv_scores_many(ctx.clv, feats)
    today = ctx.today
    if population is None:
        population = ctx.population
    out = []
    for i in range(n):
        scores: dict[str, Any] = population.score(feats[i], today)
        scores.update(clvs[i])
        for model_name, score_name in MODEL_SCORES.items():
            p = preds.get(model_name)
            scores[score_name] = p[i] if p is not None else None
        scores["cluster"] = clusters[i]
        out.append(scores)
    return out


@dataclass(frozen=True)
class _Batch:
    """What every migration of one evaluation shares."""

    at: str | None
    emitted_at: str
    model_versions: dict[str, int]
    #: whether :func:`_moving` judged every scheme (a scheme it names almost surely moves)
    prefiltered: bool = False

    @classmethod
    def of(cls, ctx: ScoringContext, prefiltered: bool = False) -> _Batch:
        return cls(iso(ctx.now_ms), wall_iso(ctx.wall_ms), ctx.model_versions(), prefiltered)


def evaluate(inputs: Sequence[CustomerInput], ctx: ScoringContext) -> list[Outcome]:
    """Evaluate a group of customers at ``ctx.now_ms``."""
    feats = [derive(c.state, ctx.now_ms) for c in inputs]
    xs: list[dict[str, float]] | None = None
    if ctx.models:
        xs = [labels.model_inputs(f) for f in feats]
    # RFM ranks the group among the purchasing customers with the group's own values, as
    # the stored sketch will count them once this evaluation is committed. Against the
    # sketch alone a first purchase had no score on a fresh deployment (every customer of
    # the first batches a Prospect, then held there by the minimum dwell), and in general
    # a customer was ranked without themselves.
    contribs = [rfm.contribution(f, ctx.today) for f in feats]
    moves = [rfm.deltas(c.profile.rfm, new) for c, new in zip(inputs, contribs, strict=True)]
    changes: dict[str, int] = {}
    for move in moves:
        for fld, d in move.items():
            changes[fld] = changes.get(fld, 0) + d
    population = ctx.population.updated({k: v for k, v in changes.items() if v})
    all_scores = _all_scores(feats, xs, ctx, population)
    moving, prefiltered = _moving(inputs, feats, all_scores, ctx)
    batch = _Batch.of(ctx, prefiltered)
    return [_evaluate_one(c, feats[i], xs[i] if xs is not None else None, all_scores[i], ctx,
                          moving[i], batch, contribs[i], moves[i])
            for i, c in enumerate(inputs)]


#: Fewest customers for which the vectorised pre-filter pays for itself (measured with
#: ``python -m bench.profile_scoring --batch N``).
MOVING_PREFILTER_MIN = 128


def _moving(inputs: Sequence[CustomerInput], feats: list[dict[str, Any]],
            scores: list[dict[str, Any]], ctx: ScoringContext) -> tuple[list[set[str]], bool]:
    """Per customer, the schemes whose segment may change (a vectorised pre-filter), and
    whether the pre-filter judged them (else every scheme is named).

    The vectorised evaluation follows :func:`scorers.rules.assign` exactly (minimum
    dwell, hysteresis for the incumbent segment, first match wins); customers it finds
    unchanged skip the scalar path, which remains the authority for everyone else.
    """
    import numpy as np

    from scorers.conditions import Columns

    n = len(inputs)
    out: list[set[str]] = [set() for _ in range(n)]
    if ctx.catalogue is None or n == 0:
        return out, False
    schemes = ctx.catalogue.schemes
    if n < MOVING_PREFILTER_MIN:
        # Columns cost a few milliseconds whatever their length: for a handful of
        # customers the scalar path alone is cheaper.
        return [set(schemes) for _ in range(n)], False
    # One set of columns for every scheme: each column is normalised once.
    raw: dict[str, list[Any]] = {}
    for key in frozenset().union(*(scheme.names for scheme in schemes.values())):
        src = scores if key in scores[0] else feats
        raw[key] = [row.get(key) for row in src]
    columns = Columns(raw, n)
    for name, scheme in schemes.items():
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
                stays = (incumbent == seg.name) & known
                if stays.any():
                    hit |= stays & seg.condition.evaluate_columns(
                        columns, dict(scheme.hysteresis))
            hit &= free
            result[hit] = seg.name
            free &= ~hit
        for i in np.flatnonzero(~held & (result != incumbent)):
            out[int(i)].add(name)
    return out, True


class _NbaTrack:
    """A customer's next-best-action state: decoded on first use, encoded once at the end."""

    def __init__(self, stored: dict[str, Any]) -> None:
        self.stored = stored
        self.loaded: nba.NbaState | None = None
        self.state: nba.NbaState | None = None
        self.touched = False

    def get(self) -> nba.NbaState:
        if self.state is None:
            self.loaded = self.state = nba.NbaState.from_dict(self.stored)
        return self.state

    def set(self, state: nba.NbaState) -> None:
        self.state = state
        self.touched = True

    def doc(self) -> dict[str, Any]:
        """The stored form: the input itself when it already says exactly this."""
        if self.state is None or not self.touched:
            return self.stored
        if self.state == self.loaded and nba.NbaState.is_canonical(self.stored):
            return self.stored
        return self.state.to_dict()


def _evaluate_one(c: CustomerInput, f: dict[str, Any], x: dict[str, float] | None,
                  scores: dict[str, Any], ctx: ScoringContext, moving: set[str],
                  batch: _Batch, contrib: tuple[str, str, str] | None,
                  move: Mapping[str, int]) -> Outcome:
    profile = c.profile
    o = Outcome(c.customer_id, profile, False, f, scores)
    # population sketch: ``move`` replaces the stored contribution by ``contrib``
    for fld, d in move.items():
        o.add(RFM_HASH, fld, d)
    label_doc = _labels(c, f, x, profile.labels, o, ctx)
    nba_track = _NbaTrack(profile.nba)
    _actions_on_events(c, nba_track, o, ctx)
    segments, history = profile.segments, profile.history
    if ctx.catalogue is not None and moving:
        segments, history = _segments(c, f, scores, segments, history, nba_track, o, ctx,
                                      moving, batch)
    nba_doc = nba_track.doc()
    rfm_score = scores.get("rfm")
    if (segments is profile.segments and label_doc is profile.labels
            and nba_doc is profile.nba and history is profile.history and contrib == profile.rfm
            and not _mark(profile, ctx, rfm_score)):
        return o  # nothing changed: skip building and comparing a new profile
    # Built directly: ``dataclasses.replace`` (twice) cost more than the rest of this tail.
    migrations = profile.migrations + len(o.migrations)
    changed = (migrations != profile.migrations or contrib != profile.rfm
               or segments != profile.segments or label_doc != profile.labels
               or nba_doc != profile.nba or history != profile.history)
    # A profile written anyway carries this evaluation's mark; an unchanged one only when
    # it must (so the outcome does not depend on which path found it unchanged).
    if ctx.context_key and (changed or _mark(profile, ctx, rfm_score)):
        context, day, score = ctx.context_key, ctx.today, rfm_score
        changed = changed or (context, day, score) != (
            profile.context, profile.context_day, profile.rfm_score)
    else:
        context, day, score = profile.context, profile.context_day, profile.rfm_score
    o.profile = Profile(segments=segments, rfm=contrib, labels=label_doc, nba=nba_doc,
                        history=history, migrations=migrations, context=context,
                        context_day=day, rfm_score=score)
    o.changed = changed
    return o


def _mark(profile: Profile, ctx: ScoringContext, rfm_score: str | None) -> bool:
    """Whether an otherwise unchanged profile must be written to record this evaluation.

    A stored mark of the same engine day must be kept true: it would otherwise vouch for
    an older state. A mark of an earlier day can never be current again (engine time only
    moves forward), so it may stay as it is; it is renewed when the engine day is the wall
    clock's (a live stream, whose sweeps it spares), not while a replay of history rolls
    through its days, where it would cost a profile write per customer and day.
    """
    if not ctx.context_key:
        return False
    today = ctx.today
    if profile.context_day == today:
        return profile.context != ctx.context_key or profile.rfm_score != rfm_score
    return today >= ctx.wall_ms // MS_PER_DAY - 1


def is_current(profile: Profile, ctx: ScoringContext,
               population: rfm.Population | None = None) -> bool:
    """Whether the customer's last evaluation had the inputs an evaluation in ``ctx`` would
    have, as far as a timer sweep is concerned: the same context key (rules, actions,
    models, scoring process), the same engine day and the same RFM score, ranked in ``population``
    (default: the context's) from the sketch fields the customer last contributed. A
    sweep passes over such a customer: re-evaluating them would decide the same.

    The key pins the engine day, and features change only from day to day; within a day
    the minimum dwell is what can still free a customer to move, so a customer whose
    dwell in a segment ends today, by ``ctx.now_ms``, is not current. (Label observations
    and action windows coming due within the day wait for the customer's next
    evaluation, at the latest the next day's sweep.)
    """
    if not ctx.context_key or profile.context != ctx.context_key or (
            profile.context_day != ctx.today):
        return False
    pop = ctx.population if population is None else population
    if pop.rank_of(profile.rfm) != profile.rfm_score:
        return False
    if ctx.catalogue is not None and profile.segments:
        day_start = ctx.now_ms - ctx.now_ms % MS_PER_DAY
        schemes = ctx.catalogue.schemes
        for name, (_seg, since) in profile.segments.items():
            scheme = schemes.get(name)
            if scheme is not None and scheme.min_dwell_ms > 0 and (
                    day_start <= since + scheme.min_dwell_ms <= ctx.now_ms):
                return False
    return True


def _by_time(e: Event) -> int:
    return e.ts_ms


def _settled_now(c: CustomerInput, ctx: ScoringContext) -> int:
    """Engine time as the customer's input partition sees it: ``lateness`` past the time
    behind which no event of theirs can still be accepted."""
    settled = c.settled_ms if c.settled_ms is not None else ctx.settled_ms
    if settled is None:
        settled = ctx.now_ms - ctx.lateness_ms
    return settled + ctx.lateness_ms


def _labels(c: CustomerInput, f: Mapping[str, Any], x: dict[str, float] | None,
            stored: dict[str, Any], o: Outcome, ctx: ScoringContext) -> dict[str, Any]:
    if ctx.label_options is None:
        return stored
    events = [(e.ts_ms, isinstance(e, TransactionEvent) and e.kind == "purchase")
              for e in sorted(c.events, key=_by_time)]
    # on_time waits ``lateness`` past the horizon itself; hand it the settled time as "now".
    settled_now = _settled_now(c, ctx)
    if labels.is_quiet(stored, events, settled_now, ctx.lateness_ms, ctx.now_ms,
                       **ctx.label_options):
        return stored
    st = labels.LabelState.from_dict(stored)
    for ts_ms, is_purchase in events:
        st, ex = labels.on_event(st, c.customer_id, ts_ms, is_purchase)
        o.examples.extend(ex)
    st, ex = labels.on_time(st, c.customer_id, settled_now, ctx.lateness_ms)
    o.examples.extend(ex)
    st = labels.observe(st, c.customer_id, f, ctx.now_ms,
                        has_clickstream=f.get("last_event_at") is not None, inputs=x,
                        **ctx.label_options)
    return st.to_dict()


def _actions_on_events(c: CustomerInput, track: _NbaTrack, o: Outcome,
                       ctx: ScoringContext) -> None:
    if ctx.actions is None or not track.stored:
        return
    purchases = [e.ts_ms for e in sorted(c.events, key=_by_time)
                 if isinstance(e, TransactionEvent) and e.kind == "purchase"]
    # An exposure waits for purchases as long as the customer's partition still accepts
    # them: engine time moved on by another topic or partition must not close it.
    settled_now = _settled_now(c, ctx)
    if nba.is_quiet(track.stored, purchases, ctx.now_ms, ctx.lateness_ms, ctx.actions,
                    settled_now):
        return
    st = track.get()
    for ts_ms in purchases:
        st, conversions = nba.on_purchase(st, ts_ms)
        for conv in conversions:
            o.add(ACTION_HASH, nba.counter_field(conv.action_id, conv.segment,
                                                 conv.holdout, "converted"), 1)
    track.set(nba.expire(st, ctx.now_ms, ctx.lateness_ms, ctx.actions, settled_now))


def _segments(c: CustomerInput, f: dict[str, Any], scores: dict[str, Any],
              current_segments: dict[str, tuple[str, int]], history: tuple[tuple[Any, ...], ...],
              nba_track: _NbaTrack, o: Outcome, ctx: ScoringContext, moving: set[str],
              batch: _Batch) -> tuple[dict[str, tuple[str, int]], tuple[tuple[Any, ...], ...]]:
    from scorers.rules import SegmentState, assign

    catalogue = ctx.catalogue
    assert catalogue is not None
    values = {**f, **scores}
    # A scheme taken out of the catalogue keeps its customers where they are (and its
    # counts): its migration chains end in their last segment, and go on from there if the
    # scheme comes back. The views show only the catalogue's schemes.
    segments = dict(current_segments)
    for name, scheme in catalogue.schemes.items():
        if name not in moving:
            continue
        cur = segments.get(name)
        current = SegmentState(cur[0], cur[1]) if cur else None
        # After the pre-filter a scheme named here nearly always moves: explain at once.
        a = assign(scheme, values, current, ctx.now_ms, explain=batch.prefiltered)
        if cur is not None and a.segment == cur[0]:
            continue
        if not batch.prefiltered:
            a = assign(scheme, values, current, ctx.now_ms)  # a move: now with its reason
        frm = cur[0] if cur else None
        if cur is not None:
            o.add(SEGMENT_HASH, f"{name}|{frm}", -1)
        o.add(SEGMENT_HASH, f"{name}|{a.segment}", 1)
        segments[name] = (a.segment, ctx.now_ms)
        # The customer's migration count keeps ids distinct when the same move recurs at
        # one engine time (a flip back and forth between two sweeps), and stays the same
        # when a redelivery recomputes this move.
        cause = f"{_cause(c.trigger, ctx.now_ms)}#{c.profile.migrations + len(o.migrations)}"
        mid = migration_id(c.customer_id, name, frm, a.segment, cause)
        action = _decide_action(c.customer_id, name, frm, a.segment, nba_track, o, ctx)
        used = sorted(n for n in scheme.names if n in f)
        o.migrations.append({
            "migration_id": mid,
            "customer_id": c.customer_id,
            "scheme": name,
            "from_segment": frm,
            "to_segment": a.segment,
            "at": batch.at,
            "emitted_at": batch.emitted_at,
            "reason": a.reason,
            "features": {k: f[k] for k in used},
            "scores": scores,
            "rules_version": catalogue.version,
            "model_versions": dict(batch.model_versions),
            "action": action,
            "trigger": dict(c.trigger) if c.trigger else {"sweep": True},
        })
        entry = (ctx.now_ms, name, frm, a.segment, mid, action["action_id"] if action else None)
        history = (*history, entry)[-HISTORY_LIMIT:]  # as Profile.with_migration
    return segments, history


def _cause(trigger: Mapping[str, Any] | None, now_ms: int) -> str:
    if trigger is None:
        return f"sweep:{now_ms}"
    return f"{trigger.get('topic')}:{trigger.get('partition')}:{trigger.get('offset')}"


def _decide_action(customer_id: str, scheme: str, frm: str | None, to: str,
                   track: _NbaTrack, o: Outcome, ctx: ScoringContext) -> dict[str, Any] | None:
    if ctx.actions is None:
        return None
    st, decision = nba.decide(ctx.actions, track.get(), customer_id, scheme, frm, to,
                              ctx.now_ms)
    track.set(st)
    if decision is None:
        return None
    o.add(ACTION_HASH, nba.counter_field(decision.action_id, to, decision.holdout, "exposed"), 1)
    # DESIGN §3's action object: its priority only chose it among the rules that matched.
    return {"action_id": decision.action_id, "channel": decision.channel,
            "holdout": decision.holdout}
