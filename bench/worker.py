"""``segstream worker`` with client-side Redis counters, for the benchmark.

Run as ``python -m bench.worker``: it counts, in every redis-py connection of the
process, the commands packed (a pipeline of n commands counts n) and the round
trips (one ``send_packed_command`` per command or per pipeline, each followed by
waiting for the replies), writes both to ``BENCH_COUNTERS`` every 100 ms, then runs
the unchanged ``segstream worker`` command. The server's ``INFO`` counters cannot
tell round trips apart from pipelined commands and include every other client of
a shared Redis; these counters count exactly this worker's traffic.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

COUNTS = {"roundtrips": 0, "commands": 0}


def _count(key: str, fn: Any) -> Any:
    if getattr(fn, "_bench_counted", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        COUNTS[key] += 1
        return fn(*args, **kwargs)

    wrapper._bench_counted = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    """Count commands and round trips of the sync and asyncio redis-py connections."""
    import redis.asyncio.connection as aconn
    import redis.connection as sconn

    for cls in (aconn.AbstractConnection, sconn.AbstractConnection):
        # send_packed_command is a coroutine function in the asyncio client; wrapping the
        # call (not the await) still counts one per round trip.
        cls.send_packed_command = _count("roundtrips", cls.send_packed_command)  # type: ignore[method-assign]
        cls.pack_command = _count("commands", cls.pack_command)  # type: ignore[method-assign]


def _writer(path: Path, every_s: float = 0.1) -> None:
    tmp = path.with_suffix(".tmp")
    while True:
        tmp.write_bytes(orjson.dumps({**COUNTS, "t": time.time()}))
        tmp.replace(path)
        time.sleep(every_s)


def main() -> None:
    path = os.environ.get("BENCH_COUNTERS")
    if path:
        install()
        threading.Thread(target=_writer, args=(Path(path),), daemon=True,
                         name="bench-counters").start()
    from stream.cli import main as cli_main

    sys.argv = ["segstream", "worker"]
    cli_main()


if __name__ == "__main__":
    main()
