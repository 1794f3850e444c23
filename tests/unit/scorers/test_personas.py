"""Persona clustering: separation, stable labels across publications, persistence."""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest

from scorers.personas import PERSONA_FEATURE_NAMES, PersonaModel, persona_vector


def _customer(kind: str, rnd: random.Random) -> dict[str, Any]:
    """Three clear behaviours: big buyers, support-heavy newcomers, lapsed visitors."""
    if kind == "buyer":
        return {"sessions_30d": rnd.randint(3, 6), "events_30d": rnd.randint(6, 12),
                "logins_30d": 3, "purchases_90d": rnd.randint(4, 9),
                "purchases_total": 8, "monetary_total": rnd.uniform(1500, 2500),
                "days_since_last_event": rnd.randint(0, 4), "recency_days": 2}
    if kind == "struggler":
        ev = rnd.randint(8, 15)
        return {"sessions_30d": rnd.randint(2, 5), "events_30d": ev, "logins_30d": 3,
                "support_tickets_30d": ev // 2, "days_since_last_event": rnd.randint(0, 6)}
    return {"days_since_last_event": rnd.randint(40, 90)}


def _population(n: int, seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    rnd = random.Random(seed)
    kinds = [rnd.choice(["buyer", "struggler", "lapsed"]) for _ in range(n)]
    return [_customer(k, rnd) for k in kinds], kinds


def test_nothing_before_the_first_fit() -> None:
    m = PersonaModel(k=3, init_size=50)
    feats, _ = _population(20, 0)
    m.learn_many(feats)
    assert m.version == 0 and m.predict_many(feats[:2]) == [None, None]
    assert m.describe() == [] and m.publish() == 0


def test_separates_clear_behaviours() -> None:
    feats, kinds = _population(600, 1)
    m = PersonaModel(k=3, init_size=300)
    m.learn_many(feats)
    labels = m.predict_many(feats)
    by_kind = {k: {lab for lab, kk in zip(labels, kinds, strict=True) if kk == k}
               for k in set(kinds)}
    assert all(len(v) == 1 for v in by_kind.values())
    assert len(set.union(*by_kind.values())) == 3
    assert sorted(set(labels)) == ["P1", "P2", "P3"]  # type: ignore[type-var]


def test_labels_survive_relearning_and_reordering() -> None:
    feats, _ = _population(900, 2)
    m = PersonaModel(k=3, init_size=300, seed=3)
    m.learn_many(feats[:300])
    before = m.predict_many(feats)
    # Scramble the internal order of the centroids: labels must follow the centroids.
    assert m.centroids is not None
    m.centroids = m.centroids[::-1].copy()
    m.counts = m.counts[::-1].copy()
    for lo in range(300, 900, 100):
        m.learn_many(feats[lo:lo + 100])
    assert m.publish() == 2
    after = m.predict_many(feats)
    agree = sum(a == b for a, b in zip(before, after, strict=True)) / len(feats)
    assert agree > 0.98


def test_predictions_change_only_on_publish() -> None:
    feats, _ = _population(600, 4)
    m = PersonaModel(k=3, init_size=300)
    m.learn_many(feats[:300])
    before = m.predict_many(feats)
    m.learn_many(_population(300, 5)[0])
    assert m.predict_many(feats) == before and m.version == 1


def test_describe_reports_personas_in_feature_units() -> None:
    feats, _ = _population(600, 6)
    m = PersonaModel(k=3, init_size=600)
    m.learn_many(feats)
    d = m.describe()
    assert [p["label"] for p in d] == ["P1", "P2", "P3"]
    assert sum(p["size"] for p in d) == pytest.approx(1.0, abs=1e-3)
    assert all(set(p["centroid"]) == set(PERSONA_FEATURE_NAMES) for p in d)
    buyers = next(p for p in d if p["centroid"]["mean_basket"] > 100)
    assert "high spend" in buyers["description"] or "frequent purchases" in buyers[
        "description"]
    lapsed = next(p for p in d if p["centroid"]["days_inactive"] > 30)
    assert "inactive lately" in lapsed["description"]


def test_snapshot_round_trip() -> None:
    feats, _ = _population(400, 7)
    m = PersonaModel(k=3, init_size=300)
    m.learn_many(feats)
    back = PersonaModel.restore(m.snapshot())
    assert back.predict_many(feats) == m.predict_many(feats)
    assert back.describe() == m.describe() and back.version == m.version
    more = _population(200, 8)[0]
    m.learn_many(more)
    back.learn_many(more)
    m.publish()
    back.publish()
    assert back.predict_many(feats) == m.predict_many(feats)
    with pytest.raises(ValueError):
        PersonaModel.restore(pickle.dumps({"format": "segstream.online/1"}))


def test_persona_vector_tolerates_missing_features() -> None:
    v = persona_vector({})
    assert len(v) == len(PERSONA_FEATURE_NAMES) and all(x == 0.0 for x in v)
