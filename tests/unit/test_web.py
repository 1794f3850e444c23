"""The HTTP API over aiohttp's test client, with an in-memory backend (no Kafka, no Redis)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from stream.metrics import EngineMetrics
from stream.openapi import OPENAPI
from stream.web import PUBLIC_PATHS, ApiBackend, add_routes

TOKEN = "s3cret-token"
AS_OF = "2024-03-01T12:00:00Z"
MIGRATION = {
    "migration_id": "m-1", "customer_id": "c42", "scheme": "rfm",
    "from_segment": "Loyal", "to_segment": "At Risk", "at": AS_OF,
    "emitted_at": "2024-03-01T12:00:01Z", "reason": "recency_days >= 60",
    "features": {"recency_days": 61}, "scores": {"rfm": "255"}, "rules_version": "r1",
    "model_versions": {"churn": 3},
    "action": {"action_id": "winback-email", "channel": "email", "holdout": False},
}
ACTION = {  # a row of scorers.nba.lift_table
    "action_id": "winback-email", "segment": "At Risk",
    "treated_exposed": 900, "treated_converted": 81, "holdout_exposed": 100,
    "holdout_converted": 5, "treated_rate": 0.09, "holdout_rate": 0.05,
    "uplift": 0.04, "relative_lift": 0.8, "p_value": 0.17,
    "treated_ci": [0.073, 0.11], "holdout_ci": [0.022, 0.11],
}


class FakeBackend:
    """In-memory :class:`ApiBackend` with one customer and fixed results."""

    def __init__(self) -> None:
        self.is_ready = True
        self.fail = False
        self.calls: list[tuple[str | None, int]] = []
        self.asked: list[str] = []

    async def customer(self, customer_id: str) -> dict[str, Any] | None:
        self.asked.append(customer_id)
        if self.fail:
            raise RuntimeError("redis down: secret detail")
        if customer_id != "c42":
            return None
        return {"customer_id": "c42", "as_of": AS_OF, "features": {"recency_days": 61},
                "scores": {"rfm": "255", "churn_probability": 0.7},
                "segments": {"rfm": "At Risk"}, "history": [MIGRATION]}

    async def segments(self) -> dict[str, Any]:
        return {"as_of": AS_OF, "schemes": {"rfm": {"Loyal": 10, "At Risk": 3}}}

    async def migrations(self, since: str | None, limit: int) -> dict[str, Any]:
        self.calls.append((since, limit))
        return {"migrations": [MIGRATION][:limit], "next": "cursor-2"}

    async def actions(self) -> dict[str, Any]:
        return {"as_of": AS_OF, "actions": [ACTION]}

    async def health(self) -> dict[str, Any]:
        return {"worker": "w1"}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        return self.is_ready, {"kafka": True, "redis": self.is_ready, "partitions": 6}

    async def stats(self) -> dict[str, Any]:
        t = 1_709_294_400_000
        return {
            "as_of": AS_OF, "generated_at": "2024-03-01T12:00:02Z",
            "throughput": [{"t": t + i * 2500, "events_in_per_s": 100.0 + i,
                            "migrations_per_s": 2.0, "dlq_per_s": 0.1, "lag": 40 - i}
                           for i in range(5)],
            "lag": {"total": 36, "partitions": [{"topic": "clickstream", "partition": 0,
                                                 "lag": 36}]},
            "segments": {"rfm": {"Loyal": 10, "At Risk": 3}},
            "segment_history": {"rfm": [{"t": t, "sizes": {"Loyal": 11, "At Risk": 2}},
                                        {"t": t + 2500, "sizes": {"Loyal": 10, "At Risk": 3}}]},
            "flows": {"rfm": [{"from": "Loyal", "to": "At Risk", "count": 1},
                              {"from": None, "to": "Loyal", "count": 11}]},
            "models": [{"model": "churn", "version": 3, "auc": 0.81, "log_loss": 0.42,
                        "examples": 5000, "drift_alarms": 0,
                        "history": [{"t": t, "auc": 0.8, "log_loss": 0.43}]}],
            "actions": [ACTION],
        }


Call = Callable[[TestClient[Any, Any], FakeBackend], Awaitable[None]]


@asynccontextmanager
async def serve(
    token: str | None, backend: FakeBackend | None = None, app: web.Application | None = None
) -> AsyncIterator[tuple[TestClient[Any, Any], FakeBackend]]:
    backend = backend or FakeBackend()
    app = app or web.Application()
    add_routes(app, backend, EngineMetrics(), token)
    async with TestClient(TestServer(app)) as client:
        yield client, backend


def run(check: Call, token: str | None = None) -> None:
    async def main() -> None:
        async with serve(token) as (client, backend):
            await check(client, backend)

    asyncio.run(main())


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ROUTES = ["/customers/c42", "/segments", "/migrations", "/actions", "/healthz", "/readyz",
          "/metrics", "/openapi.json", "/api/stats", "/", "/dashboard"]
PROTECTED = [r for r in ROUTES if r not in PUBLIC_PATHS]

# -- schemas ---------------------------------------------------------------------------------

_REGISTRY: Registry[Any] = Registry().with_resource(
    "urn:segstream:openapi", Resource.from_contents(OPENAPI, default_specification=DRAFT202012)
)


def assert_matches(instance: Any, component: str) -> None:
    schema = {"$ref": f"urn:segstream:openapi#/components/schemas/{component}"}
    validator = Draft202012Validator(schema, registry=_REGISTRY)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, errors


def test_openapi_document_is_valid() -> None:
    validate(OPENAPI)
    assert OPENAPI["openapi"].startswith("3.1")


def test_openapi_describes_every_route() -> None:
    documented = {re.sub(r"\{[^}]+\}", "c42", p) for p in OPENAPI["paths"]}
    assert documented == set(ROUTES)

    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        served = {
            route.resource.canonical for route in client.app.router.routes()  # type: ignore[union-attr]
            if route.resource is not None and route.method == "GET"
        }
        assert {re.sub(r"\{[^}]+\}", "c42", p) for p in served} == set(ROUTES)

    run(check)


@pytest.mark.parametrize(
    ("path", "component"),
    [("/customers/c42", "Customer"), ("/segments", "Segments"),
     ("/migrations?limit=5", "MigrationPage"), ("/actions", "Actions"), ("/healthz", "Health"),
     ("/readyz", "Ready"), ("/api/stats", "Stats")],
)
def test_responses_match_the_openapi_schemas(path: str, component: str) -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        resp = await client.get(path)
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert_matches(await resp.json(), component)

    run(check)


def test_openapi_json_is_served_and_valid() -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        resp = await client.get("/openapi.json", headers=_auth())
        assert resp.status == 200
        validate(await resp.json())

    run(check, TOKEN)


# -- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize("path", PROTECTED)
def test_token_required(path: str) -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        for headers in ({}, _auth("wrong"), _auth(TOKEN + "x"), {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            resp = await client.get(path, headers=headers)
            assert resp.status == 401, (path, headers)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert_matches(await resp.json(), "Error")
        ok = await client.get(path, headers=_auth())
        assert ok.status == 200, path
        lower = await client.get(path, headers={"Authorization": f"bearer {TOKEN}"})
        assert lower.status == 200, path

    run(check, TOKEN)


def test_a_token_with_bytes_that_are_not_utf8_is_refused_with_a_json_401() -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        assert client.port is not None
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"GET /segments HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer t\xf6k\xe9n\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await reader.read()
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), head
        assert b"application/json" in head
        assert_matches(orjson.loads(body), "Error")

    run(check, TOKEN)


def test_a_token_setting_is_taken_without_surrounding_whitespace(monkeypatch) -> None:
    from stream.settings import load_settings

    monkeypatch.setenv("SEGSTREAM_API_TOKEN", f" {TOKEN}\n")  # a secret file's newline
    token = load_settings().api_token
    assert token is not None and token.get_secret_value() == TOKEN


@pytest.mark.parametrize("path", sorted(PUBLIC_PATHS))
def test_probes_and_page_need_no_token(path: str) -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        assert (await client.get(path)).status == 200

    run(check, TOKEN)


@pytest.mark.parametrize("path", ROUTES)
def test_no_token_configured_means_open(path: str) -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        assert (await client.get(path)).status == 200

    run(check, None)


# -- behaviour -------------------------------------------------------------------------------


def test_unknown_customer_is_a_json_404() -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        resp = await client.get("/customers/nobody", headers=_auth())
        assert resp.status == 404
        body = await resp.json()
        assert_matches(body, "Error")
        assert "nobody" in body["error"]

    run(check, TOKEN)


def test_customer_document_shape() -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        body = await (await client.get("/customers/c42")).json()
        assert set(body) == {"customer_id", "as_of", "features", "scores", "segments", "history"}
        assert body["segments"] == {"rfm": "At Risk"}

    run(check)


def test_migrations_paging_parameters() -> None:
    async def check(client: TestClient[Any, Any], backend: FakeBackend) -> None:
        body = await (await client.get("/migrations?since=1709294400000-1&limit=7")).json()
        assert body["next"] == "cursor-2"
        await client.get("/migrations")
        await client.get("/migrations?since=1709294400000")
        assert backend.calls == [("1709294400000-1", 7), (None, 100), ("1709294400000", 100)]
        for bad in ("0", "1001", "ten", "-1"):
            resp = await client.get(f"/migrations?limit={bad}")
            assert resp.status == 400, bad
            assert_matches(await resp.json(), "Error")

    run(check)


@pytest.mark.parametrize("since", ["garbage", "-1", "(", "%2B", "-", "1-2-3", "1-", "-1-2",
                                   "99999999999999999999-0", "1-18446744073709551616",
                                   "\u0661\u0662", "1 2"])
def test_a_malformed_migrations_cursor_is_a_400_naming_since(since: str) -> None:
    async def check(client: TestClient[Any, Any], backend: FakeBackend) -> None:
        resp = await client.get("/migrations", params={"since": since})
        assert resp.status == 400
        body = await resp.json()
        assert_matches(body, "Error")
        assert "since" in body["error"]
        assert backend.calls == []  # refused before reaching the store

    run(check)


@pytest.mark.parametrize(("path", "customer_id"), [
    ("/customers/c%3A%7Bp0%7D", "c:{p0}"),
    ("/customers/%7Bx%7D", "{x}"),
    ("/customers/a%7Db", "a}b"),
    ("/customers/a%2Fb", "a/b"),
    ("/customers/%C3%A9t%C3%A9", "\u00e9t\u00e9"),
])
def test_any_customer_id_reaches_the_backend(path: str, customer_id: str) -> None:
    async def check(client: TestClient[Any, Any], backend: FakeBackend) -> None:
        resp = await client.get(path)
        assert resp.status == 404  # the fake knows only c42: its JSON 404, not the router's
        assert_matches(await resp.json(), "Error")
        assert backend.asked == [customer_id]

    run(check)


def test_readyz_is_503_when_not_ready() -> None:
    async def check(client: TestClient[Any, Any], backend: FakeBackend) -> None:
        backend.is_ready = False
        resp = await client.get("/readyz")
        assert resp.status == 503
        body = await resp.json()
        assert body["ready"] is False and body["redis"] is False
        metrics = await (await client.get("/metrics", headers=_auth())).text()
        assert "segstream_worker_ready 0.0" in metrics

    run(check, TOKEN)


def test_backend_failure_is_a_json_500_without_details() -> None:
    async def check(client: TestClient[Any, Any], backend: FakeBackend) -> None:
        backend.fail = True
        resp = await client.get("/customers/c42")
        assert resp.status == 500
        assert await resp.json() == {"error": "internal error"}

    run(check)


def test_metrics_exposition() -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        resp = await client.get("/metrics", headers=_auth())
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
        assert "# TYPE segstream_worker_up gauge" in text
        assert "segstream_worker_up 1.0" in text

    run(check, TOKEN)


def test_dashboard_page_is_self_contained() -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        resp = await client.get("/")
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        html = await resp.text()
        charts = set(re.findall(r'data-chart="([a-z-]+)"', html))
        assert {"segment-sizes", "segment-history", "migration-flows", "throughput", "lag",
                "model-quality", "action-lift"} <= charts
        assert not re.search(r"<(script|link|img)[^>]+(src|href)=", html), "external asset"
        urls = set(re.findall(r"https?://[^\s\"'<>]+", html)) - {"http://www.w3.org/2000/svg"}
        assert not urls, urls
        for api in ("/api/stats", "/segments", "/actions", "Authorization", "sessionStorage"):
            assert api in html

    run(check, TOKEN)


def test_existing_root_route_is_left_alone() -> None:
    async def index(_: web.Request) -> web.Response:
        return web.json_response({"status": "OK"})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", index)
        async with serve(None, app=app) as (client, _):
            assert await (await client.get("/")).json() == {"status": "OK"}
            assert (await client.get("/dashboard")).content_type == "text/html"

    asyncio.run(main())


def test_fake_backend_satisfies_the_protocol() -> None:
    assert isinstance(FakeBackend(), ApiBackend)


def test_the_routers_own_404_and_405_are_json_errors() -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        for path in ("/nowhere", "/customers/a/b", "/customers/"):
            resp = await client.get(path)
            assert resp.status == 404, path
            assert resp.content_type == "application/json", path
            assert_matches(await resp.json(), "Error")
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            resp = await client.request(method, "/segments")
            assert resp.status == 405, method
            assert resp.content_type == "application/json", method
            assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD"}
            assert_matches(await resp.json(), "Error")

    run(check)


def test_limit_is_plain_ascii_digits_and_errors_do_not_echo_long_input() -> None:
    async def check(client: TestClient[Any, Any], backend: FakeBackend) -> None:
        for bad in ("%2B5", "1_0", "%205", "%D9%A1", "5%20", "9" * 5_000):
            resp = await client.get(f"/migrations?limit={bad}")
            assert resp.status == 400, bad
            body = await resp.json()
            assert "limit" in body["error"] and len(body["error"]) < 200, bad
        for negative in ("-1", "-0", "-5000"):  # an integer, out of range: says the range
            resp = await client.get(f"/migrations?limit={negative}")
            assert resp.status == 400, negative
            assert "between 1 and" in (await resp.json())["error"], negative
        assert backend.calls == []
        resp = await client.get("/customers/" + "x" * 5_000)
        assert resp.status == 404 and len((await resp.json())["error"]) < 200

    run(check)


def test_a_customer_id_that_is_not_utf8_percent_encoding_is_a_400() -> None:
    async def check(client: TestClient[Any, Any], _: FakeBackend) -> None:
        for raw in ("%FF", "%ED%A0%80", "c%C3"):
            resp = await client.get(f"/customers/{raw}")
            assert resp.status == 400, raw
            assert "not percent-encoded UTF-8" in (await resp.json())["error"]
        resp = await client.get("/customers/%25FF")  # the id "%FF" itself: a lookup
        assert resp.status == 404

    run(check)


def test_the_customer_schema_lists_every_key_the_engine_returns() -> None:
    import inspect

    from stream import queries

    source = inspect.getsource(queries.customer_doc)
    returned = set(re.findall(r'^        "(\w+)":', source, flags=re.M))
    assert {"customer_id", "segments_since", "model_versions"} <= returned
    schema = OPENAPI["components"]["schemas"]["Customer"]["properties"]
    assert returned <= set(schema), returned - set(schema)


def _wrapped(inner: BaseException) -> BaseException:
    """``inner`` as the store raises it: a ``StoreUnavailable`` raised while handling it."""
    from features.store import StoreUnavailable

    try:
        try:
            raise inner
        except Exception as exc:
            raise StoreUnavailable(f"redis read failed: {exc}") from None
    except StoreUnavailable as outer:
        return outer


def _store_error(kind: str) -> BaseException:
    from redis.exceptions import (
        AuthenticationError,
        ClusterDownError,
        ClusterError,
        NoPermissionError,
        RedisClusterUnreachableError,
        ResponseError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return {
        "connection": RedisConnectionError("Error 111 connecting"),
        "timeout": RedisTimeoutError("Timeout reading from socket"),
        "wrapped timeout": _wrapped(RedisTimeoutError("Timeout reading from socket")),
        "cluster down": ClusterDownError("CLUSTERDOWN The cluster is down"),
        "cluster unreachable": RedisClusterUnreachableError("no node answered"),
        # redirects that do not settle while a slot moves (redis-py's pipelines under ASK)
        "redirects": _wrapped(ClusterError("TTL exhausted.")),
        "wrapped noperm": _wrapped(NoPermissionError("NOPERM no permissions")),
        "wrongtype": ResponseError("WRONGTYPE Operation against a key"),
        "credentials": AuthenticationError("invalid username-password pair"),
    }[kind]


@pytest.mark.parametrize(("kind", "status"), [
    ("connection", 503), ("timeout", 503), ("wrapped timeout", 503), ("cluster down", 503),
    ("cluster unreachable", 503), ("redirects", 503), ("wrapped noperm", 500), ("wrongtype", 500),
    ("credentials", 500)])
@pytest.mark.parametrize("route", ["/customers/c42", "/segments", "/migrations", "/actions"])
def test_a_store_that_does_not_answer_is_a_503_with_retry_after(kind: str, status: int,
                                                                route: str) -> None:
    """An outage is not a bug: a client can tell the two apart and retry (README, HTTP API).
    A command the store refuses (permissions, a key of another type, credentials) is no
    outage: retrying will not help, and it stays a 500 with its traceback logged."""
    error = _store_error(kind)

    class Down(FakeBackend):
        async def _down(self, *_: Any) -> Any:
            raise error

        customer = segments = migrations = actions = _down  # type: ignore[assignment]

    async def main() -> None:
        async with serve(None, Down()) as (client, _):
            resp = await client.get(route)
            assert resp.status == status
            if status == 503:
                assert resp.headers["Retry-After"] == "5"
                assert await resp.json() == {"error": "store unavailable"}
            else:
                assert await resp.json() == {"error": "internal error"}
            documented = OPENAPI["paths"][route.replace("c42", "{customer_id}")]["get"]
            assert str(status) in documented["responses"]

    asyncio.run(main())


def test_stats_keep_the_workers_own_figures_while_the_store_is_down() -> None:
    """The dashboard's charts are held in the worker's memory: an outage of Redis costs only
    the engine time (as_of null), not the whole page."""
    from types import SimpleNamespace

    from redis.exceptions import NoPermissionError, RedisClusterUnreachableError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from features.store import StoreUnavailable
    from stream.backend import EngineBackend

    class DownStore:
        error: BaseException = _wrapped(RedisTimeoutError("Timeout reading from socket"))

        async def now(self) -> int:
            raise self.error

    engine = SimpleNamespace(store=DownStore(), model_quality=dict)
    backend = EngineBackend(engine, EngineMetrics())  # type: ignore[arg-type]
    backend.flows = {"rfm": {(None, "Loyal"): 3}}
    backend.throughput.append({"t": 1, "events_in_per_s": 5.0, "migrations_per_s": 1.0,
                               "dlq_per_s": 0.0, "lag": 0})
    doc = asyncio.run(backend.stats())
    assert doc["as_of"] is None
    assert doc["flows"] == {"rfm": [{"from": None, "to": "Loyal", "count": 3}]}
    assert len(doc["throughput"]) == 1
    DownStore.error = RedisClusterUnreachableError("no node answered")
    assert asyncio.run(backend.stats())["as_of"] is None
    DownStore.error = _wrapped(NoPermissionError("NOPERM"))  # not an outage: raised
    with pytest.raises(StoreUnavailable):
        asyncio.run(backend.stats())


@pytest.mark.parametrize("query", ["limit=5&limit=abc", "limit=abc&limit=5", "since=1&since=x",
                                   "since=1&since=2"])
def test_a_parameter_given_twice_is_a_400(query: str) -> None:
    """Which of two values was meant cannot be known: neither is taken silently."""
    async def check(client: TestClient[Any, Any], backend: FakeBackend) -> None:
        resp = await client.get(f"/migrations?{query}")
        assert resp.status == 400
        assert "more than once" in (await resp.json())["error"]
        assert backend.calls == []

    run(check)


def test_leading_zeros_do_not_make_a_limit_out_of_range() -> None:
    async def check(client: TestClient[Any, Any], backend: FakeBackend) -> None:
        assert (await client.get("/migrations?limit=0000000005")).status == 200
        assert (await client.get("/migrations?limit=00000000000000000000001001")).status == 400
        assert (await client.get("/migrations?limit=" + "0" * 5_000 + "7")).status == 200
        assert (await client.get("/migrations?limit=" + "0" * 5_000)).status == 400
        assert backend.calls == [(None, 5), (None, 7)]

    run(check)
