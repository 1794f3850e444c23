"""The benchmark's input lies in the past, where the engine accepts it."""

from __future__ import annotations

import orjson
import pytest

from bench import workload as wl
from stream import synthetic
from stream.errors import SegstreamError

NOW_MS = 1_796_000_000_000  # 2026-11-30


def _events(w: wl.Workload) -> list[dict[str, object]]:
    return [orjson.loads(v) for recs in w.records.values() for _, v in recs]


def test_a_short_period_starts_where_it_always_did() -> None:
    w = wl.build(2_000, 400, 3, 6, now_ms=NOW_MS)
    assert w.min_ts >= synthetic.DEFAULT_START_MS
    assert w.max_ts <= NOW_MS - wl.PAST_MARGIN_MS


def test_many_events_per_customer_are_moved_back_by_whole_weeks_not_into_the_future() -> None:
    # 600 events per customer take about ten years of synthetic time: from the default
    # start they reached years past the wall clock, and the engine dead-letters an event
    # more than five minutes ahead of it (from_future).
    later = wl.build(3_000, 5, 0, 6, now_ms=NOW_MS + 20 * 365 * wl.DAY_MS)
    w = wl.build(3_000, 5, 0, 6, now_ms=NOW_MS)
    assert later.min_ts == pytest.approx(synthetic.DEFAULT_START_MS, abs=wl.DAY_MS)
    assert later.max_ts > NOW_MS, "the case needs a period reaching past NOW_MS"
    got = _events(w)
    assert all(0 <= e["ts"] <= NOW_MS - wl.PAST_MARGIN_MS for e in got)  # type: ignore[operator]
    assert len(got) == w.events == 3_000
    # the same events, every one shifted by the same whole number of weeks
    shifts = {e1["ts"] - e0["ts"]  # type: ignore[operator]
              for e0, e1 in zip(_events(later), got, strict=True)}
    assert len(shifts) == 1
    (shift,) = shifts
    assert shift < 0 and shift % wl.WEEK_MS == 0
    strip = [{k: v for k, v in e.items() if k != "ts"} for e in got]
    assert strip == [{k: v for k, v in e.items() if k != "ts"} for e in _events(later)]


def test_a_period_longer_than_the_epoch_is_refused_naming_the_options() -> None:
    with pytest.raises(SegstreamError, match=r"--events 5,000 over --customers 1\b"):
        wl.build(5_000, 1, 0, 6, now_ms=NOW_MS)
