"""Online propensity models trained on delayed labels (churn, purchase in 7 days).

An :class:`OnlineModel` is a River pipeline (running standard scaler, then logistic
regression with RMSProp) with the bookkeeping a streaming engine needs around it:

* :meth:`OnlineModel.learn` is prequential: every example is first scored, the score
  feeds a rolling ROC AUC, a rolling log loss and an ADWIN drift detector on the
  absolute error (an alarm is a significant rise of the error), and only then does the
  model learn from it. Examples whose id was seen recently are ignored, so an
  at-least-once examples topic is harmless.
* :meth:`OnlineModel.predict_many` scores a batch with numpy from the pipeline's
  current scaler statistics and weights (a few microseconds a customer), matching
  River's own ``predict_proba_one``. It answers ``None`` until the model has seen
  ``min_per_class`` examples of each class.
* :meth:`OnlineModel.snapshot` / :meth:`OnlineModel.restore` move the model between
  the learner and the scorers; ``position`` is an opaque slot for the learner's input
  offsets, saved with the model.

>>> from scorers.labels import Example
>>> m = OnlineModel("churn", min_per_class=2)
>>> for i in range(20):
...     m.learn(Example(f"e{i}", "churn", "h", i, i, {"idle": float(i % 2)}, i % 2))
>>> m.learn(Example("e3", "churn", "h", 3, 3, {"idle": 1.0}, 1))  # duplicate: ignored
>>> m.quality()["examples"], m.version  # a version is given by the learner's promotion
(20, 0)
>>> p_busy, p_idle = m.predict_many([{"idle": 0.0}, {"idle": 1.0}])
>>> p_busy < 0.5 < p_idle
True
>>> OnlineModel.restore(m.snapshot()).predict_many([{"idle": 1.0}]) == [p_idle]
True
"""

from __future__ import annotations

import math
import pickle
from collections import deque
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

import numpy as np
from river import compose, drift, linear_model, metrics, optim, preprocessing, utils

from scorers.labels import Example

# River is untyped; calling it through ``Any`` keeps mypy strict quiet.
_metrics: Any = metrics
_drift: Any = drift

#: Tag of the snapshot format; :meth:`OnlineModel.restore` refuses any other.
SNAPSHOT_FORMAT = "segstream.online/1"


class OnlineModel:
    """A prequentially evaluated online logistic model of one delayed label.

    Parameters
    ----------
    name
        The model's name (``"churn"``, ``"purchase_7d"``); examples of another model
        are refused.
    lr
        Learning rate of the RMSProp optimiser. Examples arrive in runs of one label
        (a sweep settles many churners at once), which throws plain SGD's last iterate
        around; RMSProp's per-weight step sizes are much steadier on such streams.
    l2
        L2 regularisation of the weights.
    min_per_class
        Examples of each class needed before :meth:`predict_many` answers.
    window
        Examples in the rolling AUC and log-loss windows.
    drift_delta
        ADWIN confidence; smaller means fewer, surer alarms.
    dedupe
        How many recent example ids are remembered to drop redeliveries.
    """

    def __init__(self, name: str, *, lr: float = 0.001, l2: float = 1e-4,
                 min_per_class: int = 50, window: int = 2000, drift_delta: float = 0.002,
                 dedupe: int = 100_000) -> None:
        self.name = name
        self.min_per_class = min_per_class
        self.pipeline: Any = compose.Pipeline(
            preprocessing.StandardScaler(),
            linear_model.LogisticRegression(optimizer=optim.RMSProp(lr), l2=l2),
        )
        self.auc: Any = _metrics.RollingROCAUC(window_size=window)
        self.log_loss: Any = utils.Rolling(_metrics.LogLoss, window_size=window)
        #: labels in the rolling window, to tell when the AUC is undefined (one class only)
        self.window_labels: deque[int] = deque(maxlen=window)
        self.detector: Any = _drift.ADWIN(delta=drift_delta)
        #: the serving version the learner promoted this model as (0 before its first)
        self.version = 0
        self.examples = 0
        self.positives = 0
        self.scored = 0
        self.duplicates = 0
        self.drift_alarms = 0
        self.last_drift_at: int | None = None
        #: Opaque to the model: the learner keeps its input offsets here.
        self.position: Any = None
        self._dedupe = dedupe
        self._seen: set[str] = set()
        self._order: deque[str] = deque()
        self._cache: tuple[int, list[str], Any, Any, Any, float] | None = None

    # learning ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the model has seen enough of both classes to score customers."""
        negatives = self.examples - self.positives
        return min(self.positives, negatives) >= self.min_per_class

    def _remember(self, example_id: str) -> bool:
        if example_id in self._seen:
            return False
        self._seen.add(example_id)
        self._order.append(example_id)
        if len(self._order) > self._dedupe:
            self._seen.discard(self._order.popleft())
        return True

    def learn(self, example: Example) -> None:
        """Score the example (for the quality metrics), then learn from it."""
        if example.model != self.name:
            raise ValueError(f"example of model {example.model!r} given to {self.name!r}")
        if not self._remember(example.example_id):
            self.duplicates += 1
            return
        y = example.y == 1
        if self.ready:
            p = float(self.pipeline.predict_proba_one(example.x).get(True, 0.0))
            self.scored += 1
            self.auc.update(y, p)
            if self.scored % (self.window_labels.maxlen or 1) == 0:
                self._settle_auc()
            self.log_loss.update(y, p)
            self.window_labels.append(int(y))
            before = self.detector.estimation
            self.detector.update(abs(float(y) - p))
            # ADWIN flags any change of the mean error; only a worse error is an alarm
            # (a model still converging makes its error drop, which is no reason to worry).
            if self.detector.drift_detected and self.detector.estimation > before:
                self.drift_alarms += 1
                self.last_drift_at = example.resolved_ts_ms
        self.pipeline.learn_one(dict(example.x), y)
        self.examples += 1
        self.positives += int(y)

    # scoring ----------------------------------------------------------------

    def _params(self) -> tuple[list[str], Any, Any, Any, float]:
        # Every example learned changes the parameters (a duplicate learns nothing).
        if self._cache is None or self._cache[0] != self.examples:
            scaler, lr = self.pipeline.steps.values()
            names = list(scaler.counts)
            means = np.array([scaler.means[n] for n in names], dtype=float)
            var = np.array([scaler.vars[n] for n in names], dtype=float)
            inv_std = np.divide(1.0, np.sqrt(var), out=np.zeros_like(var), where=var > 0)
            weights = np.array([lr._weights.get(n, 0.0) for n in names], dtype=float)
            self._cache = (self.examples, names, means, inv_std, weights, float(lr.intercept))
        return self._cache[1:]

    def predict_many(self, xs: Sequence[Mapping[str, float]]) -> list[float | None]:
        """Probability of the positive label for each input, ``None`` if not ready."""
        if not self.ready:
            return [None] * len(xs)
        if not xs:
            return []
        return self._predict_matrix(input_matrix(self._params()[0], xs))

    def _predict_matrix(self, mat: Any) -> list[float | None]:
        """:meth:`predict_many` of inputs already in a matrix, a column per input name in
        the order of :meth:`_params` (NaN where absent)."""
        _, means, inv_std, weights, intercept = self._params()
        # An absent input contributes nothing, as in River's sparse dot product.
        z = np.nan_to_num((mat - means) * inv_std, nan=0.0) @ weights + intercept
        z = np.clip(z, -30.0, 30.0)  # River's sigmoid saturates at |z| > 30 as well
        p = 1.0 / (1.0 + np.exp(-z))
        p[z <= -30.0] = 0.0
        p[z >= 30.0] = 1.0
        return [float(v) for v in p]

    def input_names(self) -> list[str] | None:
        """The names of the inputs the model reads, in its column order (None: not ready)."""
        return self._params()[0] if self.ready else None

    def predict_one(self, x: Mapping[str, float]) -> float | None:
        """:meth:`predict_many` of one input."""
        return self.predict_many([x])[0]

    # reporting and persistence ----------------------------------------------

    def quality(self) -> dict[str, Any]:
        """Prequential quality: rolling AUC and log loss over scored examples, drift alarms."""
        scored = self.scored > 0
        labels = getattr(self, "window_labels", None)
        # With one class only in the window the AUC is undefined (River reports 0).
        both = labels is not None and 0 < sum(labels) < len(labels)
        auc = float(self.auc.get()) if scored and both else None
        return {
            "model": self.name,
            "version": self.version,
            "examples": self.examples,
            "positives": self.positives,
            "scored": self.scored,
            "duplicates": self.duplicates,
            "ready": self.ready,
            "auc": auc,
            "log_loss": float(self.log_loss.get()) if scored else None,
            "drift_alarms": self.drift_alarms,
            "last_drift_at": self.last_drift_at,
        }

    def weights(self) -> dict[str, float]:
        """The logistic weights on standardised inputs (for inspection)."""
        return dict(self.pipeline.steps["LogisticRegression"].weights)

    def _settle_auc(self) -> None:
        """River's rolling AUC keeps every update in Python lists until it is read (it
        moves them into its window in one call): unread, as in the learner process, the
        lists held every example ever scored, and so did every snapshot (1.7 MB after
        155,000 examples, against 5 KB). Reading it moves them into the bounded window."""
        self.auc.get()

    def snapshot(self, serving: bool = False) -> bytes:
        """The whole model (with ``position`` and the recent ids) as bytes.

        ``serving``: without the recent example ids, which only learning uses. Workers
        load every new serving version while they process input; the ids (up to
        ``dedupe`` of them) were nearly all of a snapshot's bytes and of its loading
        time (about 3.3 MB and 30 ms against 70 KB and 1 ms, at 100,000 ids).
        """
        self._settle_auc()
        skip = ("_cache", "_seen", "_order") if serving else ("_cache",)
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        return pickle.dumps({"format": SNAPSHOT_FORMAT, "state": state},
                            protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, data: bytes) -> OnlineModel:
        """A model from :meth:`snapshot` bytes; only load snapshots the engine wrote itself.

        A serving snapshot comes back remembering no example ids: learning on from it
        drops no redelivery of what it learned before.
        """
        doc = pickle.loads(data)  # our own registry's bytes only
        if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("not an online model snapshot of a known format")
        model = cls.__new__(cls)
        model.__dict__.update(doc["state"])
        model.__dict__.setdefault("_seen", set())
        model.__dict__.setdefault("_order", deque())
        model._cache = None
        model._settle_auc()  # a snapshot written before the lists were bounded
        return model


def input_matrix(names: Sequence[str], xs: Sequence[Mapping[str, float]]) -> Any:
    """The inputs ``xs`` as a float matrix, a row per input and a column per name (NaN
    where an input lacks the name)."""
    get = itemgetter(*names) if len(names) > 1 else None
    try:  # fast path: every input present (always so for model_inputs)
        rows = [get(x) for x in xs] if get else [[x[names[0]]] for x in xs]
    except KeyError:
        rows = [[x.get(n, math.nan) for n in names] for x in xs]
    return np.array(rows, dtype=float).reshape(len(xs), len(names))


def predict_models(models: Mapping[str, Any], xs: Sequence[Mapping[str, float]]
                   ) -> dict[str, Any]:
    """``predict_many`` of every model on the same inputs. For the :class:`OnlineModel`
    among them, the matrix is built once for all that read the same names (each takes its
    columns in its own order: the same numbers as its own ``predict_many``); any other
    model predicts on its own.

    >>> a, b = OnlineModel("a", min_per_class=1), OnlineModel("b", min_per_class=1)
    >>> for i in range(4):  # b first sees v, then u: its columns are in the other order
    ...     a.learn(Example(f"e{i}", "a", "h", i, i, {"u": float(i), "v": 1.0}, i % 2))
    ...     b.learn(Example(f"e{i}", "b", "h", i, i, {"v": 2.0 - i, "u": 1.0}, i % 2))
    >>> a.input_names(), b.input_names()
    (['u', 'v'], ['v', 'u'])
    >>> xs = [{"u": 0.5, "v": 3.0}, {"u": 2.0, "v": -1.0}]
    >>> got = predict_models({"a": a, "b": b}, xs)
    >>> got == {"a": a.predict_many(xs), "b": b.predict_many(xs)} and got["a"] != got["b"]
    True
    """
    out: dict[str, list[float | None]] = {}
    # keyed by the set of names (a model's names are its scaler's keys: never repeated)
    shared: dict[frozenset[str], tuple[dict[str, int], Any]] = {}
    for name, model in models.items():
        names = model.input_names() if xs and isinstance(model, OnlineModel) else None
        if names is None:
            out[name] = model.predict_many(xs)
            continue
        key = frozenset(names)
        if key not in shared:
            shared[key] = ({n: i for i, n in enumerate(names)}, input_matrix(names, xs))
        pos, mat = shared[key]
        order = [pos[n] for n in names]
        same = order == list(range(len(order)))
        out[name] = model._predict_matrix(mat if same else mat[:, order])
    return out


__all__ = ["SNAPSHOT_FORMAT", "OnlineModel", "input_matrix", "predict_models"]
