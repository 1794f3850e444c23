"""``CustomerState.copy`` is a true deep copy: equal to ``copy.deepcopy`` and independent."""

from __future__ import annotations

import copy
import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from features.events import MS_PER_DAY, ClickEvent, TransactionEvent
from features.state import CustomerState, apply_many, empty

T0 = 1_700_000_000_000

_click = st.builds(
    ClickEvent, event_id=st.text("abc123", min_size=1, max_size=4), customer_id=st.just("c"),
    ts_ms=st.integers(T0, T0 + 120 * MS_PER_DAY),
    event_type=st.sampled_from(["page_view", "login", "feature_use", "support_ticket"]),
    session_id=st.one_of(st.none(), st.sampled_from(["s1", "s2", "s3"])))
_txn = st.builds(
    TransactionEvent, event_id=st.text("xyz789", min_size=1, max_size=4), customer_id=st.just("c"),
    ts_ms=st.integers(T0, T0 + 120 * MS_PER_DAY), amount_units=st.integers(0, 10**7),
    kind=st.sampled_from(["purchase", "refund"]))


def _containers(s: CustomerState) -> list[object]:
    out: list[object] = []
    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        if isinstance(v, dict):
            out.append(v)
            out.extend(x for x in v.values() if isinstance(x, list))
    return out


@settings(max_examples=60, deadline=None)
@given(events=st.lists(st.one_of(_click, _txn), max_size=40))
def test_copy_equals_deepcopy_and_shares_nothing_mutable(events: list) -> None:
    s = apply_many(empty(), sorted(events, key=lambda e: e.ts_ms))
    c = s.copy()
    assert c == copy.deepcopy(s)
    ids = {id(x) for x in _containers(s)}
    assert not ids & {id(x) for x in _containers(c)}
    # Mutating the copy in place never shows through to the original.
    before = copy.deepcopy(s)
    more = apply_many(c, [ClickEvent("new-id", "c", T0 + 121 * MS_PER_DAY, "login", "s9")])
    assert s == before
    assert more != s


def test_copy_covers_every_field() -> None:
    s = CustomerState(**{f.name: _distinct(f.name) for f in dataclasses.fields(CustomerState)})
    c = s.copy()
    for f in dataclasses.fields(CustomerState):
        assert getattr(c, f.name) == getattr(s, f.name), f.name


def _distinct(name: str) -> object:
    # A value per field that no other field has, so a field copied into the wrong slot shows.
    default = getattr(CustomerState(), name)
    if isinstance(default, dict):
        return {hash(name) % 1000: [len(name), 1]} if name in ("pdays", "cdays") else {name: 1}
    return sum(map(ord, name))
