"""Online propensity models trained on delayed labels (churn, purchase in 7 days).

An :class:`OnlineModel` is a River pipeline (running standard scaler, then logistic
regression with RMSProp) with the bookkeeping a streaming engine needs around it:

* :meth:`OnlineModel.learn` is prequential: every example is first scored, the score
  feeds a rolling ROC AUC, a rolling log loss and an ADWIN drift detector on the
  absolute error (an alarm is a significant rise of the error), and only then does the
  model learn from it. Examples whose id was seen recently are ignored, so an
  at-least-once examples topic is harmless. The learning itself is River's arithmetic
  run on flat lists (``_Learning``), written back into the pipeline whenever it is
  read, at about two fifths of River's own cost per example.
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
        #: the learning state as flat lists while learning (see :class:`_Learning`)
        self._fast: _Learning | None = None
        self.pipeline = compose.Pipeline(
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
    def pipeline(self) -> Any:
        """The River pipeline, up to date with everything learned."""
        self._store()
        return self.__dict__["pipeline"]

    @pipeline.setter
    def pipeline(self, value: Any) -> None:
        self.__dict__["pipeline"] = value
        self.__dict__["_fast"] = None

    def _learning(self) -> _Learning | None:
        """The flat learning state, taken from the pipeline when it has none yet."""
        fast = self._fast
        if fast is None:
            fast = self._fast = _Learning.take(self.__dict__["pipeline"])
        return fast

    def _store(self) -> None:
        """Write what the flat lists learned into the River pipeline."""
        fast = self.__dict__.get("_fast")
        if fast is not None:
            fast.store()

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
        fast = self._learning()
        row = fast.row(example.x) if fast is not None else None
        if fast is not None and row is None:
            self._store()  # inputs of other names: River's own path from here
            self._fast = fast = None
        if self.ready:
            if fast is not None and row is not None:
                p = fast.predict(row)
            else:
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
        if fast is not None and row is not None:
            fast.learn(row, y)
        else:
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
        self._store()
        skip = ("_cache", "_fast", "_seen", "_order") if serving else ("_cache", "_fast")
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
        model._fast = None
        model._settle_auc()  # a snapshot written before the lists were bounded
        return model


class _Learning:
    """A model's scaler and logistic regression as flat lists, learning as River does.

    River's ``learn_one`` through the pipeline is most of the learner's time, nearly
    all of it dispatch and the dictionaries built per step (``python -m
    bench.profile_learner`` times both). This is the same arithmetic, operation for
    operation, on lists in the scaler's key order: the running mean and variance of
    ``preprocessing.StandardScaler.learn_one``, its ``transform_one``, then
    ``linear_model.LogisticRegression.learn_one`` (log loss, clipped gradient, L2 term,
    constant intercept rate) with ``optim.RMSProp``'s step. Sums run in key order, so a
    result can differ from River's in the last bit (``tests/unit/scorers/test_online.py``
    checks they agree to 1e-12 over thousands of examples).

    It is taken from a pipeline of exactly that shape that has learned at least once
    (:meth:`take`), serves examples with exactly the pipeline's input names
    (:meth:`row`), and writes itself back into the River objects whenever they are read
    (:meth:`store`): snapshots stay River pipelines.
    """

    def __init__(self, names: list[str], scaler: Any, lr: Any) -> None:
        self.names = names
        self.scaler = scaler
        self.lr = lr
        opt = lr.optimizer
        self.counts = [scaler.counts[n] for n in names]
        self.means = [scaler.means[n] for n in names]
        self.vars = [scaler.vars[n] for n in names]
        weights = lr._weights
        g2 = opt.g2
        self.weights = [weights[n] for n in names]
        self.g2 = [g2[n] for n in names]
        self.intercept = lr.intercept
        self.rate = opt.lr.learning_rate
        self.rho = opt.rho
        self.eps = opt.eps
        self.l2 = lr.l2
        self.intercept_rate = lr.intercept_lr.learning_rate
        self.clip = lr.clip_gradient
        self.weight_pos = lr.loss.weight_pos
        self.weight_neg = lr.loss.weight_neg
        #: examples learned since the River objects were last written
        self.pending = 0

    @classmethod
    def take(cls, pipeline: Any) -> _Learning | None:
        """The flat state of ``pipeline``, or None when it is not of the shape this knows."""
        steps = list(pipeline.steps.values())
        if len(steps) != 2:
            return None
        scaler, lr = steps
        if (type(scaler) is not preprocessing.StandardScaler or not scaler.with_std
                or scaler.window_size is not None):
            return None
        if type(lr) is not linear_model.LogisticRegression or lr.l1 != 0:
            return None
        opt = lr.optimizer
        if (type(opt) is not optim.RMSProp or type(opt.lr) is not optim.schedulers.Constant
                or type(lr.intercept_lr) is not optim.schedulers.Constant
                or type(lr.loss) is not optim.losses.Log
                or type(lr.initializer) is not optim.initializers.Zeros
                or type(opt.g2) is not utils.VectorDict):
            return None
        names = list(scaler.counts)
        if (not names or set(lr._weights.keys()) != set(names)
                or set(opt.g2.keys()) != set(names) or set(scaler.means) != set(names)
                or set(scaler.vars) != set(names)):
            return None
        return cls(names, scaler, lr)

    def row(self, x: Mapping[str, float]) -> list[float] | None:
        """``x``'s values in key order, or None when its names are not exactly the model's."""
        names = self.names
        if len(x) != len(names):
            return None
        try:
            return [x[n] for n in names]
        except KeyError:
            return None

    def predict(self, row: list[float]) -> float:
        """River's ``predict_proba_one(x)[True]`` (the scaler does not learn from it)."""
        z = 0.0
        for xi, m, v, w in zip(row, self.means, self.vars, self.weights, strict=True):
            z += w * ((xi - m) / v**0.5 if v else 0.0)
        return _sigmoid(z + self.intercept)

    def learn(self, row: list[float], y: bool) -> None:
        """River's ``pipeline.learn_one(x, y)``; nothing changes if the inputs are refused."""
        counts = [c + 1 for c in self.counts]
        means: list[float] = []
        vars_: list[float] = []
        scaled: list[float] = []
        z = 0.0
        for xi, c, m, v, w in zip(row, counts, self.means, self.vars, self.weights,
                                      strict=True):
            m1 = m + (xi - m) / c
            v1 = v + ((xi - m) * (xi - m1) - v) / c
            means.append(m1)
            vars_.append(v1)
            s = (xi - m1) / v1**0.5 if v1 else 0.0
            scaled.append(s)
            z += w * s
        z += self.intercept
        # optim.losses.Log.gradient with y in {-1, 1}
        if y:
            sign = 1
            weight = self.weight_pos
        else:
            sign = -1
            weight = self.weight_neg
        zy = z * sign
        if zy > 18.0:
            grad = weight * math.exp(-zy) * -sign
        elif zy < -18.0:
            grad = weight * -sign
        else:
            grad = weight * -sign / (math.exp(zy) + 1.0)
        grad = float(max(min(grad, self.clip), -self.clip))  # the example weight is 1
        rate = self.rate
        rho = self.rho
        eps = self.eps
        l2 = self.l2
        weights: list[float] = []
        g2: list[float] = []
        for s, w, q in zip(scaled, self.weights, self.g2, strict=True):
            g = s * grad
            if l2:
                g += w * l2
            q = rho * q + (1 - rho) * g**2
            g2.append(q)
            weights.append(w - rate / (q + eps) ** 0.5 * g)
        self.counts = counts
        self.means = means
        self.vars = vars_
        self.weights = weights
        self.g2 = g2
        self.intercept -= self.intercept_rate * grad
        self.pending += 1

    def store(self) -> None:
        """Write what was learned into the River objects."""
        if not self.pending:
            return
        scaler = self.scaler
        lr = self.lr
        weights = lr._weights
        g2 = lr.optimizer.g2
        for n, c, m, v, w, q in zip(self.names, self.counts, self.means, self.vars,
                                    self.weights, self.g2, strict=True):
            scaler.counts[n] = c
            scaler.means[n] = m
            scaler.vars[n] = v
            weights[n] = w
            g2[n] = q
        lr.intercept = self.intercept
        lr.optimizer.n_iterations += self.pending  # one optimiser step per example
        self.pending = 0


def _sigmoid(z: float) -> float:
    """``river.utils.math.sigmoid``, as a float."""
    if z < -30:
        return 0.0
    if z > 30:
        return 1.0
    return 1 / (1 + math.exp(-z))


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
