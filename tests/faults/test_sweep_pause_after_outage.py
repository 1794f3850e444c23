"""A sweep step that waited out a broker (or Redis) outage stalls the sweep ninefold.

While input keeps arriving, ``Sweeper.run_pass`` pauses after each step for
``t * (1 - share) / share`` where ``t`` is the step's *wall-clock* time
(``stream/sweep.py``, ``pause_after``). A step's wall time includes waiting for the
outbox publish of its migrations (``flush_outbox``) and for Redis: when the broker is
frozen or down for T seconds during a step, the pass then sleeps 9 T (default
``SEGSTREAM_SWEEP_MAX_SHARE=0.1``) before its next step, although the step used almost
no worker time. Observed on a real worker after a 100 s broker SIGSTOP: the sweep task sat
in ``asyncio.sleep(404 s)`` (``run_pass``, sweep.py:98) while input kept arriving, so
silent customers' time-driven migrations and ``segstream wait`` were held back ~7
minutes after the broker was back; a 10-minute outage would hold them 90 minutes.

Here, on the in-memory twins: the first sweep step's publish blocks for 2 s (a broker that
does not answer), input is arriving (``busy``), share 0.1. The pass must not then sleep
~18 s: the pacing is about the worker's time the sweep takes, not about outages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import orjson

from features.store import MemoryFeatureStore
from scorers.rules import default_catalogue
from stream.pipeline import BatchProcessor, RawRecord
from stream.runtime import StaticScoring
from stream.settings import load_settings
from stream.sweep import Sweeper

DAY = 86_400_000
T0 = 1_735_689_600_000
WALL = (T0 + 3 * 365 * DAY) / 1000
OUTAGE_S = 2.0


class StallingSink:
    """A publisher whose first publish after ``stall()`` hangs like a frozen broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.stall_next = False

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        if self.stall_next:
            self.stall_next = False
            await asyncio.sleep(OUTAGE_S)
        self.sent.extend(records)


def test_a_sweep_step_that_waited_for_an_outage_does_not_stall_the_pass() -> None:
    s = load_settings(partitions=1)
    store, sink = MemoryFeatureStore(), StallingSink()
    scoring = StaticScoring(s, store, default_catalogue(), clock=lambda: WALL)
    p = BatchProcessor(s, store, sink, clock=lambda: WALL, scoring=scoring)
    recs = []
    for i in range(120):
        ev = {"event_id": f"e{i}", "customer_id": f"c{i}", "ts": T0 + i, "amount": 10.0}
        recs.append(RawRecord("transactions", 0, i, f"c{i}".encode(), orjson.dumps(ev)))
    # one silent-customer event 60 days later: every customer's recency changes
    late = {"event_id": "late", "customer_id": "c0", "ts": T0 + 60 * DAY, "amount": 1.0}

    async def run() -> float:
        await p.process(recs)
        await p.process([RawRecord("transactions", 0, 120, b"c0", orjson.dumps(late))])
        sweeper = Sweeper(p, scoring, store, asyncio.Lock(), busy=lambda: True,
                          max_share=0.1)
        sink.stall_next = True  # the broker freezes during the first step's publish
        t0 = time.perf_counter()
        stats = await asyncio.wait_for(sweeper.run_pass([0]), 60)
        assert stats.migrations > 0, "the sweep moved nobody; nothing was tested"
        return time.perf_counter() - t0

    took = asyncio.run(run())
    # The outage itself (2 s) plus pacing of the real work; not 9 x the outage.
    assert took < OUTAGE_S + 6, f"the sweep pass took {took:.1f}s after a {OUTAGE_S}s outage"
