"""The population sketch kept per partition and re-read a partition at a time.

``SketchParts`` must always give the population that merging every partition's current
histogram from scratch gives (``Population.from_hashes``), whatever order partitions are
replaced in; and the fast field parser must read every histogram as the plain one does.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from scorers import rfm

AXES = ("r", "f", "m")


def reference_add(axes: dict[str, dict[int, int]], hist: dict[Any, Any]) -> None:
    """The plain parse: decode, split at the first ``:``, add where the axis is known."""
    for k, v in hist.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        axis, _, raw = key.partition(":")
        if axis in axes:
            axes[axis][int(raw)] = axes[axis].get(int(raw), 0) + int(v)


def as_stored(hist: dict[str, int], as_bytes: bool) -> dict[Any, Any]:
    """As Redis returns a hash (bytes) or as it is built in memory (str keys, int counts)."""
    if as_bytes:
        return {k.encode(): str(v).encode() for k, v in hist.items()}
    return dict(hist)


fields = st.tuples(st.sampled_from(AXES), st.integers(-3_000, 30_000)).map(
    lambda t: f"{t[0]}:{t[1]}")
histograms = st.dictionaries(fields, st.integers(1, 50), max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), histograms, st.booleans()), max_size=25))
def test_replacing_partitions_in_any_order_equals_merging_them_from_scratch(
        steps: list[tuple[int, dict[str, int], bool]]) -> None:
    parts = rfm.SketchParts()
    current: dict[int, dict[Any, Any]] = {}
    for partition, hist, as_bytes in steps:
        stored = as_stored(hist, as_bytes)
        parts.replace(partition, stored)
        current[partition] = stored
        assert parts.population() == rfm.Population.from_hashes(current.values())
    assert len(parts) == len(current)


odd_keys = st.one_of(
    fields,
    st.text(st.characters(max_codepoint=127), max_size=6).map(lambda s: f"{s}:1"),
    st.sampled_from(["x:5", "rr:3", "r:+7", "m: 12", "f:0", "q", "r:0012"]),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(odd_keys, st.integers(-5, 50), max_size=30), st.booleans())
def test_the_fast_field_parser_reads_every_histogram_as_the_plain_one(
        hist: dict[str, int], as_bytes: bool) -> None:
    stored = as_stored(hist, as_bytes)
    want: dict[str, dict[int, int]] = {a: {} for a in AXES}
    got: dict[str, dict[int, int]] = {a: {} for a in AXES}
    try:
        reference_add(want, stored)
    except ValueError:
        want = None  # type: ignore[assignment]
    try:
        rfm._add(got, stored)
    except ValueError:
        got = None  # type: ignore[assignment]
    assert got == want
