"""``segstream worker`` with client-side Redis counters, for the benchmark.

Run as ``python -m bench.worker``: it counts, in every redis-py connection of the
process, the commands packed (a pipeline of n commands counts n) and the round
trips (one ``send_packed_command`` per command or per pipeline, each followed by
waiting for the replies) into the memory-mapped file ``BENCH_COUNTERS`` (two
little-endian uint64: round trips, commands; see :func:`read`), then runs the
unchanged ``segstream worker`` command. Counting costs a few hundred nanoseconds a
round trip and no thread. The server's ``INFO`` counters cannot
tell round trips apart from pipelined commands and include every other client of
a shared Redis; these counters count exactly this worker's traffic.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any

_FMT = "<QQ"
_COUNTS = [0, 0]  # round trips, commands
_MAP: mmap.mmap | None = None


def read(path: Path) -> tuple[int, int]:
    """(round trips, commands) counted so far by the worker writing ``path``."""
    rt, cmds = struct.unpack(_FMT, path.read_bytes()[:16])
    return int(rt), int(cmds)


def _count(slot: int, fn: Any) -> Any:
    if getattr(fn, "_bench_counted", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _COUNTS[slot] += 1
        if _MAP is not None:
            struct.pack_into("<Q", _MAP, 8 * slot, _COUNTS[slot])
        return fn(*args, **kwargs)

    wrapper._bench_counted = True  # type: ignore[attr-defined]
    return wrapper


def install(path: Path) -> None:
    """Count commands and round trips of the sync and asyncio redis-py connections."""
    global _MAP
    import redis.asyncio.connection as aconn
    import redis.connection as sconn

    with open(path, "w+b") as fh:
        fh.write(bytes(16))
        fh.flush()
        _MAP = mmap.mmap(fh.fileno(), 16)
    for cls in (aconn.AbstractConnection, sconn.AbstractConnection):
        # send_packed_command is a coroutine function in the asyncio client; wrapping the
        # call (not the await) still counts one per round trip.
        cls.send_packed_command = _count(0, cls.send_packed_command)  # type: ignore[method-assign]
        cls.pack_command = _count(1, cls.pack_command)  # type: ignore[method-assign]
    # The engine's asyncio connections pack with hiredis (stream.redisconn); count those
    # too (a command hiredis hands back to redis-py's packer counts twice: rare).
    from stream import redisconn

    packing = redisconn._HiredisPacking
    packing.pack_command = _count(1, packing.pack_command)  # type: ignore[method-assign]


def main() -> None:
    path = os.environ.get("BENCH_COUNTERS")
    if path:
        install(Path(path))
    from stream.cli import main as cli_main

    sys.argv = ["segstream", "worker"]
    cli_main()


if __name__ == "__main__":
    main()
