"""Validated, normalised input events as the pure feature logic sees them.

The stream layer turns raw Kafka records into these objects; everything in
``features/`` and ``scorers/`` works on them without touching I/O.

Money is kept in integer *units* of 1/10,000 of the currency so that sums are
exact and independent of the order in which events arrive.

>>> to_units(12.34)
123400
>>> from_units(123400)
12.34
>>> day_of(86_400_000 * 3 + 5)
3
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from features.record import record

MS_PER_DAY = 86_400_000
UNITS_PER_CURRENCY = 10_000

#: Click event types with a meaning of their own in the engagement features.
LOGIN = "login"
FEATURE_USE = "feature_use"
SUPPORT_TICKET = "support_ticket"


def to_units(amount: float) -> int:
    """Convert a currency amount to integer units of 1/10,000 (half-even rounding)."""
    return round(amount * UNITS_PER_CURRENCY)


def from_units(units: int) -> float:
    """Convert integer units back to a currency amount."""
    return units / UNITS_PER_CURRENCY


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(dt: datetime) -> int:
    """Epoch milliseconds of an aware datetime, in integer arithmetic (``timestamp() * 1000``
    is a float product and loses a millisecond for some instants).

    >>> epoch_ms(datetime(2004, 7, 28, 13, 22, 18, 781_000, tzinfo=UTC))
    1091020938781
    """
    return (dt - _EPOCH) // _MS


def day_of(ts_ms: int) -> int:
    """UTC day number (days since 1970-01-01) of an epoch-millisecond timestamp."""
    return ts_ms // MS_PER_DAY


def id_hash(value: str) -> int:
    """A stable 63-bit hash of an identifier (event or session id).

    Stable across processes and machines, unlike :func:`hash`.

    >>> id_hash("e1") == id_hash("e1")
    True
    """
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@record
class ClickEvent:
    """A clickstream event: something the customer did in the product."""

    event_id: str
    customer_id: str
    ts_ms: int
    event_type: str
    session_id: str | None = None

    kind: Literal["click"] = "click"

    def __init__(self, event_id: str, customer_id: str, ts_ms: int, event_type: str,
                 session_id: str | None = None, kind: Literal["click"] = "click") -> None:
        w: Any = self
        w.event_id = event_id
        w.customer_id = customer_id
        w.ts_ms = ts_ms
        w.event_type = event_type
        w.session_id = session_id
        w.kind = kind


@record
class TransactionEvent:
    """A purchase or refund. ``amount_units`` is always >= 0; ``kind`` gives the sign."""

    event_id: str
    customer_id: str
    ts_ms: int
    amount_units: int
    kind: Literal["purchase", "refund"] = "purchase"

    def __init__(self, event_id: str, customer_id: str, ts_ms: int, amount_units: int,
                 kind: Literal["purchase", "refund"] = "purchase") -> None:
        w: Any = self
        w.event_id = event_id
        w.customer_id = customer_id
        w.ts_ms = ts_ms
        w.amount_units = amount_units
        w.kind = kind


Event = ClickEvent | TransactionEvent
