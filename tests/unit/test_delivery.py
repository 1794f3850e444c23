"""Eager delivery of fetched records: same outcomes as ``wait_first``, no task per record."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from mode import Service

from stream.app import LeanApp
from stream.delivery import Delivery, EagerDelivery


class Consumer(EagerDelivery, Service):
    """A ``mode`` service with the consumer's ``wait_first``."""


@pytest.fixture
def tasks_made(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every task ``mode``'s ``wait_first`` makes."""
    made: list[Any] = []
    real = asyncio.ensure_future

    def counting(coro: Any, **kw: Any) -> Any:
        made.append(coro)
        return real(coro, **kw)

    monkeypatch.setattr(asyncio, "ensure_future", counting)
    yield made


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def start_waiting(deliver: Callable[[asyncio.Future[None]], Coroutine[Any, Any, Any]]
                  ) -> tuple[asyncio.Future[None], asyncio.Event, asyncio.Future[Any]]:
    """``deliver(room)`` handed over by the consumer while the stream has no room yet.

    Returns the room (set it to make room), the flow's suspend event and the pending
    ``wait_first``."""
    room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    suspend = asyncio.Event()
    waiting = asyncio.ensure_future(Consumer().wait_first(Delivery(deliver(room)),
                                                          suspend.wait()))
    return room, suspend, waiting


def test_a_delivery_that_does_not_wait_makes_no_task(tasks_made: list[Any]) -> None:
    trace: list[str] = []

    async def deliver() -> int:
        trace.append("delivered")
        return 7

    async def main() -> Any:
        flow = asyncio.Event()
        suspend = flow.wait()
        got = await Consumer().wait_first(Delivery(deliver()), suspend)
        return got, suspend

    got, suspend = run(main())
    assert trace == ["delivered"]
    assert got.results == [7] and not got.stopped
    assert tasks_made == []
    assert inspect.getcoroutinestate(suspend) == inspect.CORO_CLOSED  # no "never awaited"


def test_a_delivery_that_waits_finishes_as_a_task() -> None:
    trace: list[str] = []

    async def deliver(room: asyncio.Future[None]) -> str:
        trace.append("first step")
        await room  # a full queue
        trace.append("after room")
        return "done"

    async def main() -> Any:
        room, _, waiting = start_waiting(deliver)
        await asyncio.sleep(0.01)
        assert trace == ["first step"] and not waiting.done()
        room.set_result(None)
        return await waiting

    got = run(main())
    assert trace == ["first step", "after room"]
    assert got.results == ["done"] and not got.stopped


def test_a_waiting_delivery_is_cancelled_when_the_flow_is_suspended() -> None:
    trace: list[str] = []

    async def deliver(room: asyncio.Future[None]) -> None:
        try:
            await room
            trace.append("delivered")
        except asyncio.CancelledError:
            trace.append("cancelled")
            raise

    async def main() -> Any:
        room, suspend, waiting = start_waiting(deliver)
        await asyncio.sleep(0.01)
        suspend.set()  # a rebalance
        got = await waiting
        await asyncio.sleep(0.01)
        return got, room

    got, room = run(main())
    assert trace == ["cancelled"]
    assert room.cancelled()
    assert got.results == [True]  # the suspend event won, as with mode's wait_first


def test_errors_propagate_before_and_after_waiting() -> None:
    async def at_once() -> None:
        raise ValueError("undecodable")

    async def later(room: asyncio.Future[None]) -> None:
        await room
        raise KeyError("later")

    async def main() -> None:
        with pytest.raises(ValueError, match="undecodable"):
            await Consumer().wait_first(Delivery(at_once()), asyncio.Event().wait())
        room, _, waiting = start_waiting(later)
        await asyncio.sleep(0)
        room.set_result(None)
        with pytest.raises(KeyError, match="later"):
            await waiting

    run(main())


def test_a_stopped_consumer_reports_stopped() -> None:
    async def deliver() -> int:
        return 1

    async def main() -> Any:
        c = Consumer()
        c._stopped.set()
        return await c.wait_first(Delivery(deliver()), asyncio.Event().wait())

    assert run(main()).stopped


def test_other_waits_keep_mode_behaviour(tasks_made: list[Any]) -> None:
    async def plain() -> int:
        return 3

    got = run(Consumer().wait_first(plain()))
    assert got.results == [3]
    assert tasks_made  # not a Delivery: mode's own path


def test_the_worker_consumer_delivers_eagerly() -> None:
    async def build() -> Any:
        app = LeanApp("delivery-test", broker="kafka://127.0.0.1:1", store="memory://",
                      autodiscover=False, web_enabled=False)
        return app.consumer

    consumer = run(build())
    assert isinstance(consumer, EagerDelivery)
    d = consumer.callback(object())
    assert isinstance(d, Delivery)
    d.coro.close()
