"""Event schemas of the Kafka contract (pydantic) and the raw-record decoder.

Agents decode raw bytes themselves so that nothing is silently skipped: every
record either becomes a validated event or a :class:`Rejection` with a reason
for the dead-letter topic.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from features.events import ClickEvent, Event, TransactionEvent, epoch_ms, to_units
from features.text import BLANK, CONTROL, shows_nothing

#: This module's functions: pydantic must take the methods of its models for methods,
#: not fields, also when the module runs compiled (see stream.native), where a function
#: is not a ``types.FunctionType``.
_FUNCTIONS = (type(lambda: None),)

MAX_ID_CHARS = 256
MAX_NESTING = 8
# Epoch-ms bounds accepted at all: 1970 .. 2200. Finer checks are event-time ones.
_TS_MIN, _TS_MAX = 0, 7_258_118_400_000
# RFC 3339 5.6: time-numoffset is time-hour (00-23) ":" time-minute (00-59).
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:(\d{2})(\.\d+)?"
                      r"([Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)\Z", re.ASCII)
_RFC3339_LOCAL = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?\Z", re.ASCII)

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


def parse_ts(value: Any) -> int:
    """Epoch milliseconds from an RFC 3339 string or an epoch-ms number.

    >>> parse_ts("1997-01-01T00:00:00Z")
    852076800000
    >>> parse_ts(852076800000)
    852076800000
    >>> parse_ts("2004-07-28T13:22:18.781Z")  # exact: a float product gave ...780
    1091020938781
    """
    if isinstance(value, bool):
        raise ValueError("timestamp must be RFC 3339 or epoch milliseconds")
    if isinstance(value, int):
        ms = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("timestamp is not finite")
        ms = math.floor(value)  # as for an RFC 3339 time: -0.5 is before the epoch, not at it
    elif isinstance(value, str):
        text = value
        if text != text.strip():
            # RFC 3339 has no room for them; str.strip() would also take control characters
            raise ValueError("timestamp has whitespace or control characters around it")
        m = _RFC3339.match(text)
        if m is None:
            # datetime.fromisoformat also takes ISO 8601 forms RFC 3339 does not have
            # (basic format, week dates, no seconds, "+0000", a decimal comma)
            if _RFC3339_LOCAL.match(text):
                raise ValueError("timestamp has no UTC offset")
            raise ValueError("timestamp is not RFC 3339")
        leap = m.group(1) == "60"  # RFC 3339 5.6: a leap second, read as POSIX time does
        if leap:
            text = text[:m.start(1)] + "59" + text[m.end(1):]
        text = text[:10] + "T" + text[11:]
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError("timestamp is not RFC 3339") from None
        ms = epoch_ms(dt)
        if leap:
            # RFC 3339 5.7: a leap second is the last second of a UTC day (23:59:60Z, or
            # the local time of that instant); second 60 of any other minute is no time.
            if ms // 1000 % 86_400 != 86_399:
                raise ValueError("timestamp has second 60 outside 23:59 UTC")
            ms += 1000 - ms % 1000
    else:
        raise ValueError("timestamp must be RFC 3339 or epoch milliseconds")
    if not _TS_MIN <= ms <= _TS_MAX:
        raise ValueError("timestamp out of range")
    return ms


def _no_control(v: str | None) -> str | None:
    if v is not None and CONTROL.search(v):
        raise ValueError("contains control characters")
    if v is not None and shows_nothing(v):
        raise ValueError("shows nothing (only whitespace or invisible characters)")
    return v


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_NESTING:
        return level
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level + 1)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level + 1)
    return level


class _Input(BaseModel):
    model_config = ConfigDict(ignored_types=_FUNCTIONS, extra="ignore", frozen=True)

    event_id: Id
    customer_id: Id
    ts: int

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, v: Any) -> int:
        return parse_ts(v)

    @field_validator("event_id", "customer_id")
    @classmethod
    def _ids(cls, v: str) -> str:
        return _no_control(v)  # type: ignore[return-value]


class ClickstreamIn(_Input):
    """A clickstream record."""

    event_type: Annotated[str, Field(min_length=1, max_length=64)]
    session_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = None
    properties: dict[str, Any] | None = None

    @field_validator("event_type", "session_id")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        return _no_control(v)

    @field_validator("properties")
    @classmethod
    def _shallow(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and _depth(v) > MAX_NESTING:
            raise ValueError(f"properties nested deeper than {MAX_NESTING} levels")
        return v

    def to_event(self) -> ClickEvent:
        return ClickEvent(self.event_id, self.customer_id, self.ts, self.event_type,
                          self.session_id)


class TransactionIn(_Input):
    """A transactions record: a purchase or a refund of a non-negative amount."""

    amount: Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
    kind: Literal["purchase", "refund"] = "purchase"
    currency: Annotated[str, Field(min_length=1, max_length=8)] | None = None
    #: Not read by the engine: any JSON value (a purchase is never lost over it).
    items: Any = None

    @field_validator("amount", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        # pydantic reads true / false as 1.0 / 0.0 (a purchase of 1.00 nobody made) and a
        # numeric string as its number: the contract's amount is a JSON number
        if isinstance(v, bool):
            raise ValueError("amount must be a number, not a boolean")
        if not isinstance(v, int | float):
            raise ValueError(f"amount must be a JSON number, not {type(v).__name__}")
        return v

    @field_validator("currency")
    @classmethod
    def _currency_text(cls, v: str | None) -> str | None:
        if v is not None and not _id_ok(v, 8):
            raise ValueError("currency may not show nothing nor hold a control "
                             "character")
        return v

    def to_event(self) -> TransactionEvent:
        return TransactionEvent(self.event_id, self.customer_id, self.ts, to_units(self.amount),
                                self.kind)


class DlqRecord(BaseModel):
    """A record of ``segmentation-dlq``: a rejected input and why."""

    source_topic: str
    partition: int
    offset: int
    reason: str
    error: str
    payload: str
    payload_truncated: bool = False
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    key: str | None = None
    key_truncated: bool = False
    key_encoding: Literal["utf-8", "base64"] | None = None
    at: str


class Action(BaseModel):
    """The next-best action attached to a migration."""

    action_id: str
    channel: str
    holdout: bool = False
    priority: int = 0


class Migration(BaseModel):
    """A record of ``segment-migrations``: a customer moved from one segment to another."""

    migration_id: str
    customer_id: str
    scheme: str
    from_segment: str | None
    to_segment: str
    at: str
    emitted_at: str
    reason: str
    features: dict[str, Any]
    scores: dict[str, Any]
    rules_version: str
    model_versions: dict[str, int | str]
    action: Action | None = None
    #: the input record that caused the move, or ``{"sweep": true}`` for a time-driven one
    trigger: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a raw record cannot be processed."""

    reason: str
    error: str


_MODELS: dict[str, type[ClickstreamIn] | type[TransactionIn]] = {
    "clickstream": ClickstreamIn,
    "transactions": TransactionIn,
}


def _id_ok(v: Any, limit: int = MAX_ID_CHARS) -> bool:
    return (type(v) is str and 0 < len(v) <= limit and CONTROL.search(v) is None
            and v.strip(BLANK) != "")  # as shows_nothing, inline: every id passes here


def _plain_event(kind: str, doc: dict[str, Any]) -> Event | None:
    """The event of a record in the plain shape producers send, else None.

    A fast path for :func:`decode`: it accepts only records whose every field already has
    its exact type and is within bounds, where the pydantic model would accept them and
    build the same event. Everything else (coercions, defaults beyond ``kind``, any
    error) goes through the model, which stays the authority on rejections.
    """
    eid, cid, ts = doc.get("event_id"), doc.get("customer_id"), doc.get("ts")
    if type(ts) is not int or not _TS_MIN <= ts <= _TS_MAX or not _id_ok(eid) \
            or not _id_ok(cid):
        return None
    if kind == "clickstream":
        event_type, session, props = (doc.get("event_type"), doc.get("session_id"),
                                      doc.get("properties"))
        if not _id_ok(event_type, 64) or (session is not None and not _id_ok(session)):
            return None
        if props is not None and (type(props) is not dict or _depth(props) > MAX_NESTING):
            return None
        return ClickEvent(eid, cid, ts, event_type, session)
    if kind == "transactions":
        amount, sign = doc.get("amount"), doc.get("kind", "purchase")
        currency = doc.get("currency")
        if type(amount) is int:
            if not 0 <= amount <= 10**12:
                return None
            amount = float(amount)
        if type(amount) is not float or not 0.0 <= amount <= 1e12:  # NaN fails too
            return None
        if sign not in ("purchase", "refund") or type(sign) is not str:
            return None
        if currency is not None and not _id_ok(currency, 8):
            return None
        return TransactionEvent(eid, cid, ts, to_units(amount), sign)
    return None


def decode(kind: str, key: bytes | None, value: bytes | None, max_bytes: int,
           currency: str | None = None) -> Event | Rejection:
    """Turn a raw record of input topic ``kind`` into an event or a rejection; with
    ``currency`` (upper case), a transaction naming another is rejected.

    >>> decode("transactions", b"c1", b'{"event_id":"e","customer_id":"c1","ts":0,"amount":1}',
    ...        1000).amount_units
    10000
    >>> decode("transactions", b"c1", b'not json', 1000).reason
    'not_json'
    """
    try:
        return _decode(kind, key, value, max_bytes, currency)
    except Exception as exc:  # e.g. RecursionError re-reading a deeply nested document
        return Rejection("invalid_schema", f"record: {type(exc).__name__}: {exc}")


def _decode(kind: str, key: bytes | None, value: bytes | None, max_bytes: int,
            currency: str | None = None) -> Event | Rejection:
    if not value:
        return Rejection("empty", "record has no value" if value is None else
                         "record value is empty (zero bytes)")
    if len(value) > max_bytes:
        return Rejection("too_large", f"{len(value)} bytes > limit {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("not_utf8", str(exc))
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        why = str(exc)
        doc = _loads_wide_numbers(text) if _OUT_OF_DOUBLE in why else None
        if doc is None and (_OUT_OF_DOUBLE in why or _TOO_DEEP in why):
            # orjson names only its first complaint: a wide number may come before a
            # depth the standard library cannot read either (it reads both).
            doc = _loads_deep(text)
        if doc is None:
            return Rejection("not_json", why)
    if not isinstance(doc, dict):
        return Rejection("invalid_schema", f"expected a JSON object, got {type(doc).__name__}")
    event = _plain_event(kind, doc)
    if event is None:
        try:
            model = _MODELS[kind].model_validate(doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "record"
            return Rejection("invalid_schema", f"{where}: {first['msg']}")
        except Exception as exc:  # a validator failing another way: still this record's fault
            return Rejection("invalid_schema", f"record: {type(exc).__name__}: {exc}")
        event = model.to_event()
    try:
        key_text = key.decode("utf-8") if key is not None else None
    except UnicodeDecodeError:
        key_text = None
    if key_text != event.customer_id:
        return Rejection("key_mismatch", "record key must equal customer_id")
    if currency is not None and isinstance(event, TransactionEvent):
        named = doc.get("currency")
        # ASCII case only: str.upper() folds some other letters onto ASCII ones (a long s is "S")
        if named is not None and (not named.isascii() or named.upper() != currency):
            return Rejection("currency", f"currency {named!r} is not the deployment's "
                             f"{currency} (SEGSTREAM_CURRENCY)")
    ts = doc.get("ts")
    if type(ts) is float and ts.is_integer():
        # A fraction of a millisecond just below a whole one (…999.9999) reads as the
        # whole one in a double: floor it from the JSON text, as an RFC 3339 time is.
        event = _exact_ts(event, text)
        if isinstance(event, Rejection):
            return event
    if isinstance(event, TransactionEvent) and (event.amount_units >= _EXACT_UNITS
                                                or _near_half_unit(doc.get("amount"))):
        event = _exact_amount(event, text, doc.get("amount"))
        if event.amount_units > _MAX_UNITS:  # within a double of 1e12, above it as written
            return Rejection("invalid_schema", "amount: Input should be less than or equal "
                             "to 1000000000000")
    return event


#: How orjson refuses a JSON number beyond a double's range (``1e400``, 400 digits).
_OUT_OF_DOUBLE = "number is infinity when parsed as double"
#: Longer integers are read as floats (infinite): Python refuses to convert them exactly.
_MAX_INT_DIGITS = 4000


#: How orjson refuses a document nested deeper than it reads (1,024 levels).
_TOO_DEEP = "depth limit exceeded"
#: Containers this deep are checked and then read as ``null``: no field the engine reads
#: lies this deep, and a click's ``properties`` deeper than 8 levels is refused anyway.
_DEEP_CUT = 64
_TOKEN = re.compile(
    r'[ \t\n\r]*(?:(?P<p>[\[\]{},:])'
    r'|(?P<s>"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*")'
    r'|(?P<n>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)'
    r'|(?P<l>true|false|null))')
_END = re.compile(r"[ \t\n\r]*")


def _loads_deep(text: str) -> Any:
    """A document orjson refused only for its depth, or None when it is not JSON.

    Valid JSON of any depth is a valid record as long as the fields the engine reads are
    right (``items``, unknown fields: any JSON value, so a purchase is not lost over one).
    The whole text is checked as JSON without recursion; containers nested more than
    ``_DEEP_CUT`` levels are then read as ``null`` (what they held is never read), and the
    rest by orjson (or, for numbers beyond a double, :func:`_loads_wide_numbers`).

    >>> _loads_deep('{"amount": 1, "items": ' + "[" * 3000 + "]" * 3000 + "}")["amount"]
    1
    >>> _loads_deep('{"items": ' + "[" * 3000 + "]" * 2999 + "}") is None
    True
    """
    out: list[str] = []
    stack: list[str] = []  # the open containers' brackets
    # what may come next: value, value or ], key or }, key, colon, comma, end
    expect = "value"
    pos = 0
    cut_at = -1  # where in ``out`` the container being cut began, or -1
    while (m := _TOKEN.match(text, pos)) is not None:
        kind, pos = m.lastgroup, m.end()
        tok = m.group(kind or 0)
        if tok in ("[", "{") and kind == "p":
            if expect not in ("value", "value]"):
                return None
            stack.append(tok)
            expect = "value]" if tok == "[" else "key}"
            if len(stack) == _DEEP_CUT + 1 and cut_at < 0:
                cut_at = len(out)
                continue
        elif tok in ("]", "}") and kind == "p":
            if not stack or stack.pop() != ("[" if tok == "]" else "{") or expect not in (
                    "value]" if tok == "]" else "key}", "comma"):
                return None
            expect = "comma" if stack else "end"
            if cut_at >= 0 and len(stack) == _DEEP_CUT:
                del out[cut_at:]
                out.append(" null")
                cut_at = -1
                continue
        elif tok == "," and kind == "p":
            if expect != "comma":
                return None
            expect = "value" if stack[-1] == "[" else "key"
        elif tok == ":" and kind == "p":
            if expect != "colon":
                return None
            expect = "value"
        elif kind == "s" and expect in ("key", "key}"):
            if "\\u" in tok and _loads_wide_numbers(tok) is None:
                return None  # a lone surrogate, refused as orjson refuses it
            expect = "colon"
        else:
            if expect not in ("value", "value]"):
                return None
            if kind == "s" and "\\u" in tok and _loads_wide_numbers(tok) is None:
                return None
            expect = "comma" if stack else "end"
        if cut_at < 0:
            out.append(text[m.start():pos])
    if expect != "end" or _END.match(text, pos).end() != len(text):  # type: ignore[union-attr]
        return None
    shallow = "".join(out)
    try:
        return orjson.loads(shallow)
    except orjson.JSONDecodeError as exc:
        return _loads_wide_numbers(shallow) if _OUT_OF_DOUBLE in str(exc) else None


def _int_or_float(text: str) -> int | float:
    return int(text) if len(text) <= _MAX_INT_DIGITS else float(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads_wide_numbers(text: str) -> Any:
    """A document orjson refused only for a number beyond a double's range, or None.

    Such a number is valid JSON, and the field that holds it may be one the engine does not
    read (``items``, a click's ``properties``): the record must not be lost for it. The
    standard library reads it as an exact integer or an infinite float, which the schema then
    judges where the engine reads it (an ``amount`` or ``ts`` that large fails the schema).
    As orjson does, NaN, Infinity and lone surrogates are refused.

    >>> _loads_wide_numbers('{"amount": 1, "items": 1e400}')
    {'amount': 1, 'items': inf}
    >>> _loads_wide_numbers('{"items": 1e400, "x": "\\ud800"}') is None
    True
    """
    try:
        doc = json.loads(text, parse_int=_int_or_float, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    todo = [doc]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
        elif isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return None
    return doc


def _near_half_unit(amount: Any) -> bool:
    """Whether a float amount lies about halfway between two 1/10,000 units.

    Rounding the float product (``to_units``) rounds half-even on the double, not on the
    decimal the record wrote: ``1.00005`` is the double 1.0000500000000001 and gave 10,001
    units where the decimal gives 10,000. Amounts with at most four decimals are never near
    a half unit, so only an amount with a fifth decimal of about 5 is read again.

    >>> _near_half_unit(1.00005), _near_half_unit(19.99), _near_half_unit(0.00016)
    (True, False, False)
    """
    if type(amount) is not float:
        return False
    x = amount * 10_000
    return abs(x - math.floor(x) - 0.5) < 0.01


#: From this many units (1e8 currency units) up an amount is read again from the JSON
#: text, as a decimal. From 1e10 a double no longer carries every 1/10,000 of an amount;
#: and :func:`_near_half_unit`'s tolerance of a hundredth of a unit holds the error of the
#: double and of its product only below about 4e9 (the error grows with the amount):
#: below 1e8 it is under 0.0002 units.
_EXACT_UNITS = 10**12
#: The largest amount (1e12), in units.
_MAX_UNITS = 10**16


def _exact_ts(event: Event, text: str) -> Event | Rejection:
    """``event`` with its time floored from the record's JSON text (an epoch-ms number
    with a fraction that a double rounded up to the next millisecond).

    >>> t = '{"event_id":"e","customer_id":"c","ts":1796515199999.99999,"event_type":"v"}'
    >>> _exact_ts(ClickEvent("e", "c", 1796515200000, "v"), t).ts_ms
    1796515199999
    """
    try:
        ts = json.loads(text, parse_float=Decimal, parse_int=_int_or_float).get("ts")
    except (RecursionError, ValueError):
        return event  # nested past the decimal parser: the double's reading stands
    if not isinstance(ts, Decimal) or not ts.is_finite():
        return event
    ms = int(ts.to_integral_value(ROUND_FLOOR))
    if ms == event.ts_ms:
        return event
    if not _TS_MIN <= ms <= _TS_MAX:
        return Rejection("invalid_schema", "ts: timestamp out of range")
    if isinstance(event, ClickEvent):
        return ClickEvent(event.event_id, event.customer_id, ms, event.event_type,
                          event.session_id)
    return TransactionEvent(event.event_id, event.customer_id, ms, event.amount_units,
                            event.kind)


def _exact_amount(event: TransactionEvent, text: str, amount: Any = None) -> TransactionEvent:
    try:
        amount = json.loads(text, parse_float=Decimal, parse_int=_int_or_float).get("amount")
    except (RecursionError, ValueError):
        # An unknown field nested deeper than the decimal parser goes (orjson read it):
        # the shortest decimal that reads back as the double, which is the amount as
        # written for any amount written with at most 15 significant digits.
        if isinstance(amount, float):
            amount = Decimal(repr(amount))
    if isinstance(amount, bool) or not isinstance(amount, int | Decimal | str):
        return event
    try:
        units = int((Decimal(amount) * 10_000).to_integral_value(ROUND_HALF_EVEN))
    except (ArithmeticError, ValueError):
        return event
    return TransactionEvent(event.event_id, event.customer_id, event.ts_ms, units, event.kind)
