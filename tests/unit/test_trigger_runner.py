"""The trigger consumer's handling of one record, against a real local HTTP server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.exceptions import ConnectionError as RedisConnectionError

from stream.errors import ServiceError
from stream.settings import load_settings
from stream.triggers import RetryPolicy, TriggerDeliveryError, TriggerRunner, seen_key

ACTION = {"action_id": "winback", "channel": "email", "holdout": False}


class Marks:
    """The two Redis calls the runner makes, kept in a dict (or failing)."""

    def __init__(self, fail: bool = False) -> None:
        self.keys: dict[str, bytes] = {}
        self.fail = fail

    async def exists(self, key: str) -> int:
        if self.fail:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1")
        return int(key in self.keys)

    async def set(self, key: str, value: bytes, **_: Any) -> bool:
        self.keys[key] = value
        return True


def record(doc: Any, offset: int = 0) -> Any:
    return SimpleNamespace(topic="migrations", partition=0, offset=offset,
                           value=orjson.dumps(doc))


def migration(mid: Any) -> dict[str, Any]:
    return {"migration_id": mid, "customer_id": "c1", "scheme": "rfm",
            "from_segment": "Loyal", "to_segment": "At Risk", "at": "x", "action": ACTION}


def serve(routes: Callable[[web.Application, list[tuple[str, str, bytes]]], None],
          body: Callable[[TriggerRunner, Marks], Awaitable[None]],
          marks: Marks | None = None) -> list[tuple[str, str, bytes]]:
    """Run ``body`` with a runner posting to a local server; returns the requests it got."""
    seen: list[tuple[str, str, bytes]] = []

    async def main() -> None:
        app = web.Application()
        routes(app, seen)
        async with TestServer(app) as server, aiohttp.ClientSession() as http:
            s = load_settings()
            m = marks or Marks()
            runner = TriggerRunner(s, str(server.make_url("/hook")), m, http,  # type: ignore[arg-type]
                                   RetryPolicy(3, 0.01, 0.02, 5.0), asyncio.Event(), 60)
            await body(runner, m)

    asyncio.run(main())
    return seen


def accepting(app: web.Application, seen: list[tuple[str, str, bytes]]) -> None:
    async def hook(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, await request.read()))
        return web.Response(status=200)

    app.router.add_route("*", "/hook", hook)


def test_a_redirect_is_not_followed_and_the_trigger_is_not_marked_sent() -> None:
    def routes(app: web.Application, seen: list[tuple[str, str, bytes]]) -> None:
        async def hook(request: web.Request) -> web.Response:
            seen.append((request.method, request.path, await request.read()))
            raise web.HTTPFound("/moved")

        async def moved(request: web.Request) -> web.Response:
            seen.append((request.method, request.path, await request.read()))
            return web.Response(status=200)

        app.router.add_route("*", "/hook", hook)
        app.router.add_route("*", "/moved", moved)

    async def body(runner: TriggerRunner, marks: Marks) -> None:
        with pytest.raises(TriggerDeliveryError, match=r"redirect.*final URL"):
            await runner.handle(record(migration("m1")))
        assert runner.stats.posted == 0 and not marks.keys

    seen = serve(routes, body)
    assert [(m, p) for m, p, _ in seen] == [("POST", "/hook")] * 3  # /moved never reached


@pytest.mark.parametrize("mid", ["bad\r\nX-Evil: 1", None, "", 42, "x" * 513, ["m"]])
def test_a_migration_id_that_cannot_be_a_header_or_key_is_skipped_as_malformed(mid: Any) -> None:
    async def body(runner: TriggerRunner, marks: Marks) -> None:
        await runner.handle(record(migration(mid), 0))
        await runner.handle(record(migration("ok-1"), 1))  # the partition goes on
        assert runner.stats.malformed == 1 and runner.stats.posted == 1
        assert list(marks.keys) == [seen_key(runner.settings, "ok-1")]

    seen = serve(accepting, body)
    assert len(seen) == 1 and orjson.loads(seen[0][2])["migration_id"] == "ok-1"


def test_two_migrations_without_an_id_are_not_taken_for_duplicates() -> None:
    async def body(runner: TriggerRunner, marks: Marks) -> None:
        for i in range(2):
            await runner.handle(record({**migration(None), "customer_id": f"c{i}"}, i))
        assert runner.stats.malformed == 2 and runner.stats.duplicates == 0

    serve(accepting, body)


def test_redis_failing_names_the_setting() -> None:
    async def body(runner: TriggerRunner, marks: Marks) -> None:
        with pytest.raises(ServiceError, match="SEGSTREAM_REDIS_URL"):
            await runner.handle(record(migration("m1")))

    assert serve(accepting, body, Marks(fail=True)) == []
