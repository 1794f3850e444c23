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

from scorers.labels import customer_hash
from stream.errors import ServiceError
from stream.settings import load_settings
from stream.triggers import (
    RetryPolicy,
    TriggerDeliveryError,
    TriggerRunner,
    _Stopped,
    check_webhook_url,
    forgotten_key,
    seen_key,
    shown_url,
)

ACTION = {"action_id": "winback", "channel": "email", "holdout": False}


class Marks:
    """The two Redis calls the runner makes, kept in a dict (or failing: for good, or for
    the next ``blips`` calls)."""

    def __init__(self, fail: bool = False, blips: int = 0) -> None:
        self.keys: dict[str, bytes] = {}
        self.fail = fail
        self.blips = blips

    def _check(self) -> None:
        if self.fail or self.blips > 0:
            self.blips -= 1
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1")

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        self._check()
        return [self.keys.get(k) for k in keys]

    async def set(self, key: str, value: bytes, **_: Any) -> bool:
        self._check()
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


def hanging(app: web.Application, seen: list[tuple[str, str, bytes]]) -> None:
    """A webhook that takes the request and answers only after 30 s."""
    async def hook(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, await request.read()))
        await asyncio.sleep(30)
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
        assert list(marks.keys) == [seen_key(runner.settings, runner.group, "ok-1")]

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


def test_a_redis_blip_is_retried_not_a_stop() -> None:
    """A Redis restart of half a second stopped the consumer (exit 1): the read and the
    mark are retried with the webhook's backoff, and the run goes on."""
    async def body(runner: TriggerRunner, marks: Marks) -> None:
        await runner.handle(record(migration("m1"), 0))  # the read fails twice
        marks.blips = 2
        await runner.handle(record(migration("m2"), 1))
        assert runner.stats.posted == 2 and len(marks.keys) == 2

    seen = serve(accepting, body, Marks(blips=2))
    assert [orjson.loads(b)["migration_id"] for _, _, b in seen] == ["m1", "m2"]


def test_a_rejected_migration_is_marked_and_not_posted_again() -> None:
    """After a crash, every rejection since the last offset commit used to be posted
    again: a rejection is now marked like a delivery."""
    def rejecting(app: web.Application, seen: list[tuple[str, str, bytes]]) -> None:
        async def hook(request: web.Request) -> web.Response:
            seen.append((request.method, request.path, await request.read()))
            return web.Response(status=422)

        app.router.add_route("*", "/hook", hook)

    async def body(runner: TriggerRunner, marks: Marks) -> None:
        await runner.handle(record(migration("m1"), 0))
        await runner.handle(record(migration("m1"), 0))  # read again after a crash
        assert (runner.stats.rejected, runner.stats.duplicates) == (1, 1)
        assert marks.keys == {seen_key(runner.settings, runner.group, "m1"): b"rejected"}

    assert len(serve(rejecting, body)) == 1


def test_each_group_keeps_its_own_marks() -> None:
    """Two trigger consumers with their own --group (one per downstream system) each post
    every migration: one's marks do not make the other skip it."""
    async def body(runner: TriggerRunner, marks: Marks) -> None:
        await runner.handle(record(migration("m1")))
        runner.group = "crm-triggers"
        await runner.handle(record(migration("m1")))
        await runner.handle(record(migration("m1")))
        assert (runner.stats.posted, runner.stats.duplicates) == (2, 1)

    assert len(serve(accepting, body)) == 2


def test_migrations_emitted_before_the_customer_was_forgotten_are_not_posted() -> None:
    """stream/forget.py: downstream consumers forget the customer too. A consumer behind
    the erase reads the customer's earlier migrations after it: none is posted; one
    emitted after the erase (the customer came back) is."""
    def mig(mid: str, emitted: str) -> dict[str, Any]:
        return {**migration(mid), "customer_id": "zed@example.com", "emitted_at": emitted}

    async def body(runner: TriggerRunner, marks: Marks) -> None:
        erased = 1_735_689_600_000  # 2025-01-01T00:00:00Z
        marks.keys[forgotten_key(runner.settings, customer_hash("zed@example.com"))] = \
            str(erased).encode()
        await runner.handle(record(mig("before", "2024-12-31T23:59:59.999Z"), 0))
        await runner.handle(record(mig("unknown", "soon"), 1))
        await runner.handle(record(mig("after", "2025-01-01T00:00:00.001Z"), 2))
        await runner.handle(record(migration("other"), 3))
        assert (runner.stats.forgotten, runner.stats.posted) == (2, 2)

    seen = serve(accepting, body)
    assert [orjson.loads(b)["migration_id"] for _, _, b in seen] == ["after", "other"]


def test_a_stop_cancels_the_request_under_way_and_marks_nothing() -> None:
    """SIGTERM while the webhook hangs: the run stops at once (not after the request's
    timeout), the migration stays unmarked, and no retry is counted."""
    async def body(runner: TriggerRunner, marks: Marks) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, runner.stop.set)
        t0 = loop.time()
        with pytest.raises(_Stopped):
            await runner.handle(record(migration("m1")))
        assert loop.time() - t0 < 3
        assert not marks.keys and runner.stats.retries == 0 and runner.stats.posted == 0

    assert len(serve(hanging, body)) == 1


def test_a_stop_during_the_last_attempt_is_a_stop_not_a_delivery_failure() -> None:
    box: dict[str, TriggerRunner] = {}

    def routes(app: web.Application, seen: list[tuple[str, str, bytes]]) -> None:
        async def hook(request: web.Request) -> web.Response:
            seen.append((request.method, request.path, await request.read()))
            if len(seen) == 3:  # the last of three attempts
                box["runner"].stop.set()
            return web.Response(status=503)

        app.router.add_route("*", "/hook", hook)

    async def body(runner: TriggerRunner, marks: Marks) -> None:
        box["runner"] = runner
        with pytest.raises(_Stopped):
            await runner.handle(record(migration("m1")))
        assert runner.stats.retries == 2 and not marks.keys

    assert len(serve(routes, body)) == 3


def test_messages_never_show_the_webhooks_credentials() -> None:
    url = "https://ops:S3cretPW@hooks.example.com/services/T0/B0/XYZ?token=T0KEN"
    assert shown_url(url) == "https://hooks.example.com/…"

    def failing(app: web.Application, seen: list[tuple[str, str, bytes]]) -> None:
        async def hook(request: web.Request) -> web.Response:
            seen.append((request.method, request.path, await request.read()))
            return web.Response(status=503)

        app.router.add_route("*", "/hook", hook)

    async def body(runner: TriggerRunner, marks: Marks) -> None:
        runner.url = runner.url.replace("http://", "http://ops:S3cretPW@") + "?token=T0KEN"
        with pytest.raises(TriggerDeliveryError) as info:
            await runner.handle(record(migration("m1")))
        assert "S3cretPW" not in str(info.value) and "T0KEN" not in str(info.value)

    serve(failing, body)
    for bad in ("http://ops:S3cretPW@exa mple.com/x?token=T0KEN", "htp://ops:S3cretPW@h/x",
                "http://ops:S3c#retPW@h/x", "http://ops:S3c?retPW@h/x",
                "http://ops:S3c/retPW@h/x", "htp://ops:S3c/retPW@h/x",
                "http://ops:S3c@retPW@h:99999/x", "ftp://ops:S3c@r@tPW@h/x"):
        with pytest.raises(Exception, match="--webhook") as info:
            check_webhook_url(bad)
        assert "S3c" not in str(info.value) and "T0KEN" not in str(info.value)
        assert "ops" not in str(info.value)


def test_a_cancelled_run_is_cancelled_not_stopped() -> None:
    """A crash of the run (its task cancelled) propagates as a cancellation, with the
    request under way cancelled too: it is not taken for a graceful stop."""
    async def body(runner: TriggerRunner, marks: Marks) -> None:
        task = asyncio.create_task(runner.handle(record(migration("m1"))))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not marks.keys and not runner.stop.is_set()

    assert len(serve(hanging, body)) == 1
