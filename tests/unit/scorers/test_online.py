"""Online model: River parity, persistence, deduplication and drift alarms."""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scorers.labels import INPUT_NAMES, Example
from scorers.online import OnlineModel


def _stream(n: int, seed: int, *, flip_at: int | None = None, start: int = 0
            ) -> list[Example]:
    """Examples whose label depends on two of three inputs; optionally inverted midway."""
    rnd = random.Random(seed)
    out = []
    for i in range(start, start + n):
        x = {"a": rnd.gauss(0, 1), "b": rnd.gauss(5, 3), "c": rnd.random()}
        p = 1 / (1 + math.exp(-(2.0 * x["a"] - 0.5 * (x["b"] - 5))))
        y = int(rnd.random() < p)
        if flip_at is not None and i >= flip_at:
            y = 1 - y
        out.append(Example(f"e{i}", "churn", "h", i, i, x, y))
    return out


@pytest.fixture(scope="module")
def trained() -> OnlineModel:
    m = OnlineModel("churn")
    for e in _stream(1500, 1):
        m.learn(e)
    return m


def test_not_ready_until_both_classes_seen() -> None:
    m = OnlineModel("churn", min_per_class=5)
    for i in range(20):
        m.learn(Example(f"e{i}", "churn", "h", i, i, {"a": 1.0}, 1))
    assert m.predict_many([{"a": 1.0}]) == [None]
    assert m.quality()["auc"] is None
    for i in range(20, 25):
        m.learn(Example(f"e{i}", "churn", "h", i, i, {"a": 0.0}, 0))
    assert m.predict_many([{"a": 1.0}])[0] is not None


def test_predict_many_matches_river(trained: OnlineModel) -> None:
    rnd = random.Random(2)
    xs: list[dict[str, float]] = [e.x for e in _stream(200, 3)]
    xs += [{"a": rnd.gauss(0, 5)}, {}, {"b": 1.0, "unknown": 3.0}, {"a": 1e6, "b": -1e6}]
    ours = trained.predict_many(xs)
    for x, p in zip(xs, ours, strict=True):
        river = trained.pipeline.predict_proba_one(x)[True]
        assert p == pytest.approx(river, abs=1e-9)
    assert trained.predict_many([]) == []


def test_predict_many_is_fast(trained: OnlineModel) -> None:
    xs = [e.x for e in _stream(5000, 4)]
    trained.predict_many(xs[:10])
    t0 = time.perf_counter()
    trained.predict_many(xs)
    per_row_us = (time.perf_counter() - t0) / len(xs) * 1e6
    print(f"predict_many: {per_row_us:.2f} us per row (3 inputs)")
    assert per_row_us < 50


def test_snapshot_restore_gives_identical_predictions(trained: OnlineModel) -> None:
    trained.position = {"examples": {0: 1499}}
    back = OnlineModel.restore(trained.snapshot())
    xs = [e.x for e in _stream(100, 5)]
    assert back.predict_many(xs) == trained.predict_many(xs)
    assert back.quality() == trained.quality()
    assert back.position == {"examples": {0: 1499}} and back.version == trained.version
    # Both keep learning the same way.
    fresh = OnlineModel.restore(trained.snapshot())
    for e in _stream(50, 6, start=10_000):
        back.learn(e)
        fresh.learn(e)
    assert back.predict_many(xs) == fresh.predict_many(xs)
    # The restored copy remembers what it already learned.
    back.learn(_stream(1, 1)[0])
    assert back.quality()["duplicates"] == 1


def test_a_serving_snapshot_scores_as_the_model_without_its_example_ids(
        trained: OnlineModel) -> None:
    full, serving = trained.snapshot(), trained.snapshot(serving=True)
    assert len(full) - len(serving) >= 2 * 1_500 * 5  # the 1,500 ids, kept twice
    back = OnlineModel.restore(serving)
    xs = [e.x for e in _stream(200, 8)] + [{}, {"a": 3.0}]
    assert back.predict_many(xs) == trained.predict_many(xs)
    assert back.quality() == trained.quality()
    assert back.version == trained.version and back.ready
    # It remembers no ids: an example it learned before counts as new...
    assert not back._seen and not back._order
    back.learn(_stream(1, 1)[0])
    assert back.quality()["duplicates"] == 0 and back.examples == trained.examples + 1
    # ...and from there on it deduplicates again.
    back.learn(_stream(1, 1)[0])
    assert back.quality()["duplicates"] == 1


def test_restore_refuses_foreign_bytes() -> None:
    import pickle

    with pytest.raises(ValueError):
        OnlineModel.restore(pickle.dumps({"format": "other"}))


def test_duplicates_are_ignored() -> None:
    examples = _stream(400, 7)
    once, twice = OnlineModel("churn"), OnlineModel("churn")
    for e in examples:
        once.learn(e)
        twice.learn(e)
        twice.learn(e)
    for e in examples[:100]:  # a late redelivery
        twice.learn(e)
    xs = [e.x for e in examples[:20]]
    assert twice.predict_many(xs) == once.predict_many(xs)
    assert twice.examples == once.examples == 400
    assert twice.quality()["duplicates"] == 500
    assert {k: v for k, v in twice.quality().items() if k != "duplicates"} == {
        k: v for k, v in once.quality().items() if k != "duplicates"}


def test_dedupe_memory_is_bounded() -> None:
    m = OnlineModel("churn", dedupe=10)
    for e in _stream(30, 8):
        m.learn(e)
    assert len(m._seen) == 10 and len(m._order) == 10


def test_refuses_examples_of_another_model() -> None:
    with pytest.raises(ValueError):
        OnlineModel("churn").learn(Example("e", "purchase_7d", "h", 0, 0, {}, 1))


def test_quality_reports_prequential_metrics(trained: OnlineModel) -> None:
    q = trained.quality()
    assert q["examples"] == 1500 and 0 < q["positives"] < 1500
    assert q["scored"] > 1000 and q["auc"] > 0.8 and 0 < q["log_loss"] < 0.6
    assert q["drift_alarms"] == 0 and q["last_drift_at"] is None


def test_drift_alarm_when_labels_flip() -> None:
    m = OnlineModel("churn")
    for e in _stream(4000, 9, flip_at=2000):
        m.learn(e)
    q = m.quality()
    print(f"flip at 2000: alarms={q['drift_alarms']} last_drift_at={q['last_drift_at']}")
    assert q["drift_alarms"] >= 1
    assert 2000 <= q["last_drift_at"] < 2400


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_no_drift_alarm_on_a_stationary_stream(seed: int) -> None:
    m = OnlineModel("churn")
    for e in _stream(4000, seed):
        m.learn(e)
    assert m.quality()["drift_alarms"] == 0


def test_auc_is_unknown_while_the_window_holds_one_class() -> None:
    from scorers.labels import Example
    from scorers.online import OnlineModel

    m = OnlineModel("churn", window=50, min_per_class=5)
    ex = [Example(f"e{i}", "churn", "h", i, i + 1, {"a": float(i % 3)}, i % 2) for i in range(20)]
    for e in ex:
        m.learn(e)
    for i in range(20, 80):  # the window (50) now holds positives only
        m.learn(Example(f"e{i}", "churn", "h", i, i + 1, {"a": float(i % 3)}, 1))
    assert m.scored > 0
    assert m.quality()["auc"] is None  # River would say 0.0
    for i in range(80, 100):
        m.learn(Example(f"e{i}", "churn", "h", i, i + 1, {"a": float(i % 3)}, i % 2))
    assert m.quality()["auc"] is not None


def test_snapshots_stay_bounded_however_many_examples_were_scored() -> None:
    """River's rolling AUC buffered every scored example until it was read; the learner
    process never read it, so its checkpoints and every serving snapshot grew by about 11
    bytes per example, for ever."""
    small, big = OnlineModel("churn", window=200), OnlineModel("churn", window=200)
    for e in _stream(1_000, 3):
        small.learn(e)
    for e in _stream(12_000, 3):
        big.learn(e)
    assert big.scored > 10 * small.scored > 0
    grown = len(big.snapshot(serving=True)) - len(small.snapshot(serving=True))
    assert grown < 2_000, f"the serving snapshot grew by {grown} bytes"
    assert len(big.auc._buf_labels) < 200  # River's buffer, read back at most a window
    # reading the metric early changes nothing of its value
    unread = OnlineModel("churn", window=200)
    unread._settle_auc = lambda: None  # type: ignore[method-assign]
    for e in _stream(12_000, 3):
        unread.learn(e)
    assert unread.quality()["auc"] == big.quality()["auc"]


def _river(lr: float = 0.001, l2: float = 1e-4) -> object:
    """The pipeline :class:`OnlineModel` documents, built from River alone."""
    from river import compose, linear_model, optim, preprocessing

    return compose.Pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(optimizer=optim.RMSProp(lr), l2=l2))


def _agrees_with_river(model: OnlineModel, river: object, xs: list[dict[str, float]]) -> None:
    """The model's whole learning state and its scores equal River's (to a few ulps: the
    model's dot products may sum in another order)."""
    ours_scaler, ours_lr = model.pipeline.steps.values()
    ref_scaler, ref_lr = river.steps.values()  # type: ignore[attr-defined]
    assert dict(ours_scaler.counts) == dict(ref_scaler.counts)
    for mine, ref in ((ours_scaler.means, ref_scaler.means), (ours_scaler.vars, ref_scaler.vars),
                      (ours_lr.weights, ref_lr.weights),
                      (ours_lr.optimizer.g2.to_dict(), ref_lr.optimizer.g2.to_dict())):
        assert set(mine) == set(ref)
        for k in ref:
            assert mine[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-300), k
    assert ours_lr.intercept == pytest.approx(ref_lr.intercept, rel=1e-12)
    assert ours_lr.optimizer.n_iterations == ref_lr.optimizer.n_iterations
    for x, p in zip(xs, model.predict_many(xs), strict=True):
        expected = river.predict_proba_one(x)[True]  # type: ignore[attr-defined]
        assert p is None if not model.ready else p == pytest.approx(expected, abs=1e-12)


_value = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0, -3.5]),
                   st.integers(-1000, 1000))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.lists(_value, min_size=3, max_size=3), st.booleans()),
                     min_size=1, max_size=120),
       l2=st.sampled_from([0.0, 1e-4, 0.5]), reorder=st.booleans())
def test_learning_is_rivers_learning(rows: list[tuple[list[float], bool]], l2: float,
                                     reorder: bool) -> None:
    """The model learns with its own arithmetic on flat lists; every state it reaches is
    the one River's ``learn_one`` reaches on the same examples, and so is its prequential
    quality (which scores each example before learning it)."""
    river = _river(l2=l2)
    model = OnlineModel("churn", l2=l2, min_per_class=1)
    for i, (values, y) in enumerate(rows):
        names = ("a", "b", "c") if not (reorder and i % 2) else ("c", "a", "b")
        x = dict(zip(names, values if names[0] == "a" else values[2:] + values[:2],
                     strict=True))
        model.learn(Example(f"e{i}", "churn", "h", i, i, x, int(y)))
        river.learn_one(dict(x), y)  # type: ignore[attr-defined]
    _agrees_with_river(model, river, [{"a": 1.0, "b": -2.0, "c": 0.5}, {"a": 0.0}])


def test_inputs_whose_names_change_are_learned_as_river_learns_them() -> None:
    """Examples that lack an input, or bring a new one, go River's own way; the model
    keeps agreeing with River before, across and after them."""
    river = _river()
    model = OnlineModel("churn", min_per_class=5)
    rnd = random.Random(21)
    xs = []
    for i in range(3000):
        x = {"a": rnd.gauss(0, 1), "b": rnd.gauss(5, 3)}
        if 1000 <= i < 1010:
            del x["b"]  # an input missing
        if i >= 2000:
            x["c"] = rnd.random()  # a new input from here on
        y = int(rnd.random() < 1 / (1 + math.exp(-2 * x["a"])))
        model.learn(Example(f"e{i}", "churn", "h", i, i, x, y))
        river.learn_one(dict(x), y == 1)  # type: ignore[attr-defined]
        xs.append(x)
        if i in (999, 1009, 1999, 2999):
            _agrees_with_river(model, river, xs[-50:])
    assert model._fast is not None  # back on the flat path with the new input


def test_a_snapshot_taken_while_learning_carries_everything_learned() -> None:
    river = _river()
    model = OnlineModel("churn")
    examples = _stream(2000, 22)
    for e in examples[:1200]:
        model.learn(e)
        river.learn_one(dict(e.x), e.y == 1)  # type: ignore[attr-defined]
    back = OnlineModel.restore(model.snapshot())
    for e in examples[1200:]:
        back.learn(e)
        model.learn(e)
        river.learn_one(dict(e.x), e.y == 1)  # type: ignore[attr-defined]
    xs = [e.x for e in _stream(100, 23)]
    _agrees_with_river(back, river, xs)
    _agrees_with_river(model, river, xs)
    assert back.quality() == model.quality()


def test_the_learner_benchmark_times_the_same_work_on_both_sides() -> None:
    """``python -m bench.profile_learner`` compares the model's learning with River's own;
    its figures mean something only if both reached the same weights."""
    from bench.profile_learner import run

    r = run(500, 3)
    assert r["examples"] == 500 and r["inputs"] == len(INPUT_NAMES)
    assert r["learn_us_per_example"] > 0 and r["river_model_only_us_per_example"] > 0
    assert r["largest_relative_weight_difference"] < 1e-9
