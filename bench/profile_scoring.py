"""Micro-benchmark of the per-customer evaluation (``scorers.scoring.evaluate``).

Builds realistic inputs without Kafka or Redis: synthetic events of a few thousand
customers folded into feature states, a population sketch of their RFM contributions,
the default segment and action catalogues, quickly trained online models and personas.
It then times :func:`scorers.scoring.evaluate` per customer in three situations:

* ``steady``: profiles already hold the current segments (evaluate twice, time the second);
* ``new``: empty profiles, so every customer migrates in every scheme;
* ``sweep``: no events and no trigger, as the timer sweep calls it;
* ``later``: profiles settled three weeks earlier, then the events since (delayed labels
  resolve, exposures convert, observations are due, dwell times are over).

Run ``python -m bench.profile_scoring`` (``--help`` for sizes). ``--dump FILE`` writes
every outcome in a canonical form, so two versions of the scoring code can be checked
for identical output.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pickle
import pstats
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from features.events import MS_PER_DAY, ClickEvent, Event, TransactionEvent, to_units
from features.state import CustomerState, apply_many, derive, empty
from scorers import clv, labels, nba, rfm, rules
from scorers.online import OnlineModel
from scorers.personas import PersonaModel
from scorers.profile import Profile
from scorers.scoring import ClvModel, CustomerInput, Outcome, ScoringContext, evaluate

#: Fixed wall clock, so dumps of two runs compare equal.
WALL_MS = 1_750_000_000_000
LATENESS_MS = 7 * MS_PER_DAY
#: How long before the end the ``later`` scenario settles its profiles.
LATER_DAYS = 21


@dataclass
class Workload:
    """Customers (state and the batch's own events) and the shared scoring context."""

    ids: list[str]
    states: list[CustomerState]
    batch_events: list[list[Event]]
    ctx: ScoringContext
    #: states and context :data:`LATER_DAYS` before ``ctx.now_ms``, and the events since
    early_states: list[CustomerState]
    early_ctx: ScoringContext
    since_events: list[list[Event]]


def _event(topic: str, e: dict[str, Any]) -> Event:
    if topic == "transactions":
        return TransactionEvent(e["event_id"], e["customer_id"], int(e["ts"]),
                                to_units(float(e["amount"])), e["kind"])
    return ClickEvent(e["event_id"], e["customer_id"], int(e["ts"]), e["event_type"],
                      e.get("session_id"))


def _events(customers: int, days: int, seed: int) -> tuple[dict[str, list[Event]], int]:
    from stream import synthetic

    per: dict[str, list[Event]] = {}
    last = 0
    for topic, e in synthetic.iter_events(customers, days, seed):
        ev = _event(topic, e)
        per.setdefault(ev.customer_id, []).append(ev)
        last = max(last, ev.ts_ms)
    return per, last


def _train_models(feats: Sequence[dict[str, Any]], examples: int, seed: int
                  ) -> dict[str, OnlineModel]:
    """Online models trained on plausible labels (enough for realistic predictions)."""
    rnd = random.Random(seed)
    models = {m: OnlineModel(m, min_per_class=20) for m in labels.MODELS}
    for i in range(examples):
        f = feats[rnd.randrange(len(feats))]
        x = labels.model_inputs(f)
        idle = f.get("days_since_last_event") or f.get("recency_days") or 0
        churn = int(idle > 20 or rnd.random() < 0.1)
        buy = int((f.get("purchases_30d") or 0) > 0 and rnd.random() < 0.6)
        for m, y in ((labels.CHURN, churn), (labels.PURCHASE_7D, buy)):
            models[m].learn(labels.Example(f"e{i}{m}", m, "h", i, i, x, y))
    return models


def build(customers: int = 5000, days: int = 120, seed: int = 7, *,
          with_models: bool = True, examples: int = 3000) -> Workload:
    """Synthetic customers at the end of ``days``; the last day's events form the batch."""
    per, last_ts = _events(customers, days, seed)
    now_ms = last_ts
    cut = now_ms - MS_PER_DAY
    early_ms = now_ms - LATER_DAYS * MS_PER_DAY
    ids = sorted(per)
    states, batch, early, since = [], [], [], []
    for cid in ids:
        evs = sorted(per[cid], key=lambda e: e.ts_ms)
        states.append(apply_many(empty(), evs, LATENESS_MS))
        batch.append([e for e in evs if e.ts_ms > cut])
        early.append(apply_many(empty(), [e for e in evs if e.ts_ms <= early_ms], LATENESS_MS))
        since.append([e for e in evs if e.ts_ms > early_ms])
    feats = [derive(s, now_ms) for s in states]
    today = now_ms // MS_PER_DAY
    hist: Counter[str] = Counter()
    for f in feats:
        hist.update(rfm.contribution(f, today) or ())
    catalogue = rules.default_catalogue()
    schemes = {name: list(s.segment_names) for name, s in catalogue.schemes.items()}
    personas = PersonaModel(k=6, init_size=1000)
    personas.learn_many(feats)
    ctx = ScoringContext(
        now_ms=now_ms, wall_ms=WALL_MS, lateness_ms=LATENESS_MS,
        population=rfm.Population.from_hashes([hist]),
        catalogue=catalogue, actions=nba.default_actions(schemes),
        clv=ClvModel(clv.BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426),
                     clv.GammaGammaParams(p=6.25, q=3.74, v=15.44), 1),
        models=_train_models(feats, examples, seed) if with_models else {},
        personas=personas,
        label_options={"min_gap_days": 7},
    )
    early_ctx = replace(ctx, now_ms=early_ms, wall_ms=WALL_MS - LATER_DAYS * MS_PER_DAY)
    return Workload(ids, states, batch, ctx, early, early_ctx, since)


def _inputs(w: Workload, profiles: Sequence[Profile], *, sweep: bool) -> list[CustomerInput]:
    out = []
    for i, cid in enumerate(w.ids):
        events = () if sweep else w.batch_events[i]
        trigger = None if sweep else {"topic": "transactions", "partition": i % 12,
                                      "offset": 1000 + i}
        out.append(CustomerInput(cid, w.states[i], profiles[i], events, trigger))
    return out


def _run(inputs: Sequence[CustomerInput], ctx: ScoringContext, batch: int) -> list[Outcome]:
    out: list[Outcome] = []
    for k in range(0, len(inputs), batch):
        out.extend(evaluate(inputs[k:k + batch], ctx))
    return out


def scenarios(w: Workload) -> dict[str, Callable[[], list[CustomerInput]]]:
    """The three situations; each call builds fresh inputs (profiles are not timed)."""
    empty_profiles = [Profile() for _ in w.ids]
    first = _run(_inputs(w, empty_profiles, sweep=False), w.ctx, 500)
    settled = [o.profile for o in first]
    early = [CustomerInput(cid, w.early_states[i], Profile()) for i, cid in enumerate(w.ids)]
    earlier = [o.profile for o in _run(early, w.early_ctx, 500)]

    def later() -> list[CustomerInput]:
        inputs = _inputs(w, earlier, sweep=False)
        for i, c in enumerate(inputs):
            c.events = w.since_events[i]
        return inputs

    return {
        "steady": lambda: _inputs(w, settled, sweep=False),
        "new": lambda: _inputs(w, empty_profiles, sweep=False),
        "sweep": lambda: _inputs(w, settled, sweep=True),
        "later": later,
    }


def time_scenario(make: Callable[[], list[CustomerInput]], ctx: ScoringContext, batch: int,
                  repeat: int) -> float:
    """Best of ``repeat`` runs, in microseconds per customer."""
    best = float("inf")
    for _ in range(repeat):
        inputs = make()
        t0 = time.perf_counter()
        _run(inputs, ctx, batch)
        best = min(best, time.perf_counter() - t0)
    return best / len(inputs) * 1e6


def canonical(outcomes: Sequence[Outcome]) -> list[Any]:
    """Everything an evaluation produces, in a form two versions can be compared by."""
    return [
        (o.customer_id, o.changed, o.profile.to_bytes(), o.profile, o.features, o.scores,
         o.migrations, [e.to_dict() for e in o.examples], o.increments)
        for o in outcomes
    ]


def _profile(make: Callable[[], list[CustomerInput]], ctx: ScoringContext, batch: int,
             top: int) -> str:
    prof = cProfile.Profile()
    inputs = make()
    prof.enable()
    _run(inputs, ctx, batch)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--customers", type=int, default=5000)
    p.add_argument("--days", type=int, default=120)
    p.add_argument("--batch", type=int, default=500, help="customers per evaluate() call")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-models", action="store_true", help="skip the online models")
    p.add_argument("--profile", choices=("steady", "new", "sweep", "later", "none"),
                   default="steady")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--dump", help="write canonical outcomes of every scenario (pickle)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    w = build(args.customers, args.days, with_models=not args.no_models)
    makers = scenarios(w)
    print(f"built {len(w.ids)} customers in {time.perf_counter() - t0:.1f}s "
          f"(models: {'no' if args.no_models else 'yes'}, batch {args.batch})")
    for name, make in makers.items():
        us = time_scenario(make, w.ctx, args.batch, args.repeat)
        print(f"{name:>7}: {us:8.1f} us/customer")
    if args.dump:
        doc = {name: canonical(_run(make(), w.ctx, args.batch)) for name, make in makers.items()}
        with open(args.dump, "wb") as fh:
            pickle.dump(doc, fh, protocol=pickle.HIGHEST_PROTOCOL)
    if args.profile != "none":
        print(f"\ncProfile of '{args.profile}', top {args.top} by tottime:")
        print(_profile(makers[args.profile], w.ctx, args.batch, args.top))


if __name__ == "__main__":
    main()
