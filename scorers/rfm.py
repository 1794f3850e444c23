"""RFM scores from a mergeable population sketch.

DESIGN §5: ``score = min(5, 1 + floor(5 * p))`` where ``p`` is the fraction of
purchasing customers with a strictly worse value. Each customer contributes one
field to each of three histograms:

- ``r:<day>``: the UTC day of the last purchase. Engine time is global, so a
  larger recency is exactly an earlier last-purchase day; the field never goes
  stale while time passes.
- ``f:<n>``: the number of distinct purchase days.
- ``m:<bucket>``: ``monetary_total`` in a logarithmic bucket of relative width
  :data:`ALPHA` (the DDSketch mapping, mirrored for refunds that leave a total
  below zero).

A histogram is a plain mapping ``field -> count``, so sketches of different
partitions (and of different workers) merge by adding counts, and a customer's
old contribution is removed by decrementing its old fields when the value
changes. Recency and frequency are exact. For monetary values the only error is
inside a bucket: customers whose totals differ by less than a factor
``(1 + ALPHA) / (1 - ALPHA)`` (about 0.4 %) count as ties, so ``p`` is low by at
most the share of customers in the customer's own bucket: a score is below the
exact rule only when that share straddles a multiple of 1/5, by one for a share
under 1/5 and by up to four when most customers' totals fall in one bucket.

>>> pop = Population.from_hashes([{"r:10": 1, "f:1": 1, "m:1": 1},
...                               {"r:12": 1, "f:3": 1, "m:9": 1}])
>>> pop.score({"purchase_days": 3, "monetary_total": 80.0, "recency_days": 0}, 12)["rfm"]
'335'
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Relative accuracy of the monetary buckets.
ALPHA = 0.002
_GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = math.log(_GAMMA)
#: Totals closer to zero than this (currency units) share the zero bucket.
_ZERO = 0.005


def money_bucket(value: float) -> int:
    """The monetary bucket of ``value``; order preserving (larger value, larger bucket).

    >>> money_bucket(0.0), money_bucket(100.0) > money_bucket(99.0), money_bucket(-5.0) < 0
    (0, True, True)
    """
    if abs(value) < _ZERO:
        return 0
    b = 1 + max(0, math.ceil(math.log(abs(value) / _ZERO) / _LOG_GAMMA))
    return b if value > 0 else -b


def contribution(features: Mapping[str, Any], today: int) -> tuple[str, str, str] | None:
    """The three sketch fields a customer adds at engine day ``today``, None if no purchase."""
    days = features.get("purchase_days") or 0
    rec = features.get("recency_days")
    if rec is None or days <= 0:
        return None
    return (f"r:{today - int(rec)}", f"f:{int(days)}",
            f"m:{money_bucket(float(features.get('monetary_total') or 0.0))}")


def deltas(old: tuple[str, str, str] | None,
           new: tuple[str, str, str] | None) -> dict[str, int]:
    """Histogram increments that replace a customer's ``old`` contribution by ``new``."""
    out: dict[str, int] = {}
    if old == new:
        return out
    for f in old or ():
        out[f] = out.get(f, 0) - 1
    for f in new or ():
        out[f] = out.get(f, 0) + 1
    return {k: v for k, v in out.items() if v}


#: The axis of a field from its first two characters, as Redis returns them (bytes) or as
#: they are built in memory (str).
_AXIS_OF = {b"r:": "r", b"f:": "f", b"m:": "m", "r:": "r", "f:": "f", "m:": "m"}


def _add(axes: dict[str, dict[int, int]], hist: Mapping[Any, Any]) -> None:
    """Add the fields of one histogram (``axis:value -> count``) into ``axes``.

    A worker re-reads every partition's histogram each second (tens of thousands of
    fields for 100,000 customers), so the usual fields are parsed without decoding
    them to text first: ``int`` reads the ASCII digits of bytes as it reads those of a str
    (the engine writes no other).
    """
    axis_of = _AXIS_OF.get
    for k, v in hist.items():
        try:
            name = axis_of(k[:2])
        except TypeError:  # not a str or bytes key
            name = None
        if name is None:
            _add_field(axes, k, v)
            continue
        bucket = axes.get(name)
        if bucket is not None:
            raw = int(k[2:])
            bucket[raw] = bucket.get(raw, 0) + int(v)


def _add_field(axes: dict[str, dict[int, int]], k: Any, v: Any) -> None:
    """:func:`_add` of one field of any other shape (its axis is what precedes ``:``)."""
    key = k.decode() if isinstance(k, bytes) else str(k)
    axis, _, raw = key.partition(":")
    if axis in axes:
        bucket = axes[axis]
        bucket[int(raw)] = bucket.get(int(raw), 0) + int(v)


def _base(axis: _Axis | _Changed) -> _Axis:
    return axis.base if isinstance(axis, _Changed) else axis


def rank_score(worse: int, total: int) -> int:
    """``min(5, 1 + floor(5 * worse / total))`` in exact integer arithmetic.

    >>> [rank_score(w, 10) for w in (0, 1, 2, 5, 9)]
    [1, 1, 2, 3, 5]
    """
    if total <= 0:
        return 1
    return min(5, 1 + (5 * worse) // total)


@dataclass(frozen=True)
class _Axis:
    """One histogram as sorted values and the count of customers strictly below each."""

    keys: tuple[int, ...]
    below: tuple[int, ...]
    total: int

    @classmethod
    def build(cls, counts: Mapping[int, int]) -> _Axis:
        keys = sorted(k for k, c in counts.items() if c > 0)
        below, acc = [], 0
        for k in keys:
            below.append(acc)
            acc += counts[k]
        return cls(tuple(keys), tuple(below), acc)

    def strictly_below(self, value: int) -> int:
        i = bisect.bisect_left(self.keys, value)
        return self.below[i] if i < len(self.keys) else self.total

    def thresholds(self) -> tuple[int | None, ...]:
        """For k = 2..5, the largest value still scoring below k (None: no value does).

        A value ``v`` scores ``1 + #{k : v > t_k}``, so two populations with the same
        thresholds give every customer the same score.

        >>> _Axis.build({1: 5, 2: 5}).thresholds()
        (1, 1, 2, 2)
        """
        out: list[int | None] = []
        for k in range(2, 6):
            need = -(-(k - 1) * self.total // 5)  # customers strictly below for score >= k
            # the smallest key index whose "strictly below" count reaches ``need``
            i = bisect.bisect_left(self.below, need)
            out.append(self.keys[i - 1] if 0 < i <= len(self.keys) else None)
        return tuple(out)


@dataclass(frozen=True)
class _Changed:
    """An axis with changes its histogram does not hold yet (an evaluated group's own).

    Built from the changes alone, so scoring a group against it costs a few bisections
    per customer whatever the population's size.
    """

    base: _Axis
    #: the changed values, sorted, and the sum of the changes at smaller values
    keys: tuple[int, ...]
    below: tuple[int, ...]
    total: int

    @classmethod
    def build(cls, base: _Axis, changes: Mapping[int, int]) -> _Changed:
        keys = sorted(k for k, d in changes.items() if d)
        below, acc = [], 0
        for k in keys:
            below.append(acc)
            acc += changes[k]
        return cls(base, tuple(keys), tuple(below), base.total + acc)

    def changes(self) -> dict[int, int]:
        if not self.keys:
            return {}
        ends = (*self.below[1:], self.total - self.base.total)
        return {k: hi - lo for k, lo, hi in zip(self.keys, self.below, ends, strict=True)}

    def strictly_below(self, value: int) -> int:
        i = bisect.bisect_left(self.keys, value)
        d = self.below[i] if i < len(self.keys) else self.total - self.base.total
        # a sketch read before a customer's previous contribution was committed can be
        # short of the contribution the changes take away: never below nobody
        return max(0, self.base.strictly_below(value) + d)


@dataclass(frozen=True)
class Population:
    """The merged sketch of every purchasing customer, ready to score against."""

    total: int
    r: _Axis | _Changed
    f: _Axis | _Changed
    m: _Axis | _Changed
    digest: str = ""

    @classmethod
    def from_hashes(cls, hashes: Iterable[Mapping[Any, Any]]
                    ) -> Population:
        """Merge per-partition histograms (as read from Redis or built in memory)."""
        axes: dict[str, dict[int, int]] = {"r": {}, "f": {}, "m": {}}
        for hist in hashes:
            _add(axes, hist)
        return cls._from_axes(axes)

    def updated(self, changes: Mapping[str, int]) -> Population:
        """This population with histogram increments (as from :func:`deltas`) added.

        Scoring a group against ``population.updated(their deltas)`` counts every
        customer of the group with the values being scored, themselves included, as the
        rule's "fraction of purchasing customers" does; the stored sketch reaches the same
        counts once the group is committed. The result scores only: it has no digest.

        >>> f = {"purchase_days": 2, "monetary_total": 1.0, "recency_days": 0}
        >>> Population.empty().score(f, 10)["rfm"] is None
        True
        >>> pop = Population.empty().updated(deltas(None, contribution(f, 10)))
        >>> pop.total, pop.score(f, 10)["rfm"]
        (1, '111')
        """
        if not changes:
            return self
        axes: dict[str, dict[int, int]] = {}
        for name in ("r", "f", "m"):
            axis = getattr(self, name)
            axes[name] = axis.changes() if isinstance(axis, _Changed) else {}
        _add(axes, changes)
        r, f, m = (_Changed.build(_base(getattr(self, n)), axes[n]) for n in ("r", "f", "m"))
        return Population(max(0, f.total), r, f, m)

    @classmethod
    def _from_axes(cls, axes: dict[str, dict[int, int]]) -> Population:
        built = {name: _Axis.build(counts) for name, counts in axes.items()}
        total = built["f"].total
        # Scores depend on the population only through the quintile thresholds, so the
        # digest (which decides whether sweeps must re-score everyone) covers just those.
        h = hashlib.blake2b(digest_size=8)
        h.update(repr([built[n].thresholds() for n in ("r", "f", "m")]).encode())
        digest = h.hexdigest()
        return cls(total, built["r"], built["f"], built["m"], digest)

    @classmethod
    def empty(cls) -> Population:
        return cls.from_hashes([])

    def rank_of(self, contrib: tuple[str, str, str] | None) -> str | None:
        """The ``rfm`` score of a customer whose sketch fields are ``contrib`` (as from
        :func:`contribution`): the same as :meth:`score` of the features they came from.

        >>> pop = Population.from_hashes([{"r:10": 1, "f:1": 1, "m:1": 1},
        ...                               {"r:12": 1, "f:3": 1, "m:9": 1}])
        >>> f = {"purchase_days": 3, "monetary_total": 80.0, "recency_days": 0}
        >>> pop.rank_of(contribution(f, 12)) == pop.score(f, 12)["rfm"], pop.rank_of(None)
        (True, None)
        """
        if contrib is None or self.total <= 0:
            return None
        r, f, m = (int(fld.partition(":")[2]) for fld in contrib)
        return (f"{rank_score(self.r.strictly_below(r), self.total)}"
                f"{rank_score(self.f.strictly_below(f), self.total)}"
                f"{rank_score(self.m.strictly_below(m), self.total)}")

    def score(self, features: Mapping[str, Any], today: int) -> dict[str, Any]:
        """``rfm_r``, ``rfm_f``, ``rfm_m`` and ``rfm`` of one customer (None if no purchase)."""
        days = features.get("purchase_days") or 0
        rec = features.get("recency_days")
        if rec is None or days <= 0 or self.total <= 0:
            return {"rfm_r": None, "rfm_f": None, "rfm_m": None, "rfm": None}
        r = rank_score(self.r.strictly_below(today - int(rec)), self.total)
        f = rank_score(self.f.strictly_below(int(days)), self.total)
        m = rank_score(self.m.strictly_below(
            money_bucket(float(features.get("monetary_total") or 0.0))), self.total)
        return {"rfm_r": r, "rfm_f": f, "rfm_m": m, "rfm": f"{r}{f}{m}"}


class SketchParts:
    """The population sketch as the sum of per-partition histograms, any of which can be
    replaced on its own (re-read from the store) without re-reading or re-adding the
    others. :meth:`population` equals ``Population.from_hashes`` of the current ones.

    >>> parts = SketchParts()
    >>> parts.replace(0, {"r:10": 1, "f:1": 1, "m:1": 1})
    >>> parts.replace(1, {b"r:12": b"1", b"f:3": b"1", b"m:9": b"1"})
    >>> parts.replace(0, {"r:11": 1, "f:2": 1, "m:5": 1})
    >>> parts.population() == Population.from_hashes([{"r:11": 1, "f:2": 1, "m:5": 1},
    ...                                               {"r:12": 1, "f:3": 1, "m:9": 1}])
    True
    """

    def __init__(self) -> None:
        self._parts: dict[int, dict[str, dict[int, int]]] = {}
        self._axes: dict[str, dict[int, int]] = {"r": {}, "f": {}, "m": {}}

    def __len__(self) -> int:
        return len(self._parts)

    def replace(self, partition: int, hist: Mapping[Any, Any]) -> None:
        """Partition ``partition``'s histogram is now ``hist``."""
        new: dict[str, dict[int, int]] = {"r": {}, "f": {}, "m": {}}
        _add(new, hist)
        old = self._parts.get(partition)
        for name, merged in self._axes.items():
            if old is not None:
                _merge(merged, old[name], -1)
            _merge(merged, new[name], 1)
        self._parts[partition] = new

    def population(self) -> Population:
        return Population._from_axes(self._axes)


def _merge(merged: dict[int, int], counts: Mapping[int, int], sign: int) -> None:
    """Add (``sign`` 1) or take away (-1) ``counts`` in ``merged``, dropping zero sums."""
    for k, c in counts.items():
        left = merged.get(k, 0) + sign * c
        if left:
            merged[k] = left
        else:
            merged.pop(k, None)
