"""Behavioural personas: online k-means on standardised engagement and value features.

A :class:`PersonaModel` keeps ``k`` centroids of a handful of engagement and value
features (:data:`PERSONA_FEATURES`, transformed with ``log1p`` or taken as shares of
events so that busy and quiet customers with the same habits look alike). It starts
with k-means++ and Lloyd iterations on the first ``init_size`` customers, then follows
the stream with mini-batch updates (per-centroid learning rate ``1 / count``, floored
so it keeps adapting).

Customers are labelled from the *published* centroids only. :meth:`PersonaModel.publish`
matches the current centroids to the previously published ones (Hungarian assignment
on standardised distances) and keeps their labels, so re-learning does not rename a
customer's cluster; ``version`` counts publications.

>>> import random
>>> rnd = random.Random(0)
>>> buyers = [{"purchases_90d": rnd.randint(8, 12), "monetary_total": 900.0}
...           for _ in range(60)]
>>> idlers = [{"days_since_last_event": rnd.randint(50, 60)} for _ in range(60)]
>>> m = PersonaModel(k=2, init_size=100)
>>> m.learn_many(buyers + idlers)
>>> m.version, len(set(m.predict_many(buyers))), len(set(m.predict_many(idlers)))
(1, 1, 1)
>>> m.predict_one(buyers[0]) != m.predict_one(idlers[0])
True
>>> m.learn_many(idlers + buyers); _ = m.publish()
>>> m.predict_many(buyers[:1]) == PersonaModel.restore(m.snapshot()).predict_many(buyers[:1])
True
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

#: Tag of the snapshot format; :meth:`PersonaModel.restore` refuses any other.
SNAPSHOT_FORMAT = "segstream.personas/1"

Features = Mapping[str, Any]
Array = NDArray[np.float64]


def _n(f: Features, name: str) -> float:
    v = f.get(name)
    return 0.0 if v is None else max(0.0, float(v))


def _share(f: Features, name: str) -> float:
    events = _n(f, "events_30d")
    return _n(f, name) / events if events > 0 else 0.0


def _basket(f: Features) -> float:
    n = _n(f, "purchases_total")
    return math.log1p(_n(f, "monetary_total") / n) if n > 0 else 0.0


def _inactive(f: Features) -> float:
    known = [float(f[k]) for k in ("days_since_last_event", "recency_days")
             if f.get(k) is not None]
    return math.log1p(max(0.0, min(known))) if known else 0.0


def _clicks_per_session(f: Features) -> float:
    sessions = _n(f, "sessions_30d")
    return math.log1p(_n(f, "events_30d") / sessions) if sessions > 0 else 0.0


#: ``(name, transform, unit, high phrase, low phrase)`` of each clustering feature.
PERSONA_FEATURES: tuple[tuple[str, Callable[[Features], float], str, str, str], ...] = (
    ("sessions_30d", lambda f: math.log1p(_n(f, "sessions_30d")), "log1p",
     "frequent sessions", "few sessions"),
    ("clicks_per_session", _clicks_per_session, "log1p", "long sessions", "short sessions"),
    ("login_share", lambda f: _share(f, "logins_30d"), "share",
     "logs in", "rarely logs in"),
    ("feature_use_share", lambda f: _share(f, "feature_uses_30d"), "share",
     "heavy feature use", "little feature use"),
    ("support_ticket_share", lambda f: _share(f, "support_tickets_30d"), "share",
     "many support tickets", "few support tickets"),
    ("purchases_90d", lambda f: math.log1p(_n(f, "purchases_90d")), "log1p",
     "frequent purchases", "rare purchases"),
    ("mean_basket", _basket, "log1p", "high spend", "low spend"),
    ("days_inactive", _inactive, "log1p", "inactive lately", "recently active"),
)
#: Names of the clustering features, in order.
PERSONA_FEATURE_NAMES: tuple[str, ...] = tuple(p[0] for p in PERSONA_FEATURES)


_TRANSFORMS: tuple[Callable[[Features], float], ...] = tuple(p[1] for p in PERSONA_FEATURES)


def persona_vector(features: Features) -> list[float]:
    """The transformed clustering features of one customer."""
    return [fn(features) for fn in _TRANSFORMS]


def _kmeans_pp(z: Array, k: int, rng: np.random.Generator) -> Array:
    centers = [z[rng.integers(len(z))]]
    d2 = ((z - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(len(z), p=d2 / total)) if total > 0 else int(rng.integers(len(z)))
        centers.append(z[i])
        d2 = np.minimum(d2, ((z - z[i]) ** 2).sum(axis=1))
    return np.array(centers)


def _sqdist(z: Array, c: Array) -> Array:
    return ((z[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)  # type: ignore[no-any-return]


def _lloyd(z: Array, c: Array, iters: int = 50) -> tuple[Array, float]:
    for _ in range(iters):
        assign = _sqdist(z, c).argmin(axis=1)
        new = np.array([z[assign == j].mean(axis=0) if (assign == j).any() else c[j]
                        for j in range(len(c))])
        if np.allclose(new, c):
            break
        c = new
    inertia = float(_sqdist(z, c).min(axis=1).sum())
    return c, inertia


class PersonaModel:
    """Online k-means personas with labels that survive re-learning.

    Parameters
    ----------
    k
        Number of personas.
    init_size
        Customers buffered before the first k-means fit (and first publication).
    restarts
        k-means++ restarts of the first fit; the lowest inertia wins.
    max_count
        Floor of the mini-batch learning rate is ``1 / max_count``.
    seed
        Random seed of the first fit.
    """

    def __init__(self, k: int = 6, *, init_size: int = 1000, restarts: int = 8,
                 max_count: int = 20_000, seed: int = 0) -> None:
        if k < 1 or init_size < k:
            raise ValueError("need k >= 1 and init_size >= k")
        self.k = k
        self.init_size = init_size
        self.restarts = restarts
        self.max_count = max_count
        self.seed = seed
        d = len(PERSONA_FEATURES)
        self.seen = 0
        self._mean = np.zeros(d)
        self._m2 = np.zeros(d)
        self._buffer: list[list[float]] = []
        self.centroids: Array | None = None  # in transformed units
        self.counts = np.zeros(k)
        self.version = 0
        self.labels: list[str] = []
        self._pub_centroids: Array | None = None
        self._pub_mean = np.zeros(d)
        self._pub_std = np.ones(d)
        self._pub_sizes = np.zeros(k)

    # learning ---------------------------------------------------------------

    def _std(self) -> Array:
        var = self._m2 / max(self.seen, 1)
        return np.where(var > 1e-12, np.sqrt(var), 1.0)

    def _update_scaler(self, v: Array) -> None:
        # Chan et al. parallel merge of the running mean and sum of squares.
        n_b = len(v)
        mean_b = v.mean(axis=0)
        m2_b = ((v - mean_b) ** 2).sum(axis=0)
        n = self.seen + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * n_b / n
        self._m2 = self._m2 + m2_b + delta**2 * self.seen * n_b / n
        self.seen = n

    def learn_many(self, features_list: Sequence[Features]) -> None:
        """Learn from a batch of customers' derived features."""
        if not features_list:
            return
        v = np.array([persona_vector(f) for f in features_list], dtype=float)
        self._update_scaler(v)
        if self.centroids is None:
            self._buffer.extend(v.tolist())
            if len(self._buffer) >= self.init_size:
                self._first_fit()
            return
        std = self._std()
        assign = _sqdist(v / std, self.centroids / std).argmin(axis=1)
        for j in np.unique(assign):
            pts = v[assign == j]
            self.counts[j] += len(pts)
            eta = len(pts) / min(self.counts[j], self.max_count)
            self.centroids[j] += min(1.0, eta) * (pts.mean(axis=0) - self.centroids[j])

    def learn_one(self, features: Features) -> None:
        """Learn from one customer."""
        self.learn_many([features])

    def _first_fit(self) -> None:
        v = np.array(self._buffer)
        std = self._std()
        z = v / std
        rng = np.random.default_rng(self.seed)
        best: tuple[Array, float] | None = None
        for _ in range(self.restarts):
            c, inertia = _lloyd(z, _kmeans_pp(z, self.k, rng))
            if best is None or inertia < best[1]:
                best = (c, inertia)
        assert best is not None
        self.centroids = best[0] * std
        assign = _sqdist(z, best[0]).argmin(axis=1)
        self.counts = np.bincount(assign, minlength=self.k).astype(float)
        self._buffer = []
        self.publish()

    # publication ------------------------------------------------------------

    def publish(self) -> int:
        """Make the current centroids the ones customers are labelled with; the new version.

        Labels follow their previously published centroids (minimum total standardised
        distance); the first publication names personas by size, ``P1`` the largest.
        """
        if self.centroids is None:
            return self.version
        std = self._std()
        if self._pub_centroids is None:
            order = np.argsort(-self.counts, kind="stable")
            labels = [""] * self.k
            for rank, j in enumerate(order):
                labels[int(j)] = f"P{rank + 1}"
        else:
            cost = _sqdist(self.centroids / std, self._pub_centroids / std)
            rows, cols = linear_sum_assignment(cost)
            labels = [""] * self.k
            for i, j in zip(rows, cols, strict=True):
                labels[int(i)] = self.labels[int(j)]
        self.labels = labels
        self._pub_centroids = self.centroids.copy()
        self._pub_mean = self._mean.copy()
        self._pub_std = std
        self._pub_sizes = self.counts.copy()
        self.version += 1
        return self.version

    def predict_many(self, features_list: Sequence[Features]) -> list[str | None]:
        """Persona label of each customer (``None`` before the first publication)."""
        if self._pub_centroids is None:
            return [None] * len(features_list)
        if not features_list:
            return []
        v = np.array([persona_vector(f) for f in features_list], dtype=float)
        std = self._pub_std
        assign = _sqdist(v / std, self._pub_centroids / std).argmin(axis=1)
        return [self.labels[int(j)] for j in assign]

    def predict_one(self, features: Features) -> str | None:
        """:meth:`predict_many` of one customer."""
        return self.predict_many([features])[0]

    def describe(self) -> list[dict[str, Any]]:
        """Published personas: label, size share, centroid in feature units, description."""
        if self._pub_centroids is None:
            return []
        total = float(self._pub_sizes.sum()) or 1.0
        out = []
        for j in sorted(range(self.k), key=lambda j: int(self.labels[j][1:])):
            c = self._pub_centroids[j]
            z = (c - self._pub_mean) / self._pub_std
            centroid = {}
            for (name, _, unit, _hi, _lo), value in zip(PERSONA_FEATURES, c, strict=True):
                raw = math.expm1(value) if unit == "log1p" else value
                centroid[name] = round(float(raw), 3)
            strongest = [i for i in np.argsort(-np.abs(z), kind="stable") if abs(z[i]) >= 0.5][:3]
            words = [PERSONA_FEATURES[i][3] if z[i] > 0 else PERSONA_FEATURES[i][4]
                     for i in strongest]
            out.append({
                "label": self.labels[j],
                "size": round(float(self._pub_sizes[j]) / total, 4),
                "centroid": centroid,
                "description": ", ".join(words) or "typical customer",
            })
        return out

    # persistence ------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole model as bytes."""
        return pickle.dumps({"format": SNAPSHOT_FORMAT, "state": dict(self.__dict__)},
                            protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, data: bytes) -> PersonaModel:
        """A model from :meth:`snapshot` bytes; only load snapshots the engine wrote itself."""
        doc = pickle.loads(data)  # our own registry's bytes only
        if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("not a persona model snapshot of a known format")
        model = cls.__new__(cls)
        model.__dict__.update(doc["state"])
        return model


__all__ = [
    "PERSONA_FEATURES",
    "PERSONA_FEATURE_NAMES",
    "SNAPSHOT_FORMAT",
    "PersonaModel",
    "persona_vector",
]
