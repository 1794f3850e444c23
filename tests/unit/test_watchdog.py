"""The event loop watchdog: lag measured, and a held loop's stacks written out."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from stream.watchdog import LoopWatchdog


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # blocking on purpose: nothing else on the loop runs meanwhile


async def _watch(dog: LoopWatchdog, body: float, hold: float = 0.0) -> None:
    task = asyncio.ensure_future(dog.run())
    await asyncio.sleep(body / 2)
    if hold:
        _hold_the_loop(hold)
    await asyncio.sleep(body / 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_lag_is_measured_and_a_held_loop_shows_as_one_late_wake_up(tmp_path: Path) -> None:
    lags: list[float] = []
    with open(tmp_path / "stacks", "w+") as f:
        dog = LoopWatchdog(lags.append, interval_s=0.02, stall_s=5.0, file=f)
        asyncio.run(_watch(dog, body=0.4, hold=0.3))
    assert len(lags) >= 5
    assert 0.25 <= max(lags) < 1.0, lags  # the held loop, 0.3 s
    assert sorted(lags)[len(lags) // 2] < 0.2, lags  # otherwise about on time
    assert all(x >= 0 for x in lags)


def test_a_loop_held_past_the_stall_time_writes_every_threads_stack(tmp_path: Path) -> None:
    path = tmp_path / "stacks"
    with open(path, "w+") as f:
        dog = LoopWatchdog(lambda _: None, interval_s=0.02, stall_s=0.3, file=f)
        asyncio.run(_watch(dog, body=0.2, hold=0.8))
    text = path.read_text()
    assert "_hold_the_loop" in text and "test_watchdog.py" in text, text


def test_a_responsive_loop_writes_nothing_and_cancelling_disarms_the_timer(
        tmp_path: Path) -> None:
    path = tmp_path / "stacks"
    with open(path, "w+") as f:
        dog = LoopWatchdog(lambda _: None, interval_s=0.02, stall_s=1.0, file=f)
        asyncio.run(_watch(dog, body=2.5))  # far longer than stall_s, the loop turning
        _hold_the_loop(1.5)  # past stall_s, with the watchdog gone
    assert path.read_text() == ""


@pytest.mark.parametrize("interval_s,stall_s", [(0, 1), (-1, 1), (1, 1), (2, 1)])
def test_settings_that_cannot_work_are_refused(interval_s: float, stall_s: float) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        LoopWatchdog(lambda _: None, interval_s=interval_s, stall_s=stall_s)


class _NoDescriptor:
    def fileno(self) -> int:
        raise NotImplementedError("a logging proxy")


def test_a_log_without_a_file_descriptor_still_gets_the_lag_measured() -> None:
    lags: list[float] = []
    dog = LoopWatchdog(lags.append, interval_s=0.02, stall_s=5.0,
                       file=_NoDescriptor())  # type: ignore[arg-type]
    asyncio.run(_watch(dog, body=0.2))
    assert len(lags) >= 3
