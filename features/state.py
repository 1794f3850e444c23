"""Per-customer behavioural state and its pure transitions.

``apply(state, event) -> state`` folds one event into a customer's state and
``derive(state, now_ms) -> dict`` produces every feature of the public contract
at engine time ``now_ms``. Both are pure: :func:`apply` never mutates its input.

Windows are day-bucketed trailing windows in UTC: the W-day window covers the
days ``[day(now) - (W - 1), day(now)]``. Day buckets older than the retention
(the longest window, or the allowed lateness if that is longer) are folded into
totals and dropped, so state stays bounded. Because the retention is longer
than the allowed lateness, a late event never needs a dropped bucket, and every
count stays exact.

Lateness is judged per input topic-partition (the engine rejects an event more
than ``lateness_ms`` behind the newest one accepted from its topic-partition), and
a customer's clicks and transactions each come through one topic-partition. So
click state is pruned relative to the customer's newest click and transaction
state relative to the newest transaction: however far one topic runs ahead of the
other, a late event never needs anything pruned. Event ids are remembered for
``lateness_ms`` behind the newest event of the same kind; a duplicate of anything
older is rejected as too late upstream.

Example:

>>> from features.events import ClickEvent, TransactionEvent, MS_PER_DAY, to_units
>>> s = empty()
>>> s = apply(s, TransactionEvent("t1", "c1", 10 * MS_PER_DAY, to_units(20.0)))
>>> s = apply(s, TransactionEvent("t2", "c1", 12 * MS_PER_DAY, to_units(5.0)))
>>> s = apply(s, TransactionEvent("t2", "c1", 12 * MS_PER_DAY, to_units(5.0)))  # duplicate
>>> f = derive(s, 15 * MS_PER_DAY)
>>> f["purchases_total"], f["monetary_total"], f["recency_days"]
(2, 25.0, 3)
>>> f["bgnbd_frequency"], f["bgnbd_recency"], f["bgnbd_T"], f["bgnbd_monetary"]
(1, 2, 5, 5.0)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from features.events import (
    FEATURE_USE,
    LOGIN,
    MS_PER_DAY,
    SUPPORT_TICKET,
    ClickEvent,
    Event,
    TransactionEvent,
    day_of,
    from_units,
    id_hash,
)

#: Default allowed lateness (7 days), matching the engine setting's default.
DEFAULT_LATENESS_MS = 7 * MS_PER_DAY
#: Longest trailing window of any feature, in days.
LONGEST_WINDOW_DAYS = 90
#: Weeks in the activity-trend regression.
TREND_WEEKS = 8
#: Distinct-value windows (sessions, event types) look back this many days.
DISTINCT_WINDOW_DAYS = 30

# Indexes into a click day bucket.
_EV, _LOGIN, _FEAT, _TICKET = 0, 1, 2, 3
# Indexes into a purchase day bucket.
_NPUR, _SPEND = 0, 1


@dataclass(slots=True)
class CustomerState:
    """Compact per-customer state. Treat as immutable outside this module."""

    max_ts: int = -1
    first_seen_ts: int = -1
    seen_ids: dict[int, int] = field(default_factory=dict)
    max_txn_ts: int = -1
    txn_ids: dict[int, int] = field(default_factory=dict)
    # transactions
    first_purchase_ts: int = -1
    last_purchase_ts: int = -1
    purchases_total: int = 0
    refunds_total: int = 0
    monetary_units: int = 0
    pdays: dict[int, list[int]] = field(default_factory=dict)
    old_purchase_days: int = 0
    old_pday_spend: int = 0
    first_day_spend: int | None = None
    # clickstream
    last_event_ts: int = -1
    events_total: int = 0
    cdays: dict[int, list[int]] = field(default_factory=dict)
    sessions: dict[int, int] = field(default_factory=dict)
    event_types: dict[str, int] = field(default_factory=dict)

    def __init__(self, max_ts: int = -1, first_seen_ts: int = -1,
                 seen_ids: dict[int, int] | None = None, max_txn_ts: int = -1,
                 txn_ids: dict[int, int] | None = None, first_purchase_ts: int = -1,
                 last_purchase_ts: int = -1, purchases_total: int = 0, refunds_total: int = 0,
                 monetary_units: int = 0, pdays: dict[int, list[int]] | None = None,
                 old_purchase_days: int = 0, old_pday_spend: int = 0,
                 first_day_spend: int | None = None, last_event_ts: int = -1,
                 events_total: int = 0, cdays: dict[int, list[int]] | None = None,
                 sessions: dict[int, int] | None = None,
                 event_types: dict[str, int] | None = None) -> None:
        self.max_ts = max_ts
        self.first_seen_ts = first_seen_ts
        self.seen_ids = {} if seen_ids is None else seen_ids
        self.max_txn_ts = max_txn_ts
        self.txn_ids = {} if txn_ids is None else txn_ids
        self.first_purchase_ts = first_purchase_ts
        self.last_purchase_ts = last_purchase_ts
        self.purchases_total = purchases_total
        self.refunds_total = refunds_total
        self.monetary_units = monetary_units
        self.pdays = {} if pdays is None else pdays
        self.old_purchase_days = old_purchase_days
        self.old_pday_spend = old_pday_spend
        self.first_day_spend = first_day_spend
        self.last_event_ts = last_event_ts
        self.events_total = events_total
        self.cdays = {} if cdays is None else cdays
        self.sessions = {} if sessions is None else sessions
        self.event_types = {} if event_types is None else event_types

    def copy(self) -> CustomerState:
        """A deep copy, safe to mutate (every container is new; numbers are immutable)."""
        return CustomerState(
            self.max_ts, self.first_seen_ts, dict(self.seen_ids), self.max_txn_ts,
            dict(self.txn_ids), self.first_purchase_ts, self.last_purchase_ts,
            self.purchases_total, self.refunds_total, self.monetary_units,
            {d: b[:] for d, b in self.pdays.items()}, self.old_purchase_days,
            self.old_pday_spend, self.first_day_spend, self.last_event_ts, self.events_total,
            {d: b[:] for d, b in self.cdays.items()}, dict(self.sessions),
            dict(self.event_types),
        )


def empty() -> CustomerState:
    """The state of a customer the engine has never seen."""
    return CustomerState()


def retention_days(lateness_ms: int = DEFAULT_LATENESS_MS) -> int:
    """Days of buckets kept behind a customer's newest event.

    >>> retention_days(7 * MS_PER_DAY)
    90
    >>> retention_days(200 * MS_PER_DAY)
    202
    """
    return max(LONGEST_WINDOW_DAYS, TREND_WEEKS * 7, lateness_ms // MS_PER_DAY + 2)


def _ids(state: CustomerState, event: Event) -> dict[int, int]:
    return state.txn_ids if isinstance(event, TransactionEvent) else state.seen_ids


def is_duplicate(state: CustomerState, event: Event,
                 lateness_ms: int = DEFAULT_LATENESS_MS) -> bool:
    """Whether this event id was already applied to the state (within the lateness of
    its first timestamp; an id reused later is a new event)."""
    first = _ids(state, event).get(id_hash(event.event_id))
    return first is not None and event.ts_ms - first <= lateness_ms


def apply(
    state: CustomerState, event: Event, lateness_ms: int = DEFAULT_LATENESS_MS
) -> CustomerState:
    """Fold one event into a copy of ``state``; duplicates leave it unchanged."""
    return apply_many(state, (event,), lateness_ms)


def apply_many(
    state: CustomerState, events: Iterable[Event], lateness_ms: int = DEFAULT_LATENESS_MS
) -> CustomerState:
    """Fold several events into one copy of ``state`` (cheaper than repeated :func:`apply`)."""
    return apply_owned(state.copy(), events, lateness_ms)


def apply_owned(
    state: CustomerState, events: Iterable[Event], lateness_ms: int = DEFAULT_LATENESS_MS
) -> CustomerState:
    """As :func:`apply_many`, but folds into ``state`` itself: for a caller that owns it
    (a state just decoded from its stored bytes), which saves the copy."""
    for event in events:
        _apply_in_place(state, event, lateness_ms)
    _prune(state, lateness_ms)
    return state


def _apply_in_place(s: CustomerState, event: Event, lateness_ms: int) -> None:
    h = id_hash(event.event_id)
    ids = _ids(s, event)
    ts = event.ts_ms
    first = ids.get(h)
    # A duplicate is an id seen within the allowed lateness of its first timestamp; an id
    # reused later is a new event. Judged on the timestamps alone, not on whether pruning
    # (which runs once per batch) already forgot the id, so the batching does not matter.
    if first is not None and ts - first <= lateness_ms:
        return
    ids[h] = ts
    if ts > s.max_ts:
        s.max_ts = ts
    if s.first_seen_ts < 0 or ts < s.first_seen_ts:
        s.first_seen_ts = ts
    day = day_of(ts)
    if isinstance(event, TransactionEvent):
        _apply_transaction(s, event, day)
    else:
        _apply_click(s, event, day)


def _apply_transaction(s: CustomerState, event: TransactionEvent, day: int) -> None:
    if event.ts_ms > s.max_txn_ts:
        s.max_txn_ts = event.ts_ms
    bucket = s.pdays.get(day)
    if bucket is None:
        bucket = s.pdays[day] = [0, 0]
    if event.kind == "refund":
        s.refunds_total += 1
        s.monetary_units -= event.amount_units
        bucket[_SPEND] -= event.amount_units
        return
    s.purchases_total += 1
    s.monetary_units += event.amount_units
    bucket[_NPUR] += 1
    bucket[_SPEND] += event.amount_units
    ts = event.ts_ms
    if s.first_purchase_ts < 0 or ts < s.first_purchase_ts:
        s.first_purchase_ts = ts
    if ts > s.last_purchase_ts:
        s.last_purchase_ts = ts


def _apply_click(s: CustomerState, event: ClickEvent, day: int) -> None:
    s.events_total += 1
    if event.ts_ms > s.last_event_ts:
        s.last_event_ts = event.ts_ms
    bucket = s.cdays.get(day)
    if bucket is None:
        bucket = s.cdays[day] = [0, 0, 0, 0]
    bucket[_EV] += 1
    et = event.event_type
    if et == LOGIN:
        bucket[_LOGIN] += 1
    elif et == FEATURE_USE:
        bucket[_FEAT] += 1
    elif et == SUPPORT_TICKET:
        bucket[_TICKET] += 1
    if s.event_types.get(et, -1) < day:
        s.event_types[et] = day
    if event.session_id is not None:
        sh = id_hash(event.session_id)
        if s.sessions.get(sh, -1) < day:
            s.sessions[sh] = day


def id_horizon_ms(lateness_ms: int) -> int:
    """How far behind a customer's newest event of a topic its event ids are kept.

    An id first seen at ``t`` makes a duplicate of any later record with that id stamped
    up to ``t + lateness``, and such a record is still accepted while the newest event of
    its topic-partition is at most ``lateness`` past it: until ``t + 2 * lateness``. An id
    kept only ``lateness`` was forgotten while its duplicates could still arrive, and one
    arriving in a later batch was counted again (in the same batch it was not).

    >>> id_horizon_ms(7 * MS_PER_DAY) == 14 * MS_PER_DAY
    True
    """
    return 2 * lateness_ms


def _prune(s: CustomerState, lateness_ms: int) -> None:
    """Drop what no window and no late event can reach any more."""
    keep = retention_days(lateness_ms)
    if s.max_txn_ts >= 0:
        _prune_transactions(s, day_of(s.max_txn_ts) - keep + 1)
        floor = s.max_txn_ts - id_horizon_ms(lateness_ms)
        s.txn_ids = {k: t for k, t in s.txn_ids.items() if t >= floor}
    if s.last_event_ts >= 0:
        _prune_clicks(s, day_of(s.last_event_ts), keep, lateness_ms)


def _prune_transactions(s: CustomerState, oldest: int) -> None:
    first_pday = day_of(s.first_purchase_ts) if s.first_purchase_ts >= 0 else None
    for d in [d for d in s.pdays if d < oldest]:
        npur, spend = s.pdays.pop(d)
        if npur > 0:
            s.old_purchase_days += 1
            if d == first_pday:
                s.first_day_spend = spend
            else:
                s.old_pday_spend += spend


def _prune_clicks(s: CustomerState, top: int, keep: int, lateness_ms: int) -> None:
    oldest = top - keep + 1
    for d in [d for d in s.cdays if d < oldest]:
        del s.cdays[d]
    distinct_oldest = top - DISTINCT_WINDOW_DAYS + 1
    if s.sessions:
        s.sessions = {k: d for k, d in s.sessions.items() if d >= distinct_oldest}
    if s.event_types:
        s.event_types = {k: d for k, d in s.event_types.items() if d >= distinct_oldest}
    id_floor = s.last_event_ts - id_horizon_ms(lateness_ms)
    if s.seen_ids:
        s.seen_ids = {k: t for k, t in s.seen_ids.items() if t >= id_floor}


#: Timestamps below this convert exactly with integer arithmetic (see :func:`iso`).
_ISO_EXACT_MS = 2**33 * 1000
_HH_MM = tuple(f"{h:02d}:{m:02d}:" for h in range(24) for m in range(60))
_SS = tuple(f"{s:02d}." for s in range(60))
_MSZ = tuple(f"{ms:03d}Z" for ms in range(1000))


@functools.lru_cache(maxsize=4096)
def _iso_day(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, tz=UTC).strftime("%Y-%m-%dT")


def iso(ts_ms: int) -> str | None:
    """RFC 3339 UTC string of an epoch-millisecond timestamp, ``None`` for -1.

    >>> iso(0), iso(1_735_772_155_523)
    ('1970-01-01T00:00:00.000Z', '2025-01-01T22:55:55.523Z')
    """
    if ts_ms < 0:
        return None
    if ts_ms < _ISO_EXACT_MS:
        # Same digits as the datetime formatting below (which rounds to whole
        # microseconds, so exact milliseconds survive), for a fraction of the cost.
        day, ms = divmod(ts_ms, MS_PER_DAY)
        s, ms = divmod(ms, 1000)
        m, s = divmod(s, 60)
        return _iso_day(day) + _HH_MM[m] + _SS[s] + _MSZ[ms]
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_TREND_DX = tuple(x - (TREND_WEEKS - 1) / 2 for x in range(TREND_WEEKS))
_TREND_SXX = sum(dx**2 for dx in _TREND_DX)


def _trend(weeks: list[int]) -> float:
    """Least-squares slope of weekly event counts over the last 8 weeks (events/week)."""
    mean_y = sum(weeks) / TREND_WEEKS
    sxy = sum([dx * (y - mean_y) for dx, y in zip(_TREND_DX, weeks, strict=True)])
    return sxy / _TREND_SXX


def _purchase_features(s: CustomerState, today: int) -> dict[str, Any]:
    """Purchase counts and spend per trailing window, and the BG/NBD inputs, in one pass."""
    n7 = n30 = n90 = s7 = s30 = s90 = days = spend = 0
    for d, (npur, units) in s.pdays.items():
        if npur > 0:
            days += 1
            spend += units
        age = today - d
        if 0 <= age < 90:
            n90 += npur
            s90 += units
            if age < 30:
                n30 += npur
                s30 += units
                if age < 7:
                    n7 += npur
                    s7 += units
    f: dict[str, Any] = {
        "purchase_days": s.old_purchase_days + days,
        "monetary_total": from_units(s.monetary_units),
        "recency_days": today - day_of(s.last_purchase_ts) if s.last_purchase_ts >= 0 else None,
        "purchases_7d": n7, "spend_7d": from_units(s7),
        "purchases_30d": n30, "spend_30d": from_units(s30),
        "purchases_90d": n90, "spend_90d": from_units(s90),
    }
    f.update(_bgnbd(s, today, s.old_purchase_days + days, spend))
    return f


def _bgnbd(s: CustomerState, today: int, pdays: int, bucket_spend: int) -> dict[str, Any]:
    if s.first_purchase_ts < 0:
        return {"bgnbd_frequency": None, "bgnbd_recency": None, "bgnbd_T": None,
                "bgnbd_monetary": None}
    first_day = day_of(s.first_purchase_ts)
    repeat = pdays - 1
    spend_all = s.old_pday_spend + (s.first_day_spend or 0) + bucket_spend
    first_spend = s.first_day_spend
    if first_spend is None:
        first_spend = s.pdays[first_day][_SPEND]
    repeat_spend = spend_all - first_spend
    return {
        "bgnbd_frequency": repeat,
        "bgnbd_recency": day_of(s.last_purchase_ts) - first_day,
        "bgnbd_T": today - first_day,
        "bgnbd_monetary": from_units(repeat_spend) / repeat if repeat > 0 else 0.0,
    }


def purchase_days(s: CustomerState) -> int:
    """Distinct UTC days with at least one purchase."""
    return s.old_purchase_days + sum(1 for b in s.pdays.values() if b[_NPUR] > 0)


def _click_features(s: CustomerState, today: int) -> dict[str, Any]:
    """Clickstream counts per trailing window and the activity trend, in one pass."""
    e1 = e7 = e30 = a7 = a30 = l7 = l30 = uses = tickets = 0
    weeks = [0] * TREND_WEEKS
    span = TREND_WEEKS * 7
    for d, (ev, logins, feats, tix) in s.cdays.items():
        age = today - d
        if not 0 <= age < span:
            continue
        weeks[(span - 1 - age) // 7] += ev
        if age < 30:
            e30 += ev
            l30 += logins
            uses += feats
            tickets += tix
            a30 += ev > 0
            if age < 7:
                e7 += ev
                l7 += logins
                a7 += ev > 0
                if age < 1:
                    e1 += ev
    sess7 = sess30 = 0
    for d in s.sessions.values():
        age = today - d
        if 0 <= age < 30:
            sess30 += 1
            sess7 += age < 7
    lo30 = today - DISTINCT_WINDOW_DAYS + 1
    return {
        "last_event_at": iso(s.last_event_ts),
        "days_since_last_event": (today - day_of(s.last_event_ts)
                                  if s.last_event_ts >= 0 else None),
        "events_total": s.events_total,
        "events_1d": e1, "events_7d": e7, "events_30d": e30,
        "sessions_7d": sess7, "active_days_7d": a7, "logins_7d": l7,
        "sessions_30d": sess30, "active_days_30d": a30, "logins_30d": l30,
        "distinct_event_types_30d": sum(1 for d in s.event_types.values()
                                        if lo30 <= d <= today),
        "feature_uses_30d": uses,
        "support_tickets_30d": tickets,
        "activity_trend_8w": _trend(weeks),
    }


def derive(state: CustomerState, now_ms: int) -> dict[str, Any]:
    """Every contract feature of the customer at engine time ``now_ms``."""
    s = state
    today = day_of(now_ms)
    f: dict[str, Any] = {
        "first_seen_at": iso(s.first_seen_ts),
        "tenure_days": today - day_of(s.first_seen_ts) if s.first_seen_ts >= 0 else None,
        # transactions
        "first_purchase_at": iso(s.first_purchase_ts),
        "last_purchase_at": iso(s.last_purchase_ts),
        "purchases_total": s.purchases_total,
        "refunds_total": s.refunds_total,
    }
    f.update(_purchase_features(s, today))
    f.update(_click_features(s, today))
    return f


#: Names of every feature :func:`derive` produces, in order.
FEATURE_NAMES: tuple[str, ...] = tuple(derive(empty(), 0))


def last_activity_ts(state: CustomerState) -> int:
    """Timestamp of the customer's newest event of any kind, -1 if none."""
    return state.max_ts


def days_between(a_ms: int, b_ms: int) -> int:
    """Whole UTC days from the day of ``a_ms`` to the day of ``b_ms``."""
    return day_of(b_ms) - day_of(a_ms)


__all__ = [
    "FEATURE_NAMES",
    "MS_PER_DAY",
    "CustomerState",
    "apply",
    "apply_many",
    "apply_owned",
    "derive",
    "empty",
    "is_duplicate",
    "iso",
    "retention_days",
]
