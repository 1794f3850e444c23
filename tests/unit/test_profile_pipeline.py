"""The offline pipeline benchmark feeds every record through and digests what it wrote."""

import asyncio

from bench import profile_pipeline as pp
from bench import workload as wl
from stream.settings import Settings


def test_backlog_batches_keep_every_record_once_in_offset_order() -> None:
    s = Settings()
    w = wl.build(2_000, 200, 3, s.partitions)
    batches, nxt = pp.backlog_batches(w, s, 300)
    seen: dict[tuple[str, int], list[int]] = {}
    for b in batches:
        assert 0 < len(b) <= 300
        for r in b:
            seen.setdefault((r.topic, r.partition), []).append(r.offset)
    assert sum(len(v) for v in seen.values()) == w.events
    for key, offsets in seen.items():
        assert offsets == list(range(len(offsets)))
        assert nxt[key] == len(offsets)


def test_backlog_is_applied_whole_and_digest_tracks_the_output() -> None:
    a = asyncio.run(pp.run(3_000, 300, seed=1, models=False))
    b = asyncio.run(pp.run(3_000, 300, seed=1, models=False))
    c = asyncio.run(pp.run(3_000, 300, seed=2, models=False))
    assert a.events == 3_000 and a.dead_letters == 0
    assert a.applied == a.events  # nothing dropped, nothing below a watermark
    assert a.migrations > 0 and a.published >= a.migrations
    assert a.digest == b.digest  # deterministic: usable to compare two code versions
    assert c.digest != a.digest


def test_live_events_continue_the_backlog_offsets_and_move_few_customers() -> None:
    backlog = asyncio.run(pp.run(3_000, 300, seed=1))
    live = asyncio.run(pp.run(3_000, 300, seed=1, live=2_000, warm=1_000, live_batch=50))
    assert live.workload == "live" and live.events == 2_000 and live.batches == 40
    # Offsets after the backlog's: a restart at 0 would be skipped as below the watermark.
    assert live.applied == 2_000 and live.dead_letters == 0
    # Event time at the wall clock's pace moves far fewer customers per event.
    assert live.migrations / live.events < backlog.migrations / backlog.events / 4
