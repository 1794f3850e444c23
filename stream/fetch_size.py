"""The worker's ``fetch.min.bytes``, following its input rate.

With Kafka's default of one byte the broker answers a fetch as soon as one new record is
there, and the consumer sends the next fetch at once: at 5,000 events/s in ``segstream bench``
a worker fetched a few dozen records at a time, and the round trips cost its consumer thread
about 0.14 of a core and the broker about 0.2. Asking the broker to hold a fetch until about
``SEGSTREAM_KAFKA_FETCH_COALESCE_MS`` of input is there gathers more records per fetch at the
price of up to that much latency; the broker never holds a fetch longer than
``SEGSTREAM_KAFKA_FETCH_MAX_WAIT_MS``, which therefore bounds what a wrong estimate costs.
Off by default: at 20 ms the benchmark's worker spent about an eighth less CPU at 5,000
events/s, but the p99 latency did not fall (README, "Fewer, fuller fetches").

The estimate counts the fetched records' value bytes, uncompressed, over windows of
``WINDOW_S``; the broker counts stored bytes, which for compressed input are fewer, so such
input waits longer than the target (never past the maximum wait). A fetch goes to each
broker leading some of the worker's input partitions and counts that broker's bytes only,
so the estimate is divided among them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Seconds over which the input's bytes are counted before the minimum is set again.
WINDOW_S = 0.5
#: Weight of the latest window in the running rate: after input stops, the minimum halves
#: every window's time.
RATE_WEIGHT = 0.5
#: The largest minimum asked for: below the consumer's per-partition fetch size (1 MiB), so
#: a fetch can always be answered in full.
MAX_MIN_BYTES = 512 * 1024


class FetchSizer:
    """The ``fetch.min.bytes`` for a coalescing time, from the bytes fetched lately."""

    def __init__(self, coalesce_ms: int, clock: Callable[[], float] = time.monotonic) -> None:
        if coalesce_ms < 0:
            raise ValueError("coalesce_ms must be >= 0")
        self.coalesce_s = coalesce_ms / 1000
        self.clock = clock
        #: the minimum to ask for now (1: answer at the first record)
        self.min_bytes = 1
        #: the running input rate, bytes per second
        self.rate = 0.0
        self._bytes = 0
        self._since = clock()
        self._first = True

    def observe(self, nbytes: int, brokers: Callable[[], int] = lambda: 1) -> bool:
        """Count ``nbytes`` of input just fetched (0 for a fetch that returned nothing).
        ``brokers`` tells, when a window ends, how many brokers the worker's input comes
        from. True when :attr:`min_bytes` changed."""
        self._bytes += nbytes
        now = self.clock()
        elapsed = now - self._since
        if elapsed < WINDOW_S or self.coalesce_s <= 0:
            return False
        rate = self._bytes / elapsed
        # A window stretched by a pause weighs as the windows it spans would have.
        w = 1.0 if self._first else 1.0 - (1.0 - RATE_WEIGHT) ** (elapsed / WINDOW_S)
        self.rate = w * rate + (1.0 - w) * self.rate
        self._first = False
        self._bytes, self._since = 0, now
        new = max(1, min(MAX_MIN_BYTES, int(self.rate * self.coalesce_s / max(1, brokers()))))
        changed = new != self.min_bytes
        self.min_bytes = new
        return changed
