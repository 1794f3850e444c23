"""``observe_many`` puts every value in the bucket ``Histogram.observe`` puts it in."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from stream.metrics import LATENCY_BUCKETS, EngineMetrics, observe_many


def _state(h: Histogram) -> tuple[dict[str, float], float]:
    buckets, total = {}, math.nan
    for metric in h.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                buckets[s.labels["le"]] = s.value
            elif s.name.endswith("_sum"):
                total = s.value
    return buckets, total


values = st.lists(st.one_of(
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.sampled_from([0.0, *LATENCY_BUCKETS[:-1]]),  # exactly on a bound: that bucket
    st.floats(min_value=-5, max_value=0, exclude_max=True)), max_size=300)


@settings(max_examples=200, deadline=None)
@given(values)
def test_observe_many_equals_one_observe_per_value(vs: list[float]) -> None:
    one, many = (Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
                 for _ in range(2))
    for v in vs:
        one.observe(v)
    observe_many(many, vs)
    (b1, s1), (b2, s2) = _state(one), _state(many)
    assert b1 == b2
    assert s2 == pytest.approx(s1, rel=1e-9, abs=1e-9)


def test_nan_values_are_observed_one_by_one_as_observe_does() -> None:
    one, many = (Histogram("h", "h", registry=CollectorRegistry()) for _ in range(2))
    for v in (0.1, math.nan, 3.0):
        one.observe(v)
    observe_many(many, [0.1, math.nan, 3.0])
    assert _state(one)[0] == _state(many)[0]


def test_the_engine_counts_each_latency_once_and_leaves_negative_ones_out() -> None:
    m = EngineMetrics()
    m.observe_latencies([0.02, -1.0, 0.4, math.nan, 7.0])
    counts = {s.name: s.value for metric in m._m["migration_latency_seconds"].collect()
              for s in metric.samples if s.name.endswith(("_count", "_sum"))}
    assert counts == {"segstream_migration_latency_seconds_count": 3,
                      "segstream_migration_latency_seconds_sum": pytest.approx(7.42)}
