"""The worker's event loop, watched: how late it runs a timer, and a stack dump when it stops.

Everything the worker does (fetch hand-off, micro-batches, commits, rebalances, ``/metrics``)
runs on one event loop, so code that holds the loop without suspending stalls all of it,
and a stalled worker also stops answering ``/metrics`` and ``/healthz``. :class:`LoopWatchdog`
makes both visible:

* every ``interval_s`` it sleeps on the loop and records how much later than asked it woke
  (``segstream_event_loop_lag_seconds``): a busy but healthy worker shows milliseconds;
* before each sleep it re-arms :func:`faulthandler.dump_traceback_later`, whose timer runs in
  a thread of the interpreter's own: if the loop has not turned for ``stall_s``, every
  thread's Python stack is written to the worker's log, showing what holds the loop.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys
from collections.abc import Callable
from typing import IO, Any

log = logging.getLogger(__name__)

#: How often the loop is checked.
INTERVAL_S = 0.5
#: After this long without a turn of the loop, the stacks of every thread go to the log.
STALL_S = 30.0


class LoopWatchdog:
    """Measures the event loop's lag and dumps the stacks of a stalled one.

    ``observe(lag_s)`` receives each measured lag; ``file`` is where a stall's stacks are
    written (it needs a real file descriptor: the worker's stderr, which is its log).
    """

    def __init__(self, observe: Callable[[float], None], *, interval_s: float = INTERVAL_S,
                 stall_s: float = STALL_S, file: IO[Any] | None = None) -> None:
        if interval_s <= 0 or stall_s <= interval_s:
            raise ValueError("the watchdog needs 0 < interval_s < stall_s")
        self.observe = observe
        self.interval_s = interval_s
        self.stall_s = stall_s
        self.file = file if file is not None else sys.stderr

    async def run(self) -> None:
        """Watch until cancelled (the timer is disarmed when this returns)."""
        loop = asyncio.get_running_loop()
        dump = True
        try:
            while True:
                if dump:
                    try:
                        faulthandler.dump_traceback_later(self.stall_s, file=self.file)
                    except (AttributeError, OSError, ValueError, NotImplementedError) as exc:
                        # e.g. a stderr replaced by an object without a file descriptor
                        log.warning("no stack dump of a stalled event loop: %r", exc)
                        dump = False
                asked = loop.time() + self.interval_s
                await asyncio.sleep(self.interval_s)
                self.observe(max(0.0, loop.time() - asked))
        finally:
            faulthandler.cancel_dump_traceback_later()
