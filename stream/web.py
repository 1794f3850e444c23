"""The HTTP API, /metrics and the dashboard as plain aiohttp handlers.

:func:`add_routes` mounts them on any :class:`aiohttp.web.Application`: the Faust worker's web
app in production, a bare one in tests (no Kafka needed). The data comes from an
:class:`ApiBackend`; this module only speaks HTTP.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote

import orjson
from aiohttp import web
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    ClusterError,
    RedisClusterUnreachableError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stream.metrics import EngineMetrics
from stream.openapi import OPENAPI
from stream.queries import check_cursor
from stream.redact import describe

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
#: Errors of a store that is down or does not answer in time (also when wrapped, as
#: ``features.store.StoreUnavailable`` does): 503 with ``Retry-After``. Any other error, a
#: refused command or credentials among them, is a 500. ``ClusterError`` is a cluster's
#: redirects not settling ("TTL exhausted"), as while a slot is being moved.
STORE_DOWN = (RedisConnectionError, RedisTimeoutError, TimeoutError, ClusterDownError,
              ClusterError, TryAgainError, RedisClusterUnreachableError)
RETRY_AFTER_S = 5


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from or while handling, is the store
    being down or slow rather than refusing what it was asked.

    >>> from features.store import StoreUnavailable
    >>> try:
    ...     try:
    ...         raise RedisTimeoutError("Timeout reading from socket")
    ...     except RedisTimeoutError:
    ...         raise StoreUnavailable("redis read failed") from None
    ... except StoreUnavailable as e:
    ...     print(is_outage(e), is_outage(StoreUnavailable("NOPERM")))
    True False
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, STORE_DOWN) and not isinstance(e, AuthenticationError):
            return True
        stack += [e.__cause__, e.__context__]
    return False
#: Routes answered without a token (liveness and readiness probes, the dashboard page shell).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/dashboard"})


@runtime_checkable
class ApiBackend(Protocol):
    """Where the API's data comes from; every method returns JSON-ready values.

    ``stats()`` is what the dashboard plots, oldest sample first::

        {"as_of": "<engine event time, RFC 3339>" | None,
         "generated_at": "<wall clock, RFC 3339>",
         "throughput": [{"t": <epoch ms>, "events_in_per_s": float,
                         "migrations_per_s": float, "dlq_per_s": float, "lag": int}, ...],
         "lag": {"total": int,
                 "partitions": [{"topic": str, "partition": int, "lag": int}, ...]},
         "segments": {scheme: {segment: count}},
         "segment_history": {scheme: [{"t": <epoch ms>, "sizes": {segment: count}}, ...]},
         "flows": {scheme: [{"from": segment | None, "to": segment, "count": int}, ...]},
         "models": [{"model": str, "version": str | int | None, "auc": float | None,
                     "log_loss": float | None, "examples": int, "drift_alarms": int,
                     "history": [{"t": <epoch ms>, "auc": float | None,
                                  "log_loss": float | None}, ...]}, ...],
         "actions": [<rows as in actions()>]}

    ``flows`` counts migrations since the engine started keeping them (``from`` is ``None``
    for a customer's first segment); ``throughput`` and ``segment_history`` hold the recent
    samples the engine keeps (a few minutes at a few seconds apart).
    """

    async def customer(self, customer_id: str) -> dict[str, Any] | None:
        """``segstream customer ID --json``, or ``None`` for an unknown customer."""
        ...

    async def segments(self) -> dict[str, Any]:
        """``{"as_of", "schemes": {scheme: {segment: count}}}``."""
        ...

    async def migrations(self, since: str | None, limit: int) -> dict[str, Any]:
        """``{"migrations": [migration event, ...], "next": cursor | None}``, oldest first."""
        ...

    async def actions(self) -> dict[str, Any]:
        """``segstream actions --json``: ``{"as_of", "actions": [row, ...]}``, one row per action
        and segment: ``{"action_id", "segment", "treated_exposed", "treated_converted",
        "holdout_exposed", "holdout_converted", "treated_rate", "holdout_rate", "uplift",
        "relative_lift", "p_value", "treated_ci", "holdout_ci"}``."""
        ...

    async def health(self) -> dict[str, Any]:
        """Liveness details; cheap, no I/O needed."""
        ...

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether Kafka and Redis are reachable and partitions assigned, with details."""
        ...

    async def stats(self) -> dict[str, Any]:
        """The dashboard's data (shape in the class docstring)."""
        ...


def error(status: int, message: str, **headers: str) -> web.Response:
    """A JSON error response ``{"error": message}``."""
    return web.json_response({"error": message}, status=status, headers=headers or None,
                             dumps=_dumps)


def _shown(value: str, limit: int = 64) -> str:
    """``repr`` of user input for an error message, cut to ``limit`` characters."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The router's own 404 and 405 (no such route, a method other than GET or HEAD) as
    ``{"error": ...}`` like every other error of the API, keeping their headers."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        if exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items()
                   if k.lower() not in ("content-type", "content-length")}
        return error(exc.status, exc.reason.lower(), **headers)


def _dumps(value: Any) -> str:
    # orjson: the dashboard's /api/stats (history of every segment) is serialised on the
    # worker's event loop at every poll; the standard library took ~10x longer.
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:  # e.g. an integer past 64 bits
        return json.dumps(value, separators=(",", ":"), default=str)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=_dumps)


def authorized(request: web.Request, token: bytes) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer <token>``."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # aiohttp hands non-UTF-8 header bytes over as surrogate escapes: encode them back
    # (they then just fail to match) instead of failing the request with a 500
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token)


def _guard(handler: Handler, token: str | None, public: bool) -> Handler:
    expected = token.encode() if token else None

    async def guarded(request: web.Request) -> web.StreamResponse:
        if expected is not None and not public and not authorized(request, expected):
            return error(401, "missing or invalid bearer token",
                         **{"WWW-Authenticate": 'Bearer realm="segstream"'})
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:
            if is_outage(exc):
                # An outage, not a bug: the client may retry (and tell the two apart).
                log.warning("%s %s: the store did not answer (%s)", request.method,
                            _route(request), describe(exc))
                return error(503, "store unavailable",
                             **{"Retry-After": str(RETRY_AFTER_S)})
            log.exception("%s %s failed", request.method, _route(request))
            return error(500, "internal error")

    guarded.__doc__ = handler.__doc__
    return guarded


def _route(request: web.Request) -> str:
    """The matched route's pattern (``/customers/{customer_id}``), never the customer id."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "?"


def dashboard_html() -> bytes:
    """The dashboard page, shipped as package data."""
    return resources.files("stream").joinpath("static/dashboard.html").read_bytes()


class _Views:
    def __init__(self, backend: ApiBackend, metrics: EngineMetrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self.page = dashboard_html()

    async def customer(self, request: web.Request) -> web.StreamResponse:
        customer_id = request.match_info["customer_id"]
        raw = request.rel_url.raw_path.rsplit("/", 1)[-1]
        try:  # aiohttp leaves an escape that is not UTF-8 (%FF) as its text
            unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return error(400, f"customer id {_shown(raw)} is not percent-encoded UTF-8")
        doc = await self.backend.customer(customer_id)
        if doc is None:
            return error(404, f"unknown customer {_shown(customer_id)}")
        return _json(doc)

    async def segments(self, request: web.Request) -> web.StreamResponse:
        return _json(await self.backend.segments())

    async def migrations(self, request: web.Request) -> web.StreamResponse:
        for name in ("since", "limit"):
            if len(request.query.getall(name, ())) > 1:  # which one was meant?
                return error(400, f"{name} given more than once")
        since = request.query.get("since") or None
        if since is not None and (problem := check_cursor(since)) is not None:
            return error(400, problem)
        raw = request.query.get("limit", str(DEFAULT_LIMIT))
        # int() also takes "+5", "1_0", " 5" and other scripts' digits
        if raw.startswith("-") and raw[1:].isascii() and raw[1:].isdigit():
            return error(400, f"limit must be between 1 and {MAX_LIMIT}, got {_shown(raw)}")
        if not (raw.isascii() and raw.isdigit()):
            return error(400, f"limit must be an integer, got {_shown(raw)}")
        digits = raw.lstrip("0") or "0"  # int() refuses over 4,300 digits, zeros included
        if len(digits) > 9 or not 1 <= int(digits) <= MAX_LIMIT:
            return error(400, f"limit must be between 1 and {MAX_LIMIT}, got {_shown(raw)}")
        limit = int(digits)
        return _json(await self.backend.migrations(since, limit))

    async def actions(self, request: web.Request) -> web.StreamResponse:
        return _json(await self.backend.actions())

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok", **await self.backend.health()})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        ok, detail = await self.backend.ready()
        self.metrics.set_worker_state(ready=ok)
        return _json({"ready": ok, **detail}, status=200 if ok else 503)

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return _json(OPENAPI)

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return _json(await self.backend.stats())

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self.page,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Cache-Control": "no-store",
                # Everything is inline; nothing may load from elsewhere.
                "Content-Security-Policy": (
                    "default-src 'none'; script-src 'unsafe-inline'; "
                    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:"
                ),
                "Referrer-Policy": "no-referrer",
            },
        )


def add_routes(
    app: web.Application, backend: ApiBackend, metrics: EngineMetrics, token: str | None
) -> None:
    """Mount the API, ``/metrics``, ``/openapi.json`` and the dashboard on ``app``.

    With ``token`` set, every route except ``/healthz``, ``/readyz`` and the dashboard page
    answers 401 unless the request carries ``Authorization: Bearer <token>``. A GET route that
    ``app`` already serves (Faust's index at ``/``) is left alone; the dashboard is also at
    ``/dashboard``.
    """
    views = _Views(backend, metrics)
    if json_errors not in app.middlewares:
        app.middlewares.append(json_errors)
    routes: list[tuple[str, Handler]] = [
        # Any id but an unencoded slash: aiohttp's default pattern also refuses braces.
        ("/customers/{customer_id:[^/]+}", views.customer),
        ("/segments", views.segments),
        ("/migrations", views.migrations),
        ("/actions", views.actions),
        ("/healthz", views.healthz),
        ("/readyz", views.readyz),
        ("/metrics", views.prometheus),
        ("/openapi.json", views.openapi),
        ("/api/stats", views.stats),
        ("/dashboard", views.dashboard),
        ("/", views.dashboard),
    ]
    taken = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    for path, handler in routes:
        if ("GET", path) in taken:
            log.warning("GET %s is already served; not mounting the segstream view there", path)
            continue
        app.router.add_get(path, _guard(handler, token, path in PUBLIC_PATHS))
