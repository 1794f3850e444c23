"""Input documents nested deeper than orjson reads: valid JSON is a valid record when the
fields the engine reads are right; anything else is still ``not_json``."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.schemas import _loads_deep, _loads_wide_numbers, decode

T = b'{"event_id": "e1", "customer_id": "c1", "ts": 1735689600000, "amount": 12.5'
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
_json = st.recursive(_scalar, lambda c: st.one_of(
    st.lists(c, max_size=3), st.dictionaries(st.text(max_size=3), c, max_size=3)),
    max_leaves=20)


def _deep(n: int, inner: str = "1") -> str:
    return "[" * n + inner + "]" * n


@pytest.mark.parametrize("depth", [1_025, 2_000, 20_000])
def test_a_purchase_with_deep_items_is_applied(depth: int) -> None:
    for extra in (f', "items": {_deep(depth)}', f', "x": {{"y": {_deep(depth)}}}'):
        ev = decode("transactions", b"c1", T + extra.encode() + b"}", 1 << 20)
        assert not hasattr(ev, "reason"), ev
        assert ev.amount_units == 125_000  # type: ignore[union-attr]


def test_a_wide_number_before_a_deep_value_does_not_lose_the_purchase() -> None:
    """orjson names only its first complaint (the number): the standard library, which
    reads wide numbers, cannot read the depth either."""
    doc = T + b', "x": 1e400, "items": ' + _deep(3_000).encode() + b"}"
    ev = decode("transactions", b"c1", doc, 1 << 20)
    assert not hasattr(ev, "reason"), ev
    assert ev.amount_units == 125_000  # type: ignore[union-attr]


def test_deep_click_properties_are_refused_for_their_depth_not_as_json() -> None:
    doc = ('{"event_id": "e", "customer_id": "c1", "ts": 1735689600000, '
           f'"event_type": "page_view", "properties": {{"a": {_deep(5_000)}}}}}')
    r = decode("clickstream", b"c1", doc.encode(), 1 << 20)
    assert r.reason == "invalid_schema" and "8 levels" in r.error  # type: ignore[union-attr]


@pytest.mark.parametrize("broken", [
    _deep(2_000)[:-1],                       # one bracket short
    _deep(2_000) + "]",                       # one too many
    "[" * 2_000 + "1,]" + "]" * 1_999,        # trailing comma
    "[" * 2_000 + "1 2" + "]" * 2_000,        # two values without a comma
    "[" * 2_000 + '{"a" 1}' + "]" * 2_000,    # no colon
    "[" * 2_000 + '{1: 2}' + "]" * 2_000,     # a key that is not a string
    "[" * 2_000 + '"\\ud800"' + "]" * 2_000,  # a lone surrogate
    "[" * 2_000 + '"a\tb"' + "]" * 2_000,     # a raw control character in a string
    "[" * 2_000 + "01" + "]" * 2_000,         # a leading zero
    "[" * 2_000 + "NaN" + "]" * 2_000,
    "[" * 2_000 + "]" * 1_999 + "}",          # mismatched bracket
])
def test_a_deep_document_that_is_not_json_is_still_not_json(broken: str) -> None:
    assert _loads_deep(broken) is None
    doc = T + b', "items": ' + broken.encode() + b"}"
    assert decode("transactions", b"c1", doc, 1 << 20).reason == "not_json"  # type: ignore


@settings(max_examples=300, deadline=None)
@given(_json, st.sampled_from(["", " ", "\n\t "]))
def test_shallow_documents_read_as_orjson_reads_them(value: object, ws: str) -> None:
    text = json.dumps(value, indent=1 if ws else None).replace("\n", "\n" + ws)
    assert _loads_deep(text) == orjson.loads(text)


@settings(max_examples=500, deadline=None)
@given(_json, st.integers(0, 10_000), st.sampled_from(list('[]{},:"\\ 0-e.tn')),
       st.booleans())
def test_damaged_documents_are_refused_exactly_when_orjson_refuses_them(
        value: object, at: int, char: str, insert: bool) -> None:
    text = json.dumps(value)
    i = at % (len(text) + 1)
    damaged = text[:i] + char + text[i + (0 if insert else 1):]
    try:
        want = orjson.loads(damaged)
    except orjson.JSONDecodeError as exc:
        if "number is infinity" in str(exc):  # valid JSON: read as the wide-number path does
            assert _loads_deep(damaged) == _loads_wide_numbers(damaged)
        else:
            assert _loads_deep(damaged) is None
    else:
        assert _loads_deep(damaged) == want


@settings(max_examples=300, deadline=None)
@given(ms=st.integers(0, 4_102_444_800_000),
       fraction=st.text(alphabet="0123456789", min_size=1, max_size=25))
def test_a_fractional_epoch_ms_is_floored_as_written(ms: int, fraction: str) -> None:
    """A fraction just below a whole millisecond (…999.99999) read as the next millisecond
    in a double: a click at 23:59:59.999 counted on the next day."""
    from decimal import ROUND_FLOOR, Decimal

    from stream.schemas import decode

    written = f"{ms}.{fraction}"
    value = b'{"event_id":"e","customer_id":"c","ts":' + written.encode() \
        + b',"event_type":"view"}'
    got = decode("clickstream", b"c", value, 100_000)
    want = int(Decimal(written).to_integral_value(ROUND_FLOOR))
    assert not hasattr(got, "reason") or want > 4_102_444_800_000, got
    if not hasattr(got, "reason"):
        assert got.ts_ms == want


def test_the_last_instant_of_a_day_stays_on_that_day() -> None:
    from stream.schemas import decode

    for written in ("1796515199999.99999", "1796515199999.9999", "1796515199999.5"):
        value = b'{"event_id":"e","customer_id":"c","ts":' + written.encode() + b',"amount":1}'
        assert decode("transactions", b"c", value, 100_000).ts_ms == 1796515199999, written
