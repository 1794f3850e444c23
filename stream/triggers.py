"""Reference trigger consumer: POST every actionable segment migration to a webhook.

Downstream campaign systems can run this as is or copy it. Delivery is at least once:
a record's offset is committed only after it and every record before it in its partition
were handled; a migration is marked as sent in Redis only after the webhook accepted it, and
each POST carries ``Idempotency-Key: <migration_id>`` so receivers can drop the rare repeat
(a crash between the POST and the mark). Hold-out and action-less migrations are never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisClusterException, RedisError

from scorers.labels import customer_hash
from stream.errors import SegstreamError, ServiceError
from stream.kafka import aiokafka_config, check_connection, ensure_topics
from stream.redisconn import check_redis, mget_any, redis_client, redis_failed
from stream.settings import Settings
from stream.triggers_metrics import TriggerMetrics, serve

T = TypeVar("T")

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429})
# One request longer than aiokafka's max_poll_interval_ms (5 minutes) costs the partitions.
MAX_REQUEST_TIMEOUT_S = 300.0
PAYLOAD_FIELDS = (
    "migration_id",
    "customer_id",
    "scheme",
    "from_segment",
    "to_segment",
    "at",
    "action",
)


class TriggerDeliveryError(SegstreamError):
    """The webhook kept failing; offsets stay uncommitted so a restart resumes there."""


class TriggerOptionError(SegstreamError):
    """An option of the trigger consumer is invalid; the message names it."""


def check_webhook_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host, else :class:`TriggerOptionError`.

    >>> check_webhook_url("https://hooks.example.com/segments")
    'https://hooks.example.com/segments'
    >>> check_webhook_url("hooks.example.com")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stream.triggers.TriggerOptionError: --webhook must be an http:// or https:// URL with a ...
    """
    try:
        parts = urlsplit(url)
        # .port raises ValueError when the port is not a number or out of range
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        ok = False
    if not ok or any(c.isspace() or ord(c) < 32 for c in url):
        raise TriggerOptionError(
            f"--webhook must be an http:// or https:// URL with a host and no spaces "
            f"(got {_masked(url)!r})"
        )
    return url


def _masked(url: str) -> str:
    """``url`` with its user information, path and query hidden (for a URL that is not
    valid): they often hold the receiver's secret.

    >>> _masked("htp://ops:pw@host/services/T0/XYZ?token=t")
    'htp://***@host/…'
    >>> _masked("http://ops:se#cret@hooks.example.com/x"), _masked("http://ops:a/b@h/x")
    ('http://***', 'http://***')
    >>> _masked("http://ops:p@ss@hooks.example.com:99999/x")
    'http://***@hooks.example.com:99999/…'
    """
    m = re.match(r"([^:/?#]*:)?(//[^/?#]*)?(.*)", url, flags=re.DOTALL)
    assert m is not None  # every part is optional
    scheme, authority, rest = m.group(1) or "", m.group(2) or "", m.group(3)
    if "@" in rest:
        # A password holding "/", "?" or "#" ends the authority early as parsed here, so
        # the rest of it would show as the host: where the user information ends cannot
        # be told, and nothing of it is shown.
        return f"{scheme}//***"
    # Up to the last "@": a password may hold a raw "@" too (URL parsers end it at the last).
    authority = re.sub(r"//.*@", "//***@", authority, flags=re.DOTALL)
    return f"{scheme}{authority}{'/…' if rest else ''}"


def check_request_timeout(seconds: float) -> float:
    """``seconds`` if it is a finite request timeout up to :data:`MAX_REQUEST_TIMEOUT_S`.

    >>> check_request_timeout(10.0)
    10.0
    """
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_REQUEST_TIMEOUT_S):
        raise TriggerOptionError(
            f"--timeout must be a number of seconds above 0 and at most "
            f"{MAX_REQUEST_TIMEOUT_S:g} (got {seconds!r})"
        )
    return seconds


class _Stopped(Exception):
    """Stop was requested while a partition was still retrying."""


class _Revoked(Exception):
    """A rebalance took the partition of the record being retried to another consumer."""


@dataclass
class TriggerStats:
    """What a run did (counts of records)."""

    posted: int = 0
    duplicates: int = 0
    holdout: int = 0
    no_action: int = 0
    tombstones: int = 0
    forgotten: int = 0
    rejected: int = 0
    malformed: int = 0
    retries: int = 0
    commits: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for connection errors, timeouts, 408/429 and 5xx."""

    max_attempts: int = 10
    base_s: float = 0.2
    max_s: float = 30.0
    request_timeout_s: float = 10.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Sleep before attempt ``attempt + 1`` (half fixed, half random: "equal jitter")."""
        cap = min(self.max_s, self.base_s * 2**attempt)
        d = cap / 2 + random.uniform(0, cap / 2)
        return float(min(self.max_s, max(d, retry_after or 0.0)))


#: A run logs its counts at least this often (seconds) while they change, and at every
#: thousand posts.
PROGRESS_LOG_S = 60.0

#: Longest migration id accepted (the engine's are 32 hexadecimal characters).
MAX_ID_CHARS = 512


def usable_id(value: Any) -> str | None:
    """``value`` if it can be a migration id (a non-empty string that fits in an HTTP
    header and a Redis key), else None.

    >>> usable_id("9f86d081884c7d65"), usable_id(None), usable_id("a\\r\\nX-Evil: 1")
    ('9f86d081884c7d65', None, None)
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return None
    return value


def seen_key(settings: Settings, group: str, migration_id: str) -> str:
    """Redis key marking a migration as delivered by the consumers of ``group``.

    Each group delivers to its own webhook, so each keeps its own marks (a digest of the
    group's name keeps the key unambiguous whatever characters the name holds).

    >>> s = Settings()
    >>> seen_key(s, "crm", "m1") != seen_key(s, "email", "m1")
    True
    """
    tag = hashlib.blake2b(group.encode("utf-8"), digest_size=8).hexdigest()
    return f"{settings.redis_prefix}triggers:seen:{tag}:{migration_id}"


#: How long ``segstream forget`` keeps a customer's erase time for the trigger consumers: a
#: consumer further behind than this posts the customer's earlier migrations again.
FORGOTTEN_TTL_S = 90 * 86_400


def forgotten_key(settings: Settings, pseudonym: str) -> str:
    """Redis key holding when ``segstream forget`` erased a customer (wall-clock ms),
    named by the customer's pseudonym (``scorers.labels.customer_hash``), not the id."""
    return f"{settings.redis_prefix}triggers:forgotten:{pseudonym}"


def emitted_ms(doc: dict[str, Any]) -> int | None:
    """When a migration was emitted (its ``emitted_at``), in wall-clock ms, or None.

    >>> emitted_ms({"emitted_at": "2025-01-01T00:00:00.250Z"})
    1735689600250
    >>> emitted_ms({"emitted_at": 5}) is None
    True
    """
    from datetime import datetime

    value = doc.get("emitted_at")
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    if at.tzinfo is None:
        return None
    return int(at.timestamp() * 1000)


def shown_url(url: str) -> str:
    """The webhook as messages show it: scheme, host and port, never the user, password,
    path or query, which often carry the receiver's secret.

    >>> shown_url("https://ops:pw@hooks.example.com:8443/services/T0/B0/XYZ?token=t")
    'https://hooks.example.com:8443/…'
    >>> shown_url("http://[::1]/")
    'http://[::1]/…'
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = parts.port
    except ValueError:
        return "the --webhook URL"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}/…"


def _where(rec: ConsumerRecord[Any, Any]) -> str:
    # Log positions, never customer ids.
    return f"{rec.topic}[{rec.partition}]@{rec.offset}"


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    try:
        return float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None


class TriggerRunner:
    """Handles records partition by partition; one instance per consumer."""

    def __init__(
        self,
        settings: Settings,
        webhook_url: str,
        redis: aioredis.Redis,
        http: aiohttp.ClientSession,
        policy: RetryPolicy,
        stop: asyncio.Event,
        seen_ttl_s: int,
        group: str | None = None,
    ) -> None:
        self.settings = settings
        self.url = webhook_url
        self.redis = redis
        self.http = http
        self.policy = policy
        self.stop = stop
        self.seen_ttl_s = seen_ttl_s
        self.group = group or settings.triggers_group
        self.stats = TriggerStats()
        #: Partitions a rebalance took away: their records are left to the new owner.
        self.revoked: set[TopicPartition] = set()
        #: Per partition, the offset after the last record handled and not yet committed.
        self.handled: dict[TopicPartition, int] = {}
        #: Revoked partitions whose handled offsets the listener already committed.
        self.released: set[TopicPartition] = set()
        #: Per partition, the offset of the next record to handle (for the lag metric).
        self.position: dict[TopicPartition, int] = {}
        #: called with the seconds of each POST attempt, answered or failed (metrics)
        self.on_request: Callable[[float], None] | None = None

    async def handle_partition(self, records: Sequence[ConsumerRecord[Any, Any]]) -> int | None:
        """Handle records in order, up to a rebalance that takes their partition away;
        the offset to commit after them (None when none was handled)."""
        tp = TopicPartition(records[0].topic, records[0].partition)
        for rec in records:
            if tp in self.revoked:
                break
            self.position[tp] = int(rec.offset)
            try:
                await self.handle(rec)
            except _Revoked:
                break
            if tp in self.released:
                break  # the listener committed (and gave the partition up) without it
            self.handled[tp] = self.position[tp] = int(rec.offset) + 1
        return self.handled.get(tp)

    async def handle(self, rec: ConsumerRecord[Any, Any]) -> None:
        if rec.value is None:
            self.stats.tombstones += 1
            return
        try:
            doc = orjson.loads(rec.value)
            migration_id = usable_id(doc["migration_id"])
            action = doc.get("action")
            customer_id = doc.get("customer_id")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            migration_id = None
        if migration_id is None:
            log.warning("skipping malformed migration at %s", _where(rec))
            self.stats.malformed += 1
            return
        if not action:
            self.stats.no_action += 1
            return
        if not isinstance(action, dict):
            log.warning("skipping migration with malformed action at %s", _where(rec))
            self.stats.malformed += 1
            return
        if action.get("holdout", False):
            self.stats.holdout += 1
            return
        key = seen_key(self.settings, self.group, migration_id)
        erased = (forgotten_key(self.settings, customer_hash(customer_id))
                  if isinstance(customer_id, str) else None)
        # Two keys in different hash slots: read per slot on a cluster.
        seen, forgotten_at = await self._redis(
            lambda: mget_any(self.redis, [key, erased or key]), rec)
        if seen:
            self.stats.duplicates += 1
            return
        if erased is not None and forgotten_at is not None:
            emitted = emitted_ms(doc)
            # Emitted before the customer was erased (or when cannot be told): not sent.
            if emitted is None or emitted <= int(forgotten_at):
                self.stats.forgotten += 1
                return
        body = orjson.dumps({f: doc.get(f) for f in PAYLOAD_FIELDS})
        # Accepted or rejected for good (4xx), it is marked: a restart before the offset
        # commit posts neither again. A mark that cannot be written after the retries
        # stops the run with the offset not committed past it; the next run posts it
        # again with the same Idempotency-Key.
        mark = b"1" if await self.post(body, migration_id, rec) else b"rejected"
        await self._redis(lambda: self.redis.set(key, mark, nx=True, ex=self.seen_ttl_s), rec)

    async def _redis(self, call: Callable[[], Awaitable[T]], rec: ConsumerRecord[Any, Any]
                     ) -> T:
        """``call()`` retried with the webhook's backoff while Redis fails (a restart, a
        failover): the run stops, naming SEGSTREAM_REDIS_URL, only after
        ``max_attempts`` failures in a row."""
        for attempt in range(self.policy.max_attempts):
            if attempt:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), self.policy.delay(attempt - 1))
                if self.stop.is_set():
                    raise _Stopped
            try:
                return await call()
            except (RedisError, RedisClusterException) as exc:
                if attempt + 1 >= self.policy.max_attempts:
                    raise redis_failed(self.settings, exc) from None
                log.warning("triggers: Redis failed at %s (%s); retrying", _where(rec),
                            type(exc).__name__)
        raise AssertionError("unreachable")

    async def _until_stopped(self, request: Awaitable[Any]) -> Any:
        """``request``'s result, or :class:`_Stopped` (the request cancelled) on a stop."""
        task = asyncio.ensure_future(request)
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled from outside (a crash of the run): as it is
            task.cancel()
            stopping.cancel()
            raise
        stopping.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise asyncio.CancelledError  # cancelled from outside meanwhile: as it is
        raise _Stopped

    async def _attempt(self, body: bytes, headers: dict[str, str],
                       rec: ConsumerRecord[Any, Any]) -> tuple[bool | str, float | None]:
        """One POST: True accepted, False rejected for good, else the problem (retried),
        with the answer's Retry-After."""
        timeout = aiohttp.ClientTimeout(total=self.policy.request_timeout_s)
        started = time.monotonic()
        try:
            # A redirect is not followed: the client would send the POST again as a
            # GET without its body, and a 2xx to that would mark an undelivered
            # trigger as sent. It is retried, then reported.
            async with self.http.post(
                self.url, data=body, headers=headers, timeout=timeout,
                allow_redirects=False,
            ) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return True, None
                if 300 <= resp.status < 400:
                    where = resp.headers.get("Location", "")
                    shown = shown_url(where) if "//" in where else "a path of the same host"
                    return (f"HTTP {resp.status} redirect to {shown}; redirects are not "
                            "followed, point --webhook at the final URL"), None
                if resp.status >= 500 or resp.status in RETRY_STATUSES:
                    return f"HTTP {resp.status}", _retry_after(resp)
                log.warning(
                    "webhook rejected migration at %s with HTTP %d; skipped",
                    _where(rec),
                    resp.status,
                )
                return False, None
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__, None
        finally:
            if self.on_request is not None:
                self.on_request(time.monotonic() - started)

    async def post(self, body: bytes, migration_id: str, rec: ConsumerRecord[Any, Any]) -> bool:
        """POST with retries; True when accepted, False when rejected for good (4xx).

        A stop (``stop`` set) cancels the request under way or the wait before the next
        one and raises :class:`_Stopped`: the migration is not marked as sent, and a
        restart posts it again with the same ``Idempotency-Key``.
        """
        headers = {"Content-Type": "application/json", "Idempotency-Key": migration_id}
        problem = ""
        wait: float | None = None
        tp = TopicPartition(rec.topic, rec.partition)
        for attempt in range(self.policy.max_attempts):
            if attempt:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(),
                                           self.policy.delay(attempt - 1, wait))
            if self.stop.is_set():
                raise _Stopped
            if tp in self.revoked:
                raise _Revoked  # a rebalance gave the partition to another consumer
            if attempt:
                self.stats.retries += 1
            outcome, wait = await self._until_stopped(self._attempt(body, headers, rec))
            if outcome is True:
                self.stats.posted += 1
                return True
            if outcome is False:
                self.stats.rejected += 1
                return False
            problem = str(outcome)
            # The first failure of a migration is worth an operator's eye (a webhook
            # down shows at once, not only when the run gives up); the rest is noise.
            log.log(logging.WARNING if attempt == 0 else logging.DEBUG,
                    "triggers: attempt %d for migration at %s failed: %s; retrying",
                    attempt + 1, _where(rec), problem)
        if self.stop.is_set():
            raise _Stopped
        raise TriggerDeliveryError(
            f"webhook {shown_url(self.url)} failed {self.policy.max_attempts} times "
            f"({problem}) for the migration at {_where(rec)}; offsets are not committed "
            "past it"
        )


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    """Stops handling the partitions a rebalance takes away, and commits what was handled
    of them before they go: their new owner starts after it, so a scale-out or a restart
    of another member posts nothing twice (only a request under way when the rebalance
    began can be posted again, and only once it has finished)."""

    def __init__(self, runner: TriggerRunner, idle: asyncio.Event) -> None:
        self.runner = runner
        self.idle = idle
        self.consumer: AIOKafkaConsumer | None = None

    async def on_partitions_revoked(self, revoked: Any) -> None:
        lost = set(revoked)
        self.runner.revoked |= lost
        # The batch under way stops before its next record of these partitions; its
        # request under way ends within the request timeout.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), self.runner.policy.request_timeout_s + 5)
        done = {tp: off for tp, off in self.runner.handled.items() if tp in lost}
        if done and self.consumer is not None:
            try:
                await self.consumer.commit(done)
                self.runner.stats.commits += 1
            except KafkaError as exc:
                log.warning("triggers: offset commit on rebalance failed (%s); records will "
                            "be redelivered", type(exc).__name__)
        for tp in lost:
            self.runner.handled.pop(tp, None)
            self.runner.position.pop(tp, None)
        self.runner.released |= lost

    async def on_partitions_assigned(self, assigned: Any) -> None:
        got = set(assigned)
        self.runner.revoked -= got
        self.runner.released -= got
        for tp in got:  # positions start from the group's committed offsets again
            self.runner.handled.pop(tp, None)
            self.runner.position.pop(tp, None)


async def run_triggers(
    settings: Settings,
    webhook_url: str,
    *,
    group: str | None = None,
    max_attempts: int = 10,
    stop: asyncio.Event | None = None,
    request_timeout_s: float = 10.0,
    backoff_base_s: float = 0.2,
    backoff_max_s: float = 30.0,
    seen_ttl_s: int = 7 * 86_400,
    batch_max: int = 500,
    metrics_port: int | None = None,
) -> TriggerStats:
    """Consume the migrations topic in group ``group`` (default ``<app_id>-triggers``) and POST
    every actionable, non-hold-out migration to ``webhook_url`` until ``stop`` is set.
    With ``metrics_port``, ``GET /metrics`` on ``SEGSTREAM_WEB_HOST`` at that port serves
    its Prometheus metrics (behind ``SEGSTREAM_API_TOKEN`` when set).

    Raises :class:`TriggerOptionError` for an invalid URL or timeout before connecting,
    :class:`~stream.errors.SettingsError` or :class:`~stream.errors.ServiceError` naming the
    setting when Kafka or Redis cannot be used, and :class:`TriggerDeliveryError` when one
    migration failed ``max_attempts`` times.
    """
    # Checked before anything connects, so a wrong option fails at once.
    check_webhook_url(webhook_url)
    check_request_timeout(request_timeout_s)
    if metrics_port is not None and not 1 <= metrics_port <= 65535:
        raise TriggerOptionError(f"--metrics-port must be between 1 and 65535, not {metrics_port}")
    stop = stop or asyncio.Event()
    group = group or settings.triggers_group
    policy = RetryPolicy(max_attempts, backoff_base_s, backoff_max_s, request_timeout_s)
    # Fails naming SEGSTREAM_REDIS_URL (or the TLS, cluster or ACL setting) when Redis
    # cannot be used, before anything is consumed; then naming SEGSTREAM_KAFKA_BOOTSTRAP
    # (or the security setting) when Kafka cannot. The topics are created when missing,
    # as a worker creates them, so the consumer can start before the first worker.
    await asyncio.to_thread(check_redis, settings)
    await asyncio.to_thread(check_connection, settings)
    await asyncio.to_thread(ensure_topics, settings)
    consumer = AIOKafkaConsumer(
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # The group waits this long for a member handing partitions over: longer than the
        # listener's wait for the request under way, so its commit still counts.
        rebalance_timeout_ms=int((request_timeout_s + 15) * 1000),
        **aiokafka_config(settings),
    )
    redis = redis_client(settings)
    idle = asyncio.Event()
    idle.set()
    served: web.AppRunner | None = None
    try:
        async with aiohttp.ClientSession() as http:
            runner = TriggerRunner(settings, webhook_url, redis, http, policy, stop, seen_ttl_s,
                                   group)
            if metrics_port is not None:
                metrics = TriggerMetrics(runner, consumer)
                runner.on_request = metrics.observe_request
                token = settings.api_token.get_secret_value() if settings.api_token else None
                try:
                    served = await serve(metrics, settings.web_host, metrics_port, token)
                except OSError as exc:
                    raise TriggerOptionError(
                        f"--metrics-port {metrics_port}: cannot listen on "
                        f"{settings.web_host}:{metrics_port} (SEGSTREAM_WEB_HOST): "
                        f"{exc.strerror or exc}") from None
            listener = _Revocations(runner, idle)
            listener.consumer = consumer
            consumer.subscribe([settings.migrations_topic], listener=listener)
            try:
                await consumer.start()
            except KafkaError as exc:
                raise ServiceError(
                    f"cannot consume {settings.migrations_topic} from "
                    f"{settings.kafka_bootstrap} (SEGSTREAM_KAFKA_BOOTSTRAP): {exc}"
                ) from None
            log.info("triggers: consuming %s, posting to %s", settings.migrations_topic,
                     shown_url(webhook_url))
            await _loop(consumer, runner, stop, batch_max, idle)
            return runner.stats
    finally:
        if served is not None:
            await served.cleanup()
        await consumer.stop()
        await redis.aclose()


async def _loop(
    consumer: AIOKafkaConsumer, runner: TriggerRunner, stop: asyncio.Event, batch_max: int,
    idle: asyncio.Event,
) -> None:
    logged = TriggerStats()
    logged_at = time.monotonic()
    while not stop.is_set():
        batch = await consumer.getmany(timeout_ms=500, max_records=batch_max)
        batch = {tp: recs for tp, recs in batch.items() if recs and tp not in runner.revoked}
        if not batch:
            continue
        tps = list(batch)
        idle.clear()
        try:
            # Partitions run concurrently; records within one stay in order.
            results = await asyncio.gather(
                *(runner.handle_partition(batch[tp]) for tp in tps), return_exceptions=True
            )
        finally:
            idle.set()
        failure: BaseException | None = None
        for res in results:
            if isinstance(res, BaseException):
                failure = failure if isinstance(failure, TriggerDeliveryError) else res
        # What a rebalance took away was committed by the listener, before it went.
        done = {tp: off for tp, off in runner.handled.items() if tp not in runner.revoked}
        if done:
            try:
                await consumer.commit(done)
                runner.stats.commits += 1
                for tp, off in done.items():
                    if runner.handled.get(tp) == off:
                        del runner.handled[tp]
            except KafkaError as exc:
                # Typically a rebalance took the partitions away; their new owner redelivers.
                log.warning(
                    "triggers: offset commit failed (%s); records will be redelivered",
                    type(exc).__name__,
                )
        if failure is not None and not isinstance(failure, _Stopped):
            raise failure
        if failure is not None:
            break
        s = runner.stats
        now = time.monotonic()
        if s != logged and (s.posted // 1000 != logged.posted // 1000
                            or now - logged_at >= PROGRESS_LOG_S):
            logged_at = now
            log.info(
                "triggers: %d posted, %d duplicates, %d hold-out, %d rejected, %d retries",
                s.posted,
                s.duplicates,
                s.holdout,
                s.rejected,
                s.retries,
            )
            logged = TriggerStats(**vars(s))
