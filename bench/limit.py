"""L: the limit, a bare aiokafka ``getmany`` loop that JSON-decodes every record.

Nothing a Python consumer of these topics does can be cheaper than this, so it bounds
the engine's throughput on this broker and machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from bench.workload import aiokafka_config
from stream.settings import Settings

#: Records per ``getmany`` call of a large run.
MAX_RECORDS = 10_000


@dataclass(frozen=True)
class RateResult:
    """Records counted and the time from the first to the last batch."""

    count: int
    first_batch: int
    t_first: float
    t_last: float

    @property
    def eps(self) -> float:
        """Records after the first batch per second between first and last batch."""
        span = self.t_last - self.t_first
        return (self.count - self.first_batch) / span if span > 0 else 0.0


async def run_limit(s: Settings, expect: int, timeout: float = 600.0, progress: Any = None
                    ) -> RateResult:
    """Consume both input topics from the start in a fresh group until ``expect`` records."""
    consumer = AIOKafkaConsumer(
        *s.input_topics, **aiokafka_config(s), group_id=s.app_id,
        auto_offset_reset="earliest", enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 2**20, fetch_max_bytes=64 * 2**20,
    )
    await consumer.start()
    count = first_batch = 0
    t_first = t_last = 0.0
    # The rate is timed from the first batch to the last, so the first batch is not in
    # it: for a small run, smaller batches (about twenty of them) keep one batch from
    # holding every record and leaving nothing timed.
    max_records = max(1, min(MAX_RECORDS, expect // 20))
    deadline = time.monotonic() + timeout
    try:
        while count < expect and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=max_records)
            n = 0
            for recs in batches.values():
                for rec in recs:
                    orjson.loads(rec.value)
                n += len(recs)
            if not n:
                continue
            now = time.perf_counter()
            if count == 0:
                first_batch, t_first = n, now
            count += n
            t_last = now
            if progress is not None:
                progress(count)
    finally:
        await consumer.stop()
    if count < expect:
        raise TimeoutError(f"limit consumer saw {count} of {expect} records in {timeout:.0f}s")
    return RateResult(count, first_batch, t_first, t_last)
