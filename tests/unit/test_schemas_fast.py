"""The decoder's fast path gives exactly what the pydantic models give, or defers to them."""

from __future__ import annotations

import math

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stream.schemas import _MODELS, Rejection, _plain_event, decode

_text = st.one_of(st.text(max_size=8), st.text("ab\x00\x1f\x7f", max_size=3),
                  st.text(min_size=250, max_size=260, alphabet="x"))
_num = st.one_of(st.integers(-(10**13), 10**13), st.floats(allow_nan=True),
                 st.booleans(), st.integers(10**300, 10**310))
_value = st.one_of(st.none(), _text, _num, st.lists(st.integers(), max_size=2),
                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
_nested = st.recursive(st.integers(), lambda c: st.one_of(st.lists(c, max_size=2),
                                                          st.dictionaries(st.just("k"), c)),
                       max_leaves=12)


def _doc(kind: str) -> st.SearchStrategy[dict]:
    common = {
        "event_id": st.one_of(_text, _value), "customer_id": st.one_of(_text, _value),
        "ts": st.one_of(st.integers(-5, 8 * 10**12), st.just("2025-01-01T00:00:00Z"), _value),
    }
    if kind == "clickstream":
        extra = {"event_type": st.one_of(_text, _value), "session_id": _value,
                 "properties": st.one_of(_value, _nested)}
    else:
        extra = {"amount": st.one_of(_num, st.just("8.5"), _value),
                 "kind": st.sampled_from(["purchase", "refund", "other", 1, None]),
                 "currency": _value, "items": st.one_of(_value, _nested, st.just(2.0))}
    fields = {**common, **extra}
    return st.fixed_dictionaries({}, optional=fields)


@settings(max_examples=700, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["clickstream", "transactions"]))
def test_fast_path_agrees_with_the_models(data: st.DataObject, kind: str) -> None:
    doc = data.draw(_doc(kind))
    fast = _plain_event(kind, doc)
    try:
        want = _MODELS[kind].model_validate(doc).to_event()
    except ValidationError:
        want = None
    if fast is not None:
        assert want == fast  # accepted only what the model accepts, with the same event


def test_plain_records_take_the_fast_path() -> None:
    click = {"event_id": "e1", "customer_id": "c1", "ts": 1_735_689_600_000,
             "event_type": "page_view", "session_id": "s1", "properties": {"page": "/"}}
    txn = {"event_id": "e2", "customer_id": "c1", "ts": 1_735_689_600_000, "amount": 8.32,
           "kind": "purchase", "currency": "USD", "items": 2}
    for kind, doc in (("clickstream", click), ("transactions", txn)):
        fast = _plain_event(kind, doc)
        assert fast is not None
        assert fast == _MODELS[kind].model_validate(doc).to_event()
        assert decode(kind, b"c1", orjson.dumps(doc), 10_000) == fast
    assert not math.isnan(_plain_event("transactions", txn).amount_units)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 7_258_118_400_000), st.integers(-14 * 60, 14 * 60))
def test_rfc3339_timestamps_parse_to_the_exact_millisecond(ms: int, offset_min: int) -> None:
    """A float product (``timestamp() * 1000``) lost a millisecond for about a fifth of the
    timestamps of some years (2004, 2038): the parse is integer arithmetic."""
    from datetime import UTC, datetime, timedelta, timezone

    from stream.schemas import parse_ts

    tz = timezone(timedelta(minutes=offset_min))
    dt = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).astimezone(tz)
    text = dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert parse_ts(text) == ms


def test_timestamps_whose_utc_time_leaves_the_calendar_are_rejected_not_raised() -> None:
    """``astimezone(UTC)`` raised OverflowError for these, which failed the whole batch."""
    from stream.schemas import Rejection

    for ts in ("9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"):
        doc = {"event_id": "e1", "customer_id": "c1", "ts": ts, "event_type": "login"}
        res = decode("clickstream", b"c1", orjson.dumps(doc), 65_536)
        assert isinstance(res, Rejection) and res.reason == "invalid_schema", res


def test_a_boolean_amount_is_rejected_not_read_as_one() -> None:
    """``"amount": true`` was accepted as a purchase of 1.00 (``false`` as 0.00), while a
    boolean timestamp is rejected: both now go to the dead-letter topic."""
    for flag in (True, False):
        doc = {"event_id": "e", "customer_id": "c1", "ts": 1_735_689_600_000, "amount": flag}
        got = decode("transactions", b"c1", orjson.dumps(doc), 10_000)
        assert got.reason == "invalid_schema", got
        assert "amount" in got.error


def test_an_amount_given_as_a_string_is_rejected() -> None:
    """The contract's amount is a JSON number; pydantic's lax mode read ``"12.5"`` as 12.5."""
    for amount in ("12.5", "1", "", "1e3", None, [1], {"v": 1}):
        doc = {"event_id": "e", "customer_id": "c1", "ts": 1_735_689_600_000, "amount": amount}
        got = decode("transactions", b"c1", orjson.dumps(doc), 10_000)
        assert isinstance(got, Rejection) and got.reason == "invalid_schema", (amount, got)
        assert "amount" in got.error
    for amount in (12.5, 0, 10**12):
        doc = {"event_id": "e", "customer_id": "c1", "ts": 1_735_689_600_000, "amount": amount}
        assert not isinstance(decode("transactions", b"c1", orjson.dumps(doc), 10_000),
                              Rejection)
