"""The model version a worker reports is the registry version it scores with.

With the inline learner, ``segstream_model_version`` and ``/api/stats`` reported the
training model's count of learned examples as its version: 3,130 while no version was
served at all, then 1 once the learner promoted version 1.
"""

from __future__ import annotations

from types import SimpleNamespace

from scorers.labels import Example
from scorers.online import OnlineModel
from stream.app import Engine


def _trained(n: int) -> OnlineModel:
    m = OnlineModel("churn", min_per_class=2)
    for i in range(n):
        m.learn(Example(f"e{i}", "churn", "h", i, i, {"idle": float(i % 2)}, i % 2))
    return m


def test_the_inline_learner_reports_the_served_version_not_its_examples() -> None:
    training = _trained(300)
    engine = SimpleNamespace(runtime=SimpleNamespace(models={}, versions={}),
                             learner=SimpleNamespace(models={"churn": training}))
    q = Engine.model_quality(engine)  # type: ignore[arg-type]
    assert q["churn"]["version"] == 0, "nothing served yet"
    assert q["churn"]["examples"] == 300  # the quality is the training model's

    served = OnlineModel.restore(training.snapshot(serving=True))
    served.version = 1
    engine.runtime = SimpleNamespace(models={"churn": served}, versions={"churn": 1})
    for i in range(300, 400):  # learning goes on after the promotion
        training.learn(Example(f"e{i}", "churn", "h", i, i, {"idle": float(i % 2)}, i % 2))
    q = Engine.model_quality(engine)  # type: ignore[arg-type]
    assert q["churn"]["version"] == 1
    assert q["churn"]["examples"] == 400
    assert training.version == 0  # learning does not make versions up


def test_a_worker_without_a_learner_reports_what_it_loaded() -> None:
    served = _trained(100)
    served.version = 7
    engine = SimpleNamespace(runtime=SimpleNamespace(models={"churn": served},
                                                     versions={"churn": 7}), learner=None)
    assert Engine.model_quality(engine)["churn"]["version"] == 7  # type: ignore[arg-type]
