"""The benchmark's live events: event time that keeps pace with the wall clock."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.workload import at_wall_pace, live_records
from stream import synthetic


def test_event_time_advances_as_fast_as_the_records_are_sent() -> None:
    recs = live_records(3000, 300, seed=3, start_ms=synthetic.DEFAULT_START_MS, partitions=6)
    # The generator's own pace: thousands of events span days of event time.
    ts = [orjson.loads(r.value)["ts"] for r in recs]
    assert ts[-1] - ts[0] > 86_400_000

    start = ts[-1] + 1
    paced, after = at_wall_pace(recs, start, rate=1000.0)
    paced_ts = [orjson.loads(r.value)["ts"] for r in paced]
    # 3,000 records at 1,000/s are sent over 3 s, and so span 3 s of event time.
    assert paced_ts[0] == start
    assert paced_ts[-1] - paced_ts[0] == 2999
    assert paced_ts == sorted(paced_ts)
    assert after > paced_ts[-1]
    # Only the event time changes: same customers, ids, kinds, partitions, fields.
    for a, b in zip(recs, paced, strict=True):
        ea, eb = orjson.loads(a.value), orjson.loads(b.value)
        assert (a.kind, a.partition, a.key) == (b.kind, b.partition, b.key)
        assert {k: v for k, v in ea.items() if k != "ts"} == \
            {k: v for k, v in eb.items() if k != "ts"}


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 400), rate=st.floats(1.0, 50_000.0),
       start=st.integers(0, 2**42))
def test_paced_times_match_the_send_schedule(n: int, rate: float, start: int) -> None:
    recs = live_records(n, 50, seed=1, start_ms=synthetic.DEFAULT_START_MS, partitions=3)
    paced, after = at_wall_pace(recs, start, rate)
    ts = [orjson.loads(r.value)["ts"] for r in paced]
    for i, t in enumerate(ts):
        # record i is sent i / rate seconds after the first
        assert abs(t - (start + i * 1000.0 / rate)) <= 1.0
    assert ts == sorted(ts)
    # The next phase continues after this one, never overlapping it.
    assert after > ts[-1]
    paced2, _ = at_wall_pace(recs, after, rate)
    assert orjson.loads(paced2[0].value)["ts"] > ts[-1]
