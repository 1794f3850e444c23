"""Handing fetched records to the streams without four tasks per record.

Faust's consumer delivers every fetched record with
``await self.wait_first(callback(message), self.suspend_flow.wait())``: the
conductor's callback puts the record's event into each subscribed stream's queue,
and ``wait_first`` lets a rebalance (which sets ``suspend_flow``) or a stop
interrupt a delivery that waits for room in a full queue. ``mode``'s
``wait_first`` makes a task of each of its arguments and of the service's
stopped and crashed events, waits for the first, and cancels the other three:
four tasks and an ``asyncio.wait`` per record, although a delivery almost always
completes without waiting at all.

:class:`EagerDelivery` runs the callback's first step at once, in the consumer's
own task. When it completes there (room in the queue, flow not suspended), that
is the record delivered: the same outcome ``wait_first`` reports, without a task.
Only a delivery that has to wait goes on, from where it stopped, as a task that
``wait_first`` races against the rebalance and the stop exactly as before.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any

from mode.services import WaitResults


class Delivery(Awaitable[Any]):
    """One record's hand-over to the conductor (the consumer's callback, not yet run)."""

    __slots__ = ("coro",)

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro

    def __await__(self) -> Generator[Any, None, Any]:
        return self.coro.__await__()


async def resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Finish a coroutine that was stepped by hand and suspended on ``yielded``.

    Does what an asyncio task does between two steps: waits for the future the
    coroutine is blocked on (one loop turn for a bare ``yield``), then resumes it;
    when this task is cancelled, cancels that future so the coroutine sees the
    ``CancelledError`` at its ``await``.
    """
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                await asyncio.wait([yielded])
        except asyncio.CancelledError:
            if yielded is None:  # nothing to cancel: raise it at the bare yield
                try:
                    yielded = coro.throw(asyncio.CancelledError())
                except StopIteration as done:
                    return done.value
                continue
            yielded.cancel()  # the coroutine sees the cancellation at its await
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            return done.value


def _close(awaitables: tuple[Any, ...]) -> None:
    for a in awaitables:
        if inspect.iscoroutine(a):
            a.close()  # never started: nothing to clean up, and no "never awaited" warning


class EagerDelivery:
    """Mixin for a ``mode`` service (Faust's consumer) whose callback returns a
    :class:`Delivery`; every other ``wait_first`` call is left as it was."""

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        parent: Any = super()
        if not coros or not isinstance(coros[0], Delivery):
            return await parent.wait_first(*coros, timeout=timeout)  # type: ignore[no-any-return]
        first, rest = coros[0], coros[1:]
        try:
            yielded = first.coro.send(None)
        except StopIteration as done:
            _close(rest)
            if self._stopped.is_set() or self._crashed.is_set():  # type: ignore[attr-defined]
                return WaitResults([], [], True)
            return WaitResults([first], [done.value], False)
        except BaseException:
            _close(rest)
            raise
        return await parent.wait_first(  # type: ignore[no-any-return]
            resume(first.coro, yielded), *rest, timeout=timeout)
