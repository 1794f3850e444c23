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
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from stream.errors import SegstreamError, ServiceError
from stream.kafka import aiokafka_config
from stream.redisconn import check_redis, redis_client, redis_failed
from stream.settings import Settings

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
    if not ok:
        raise TriggerOptionError(
            f"--webhook must be an http:// or https:// URL with a host (got {url!r})"
        )
    return url


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


@dataclass
class TriggerStats:
    """What a run did (counts of records)."""

    posted: int = 0
    duplicates: int = 0
    holdout: int = 0
    no_action: int = 0
    tombstones: int = 0
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


def seen_key(settings: Settings, migration_id: str) -> str:
    """Redis key marking a migration as delivered."""
    return f"{settings.redis_prefix}triggers:seen:{migration_id}"


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
    ) -> None:
        self.settings = settings
        self.url = webhook_url
        self.redis = redis
        self.http = http
        self.policy = policy
        self.stop = stop
        self.seen_ttl_s = seen_ttl_s
        self.stats = TriggerStats()

    async def handle_partition(self, records: Sequence[ConsumerRecord[Any, Any]]) -> int:
        """Handle records in order; the offset to commit after them."""
        for rec in records:
            await self.handle(rec)
        return int(records[-1].offset) + 1

    async def handle(self, rec: ConsumerRecord[Any, Any]) -> None:
        if rec.value is None:
            self.stats.tombstones += 1
            return
        try:
            doc = orjson.loads(rec.value)
            migration_id = usable_id(doc["migration_id"])
            action = doc.get("action")
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
        key = seen_key(self.settings, migration_id)
        try:
            if await self.redis.exists(key):
                self.stats.duplicates += 1
                return
        except RedisError as exc:
            raise redis_failed(self.settings, exc) from None
        body = orjson.dumps({f: doc.get(f) for f in PAYLOAD_FIELDS})
        if await self.post(body, migration_id, rec):
            try:
                await self.redis.set(key, b"1", nx=True, ex=self.seen_ttl_s)
            except RedisError as exc:
                # Delivered but not marked: a restart posts it again, with the same
                # Idempotency-Key; the offset is not committed past it.
                raise redis_failed(self.settings, exc) from None

    async def post(self, body: bytes, migration_id: str, rec: ConsumerRecord[Any, Any]) -> bool:
        """POST with retries; True when accepted, False when rejected for good (4xx)."""
        headers = {"Content-Type": "application/json", "Idempotency-Key": migration_id}
        timeout = aiohttp.ClientTimeout(total=self.policy.request_timeout_s)
        problem = ""
        wait: float | None = None
        for attempt in range(self.policy.max_attempts):
            if attempt:
                self.stats.retries += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), self.policy.delay(attempt - 1, wait))
                if self.stop.is_set():
                    raise _Stopped
                wait = None
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
                        self.stats.posted += 1
                        return True
                    if 300 <= resp.status < 400:
                        where = resp.headers.get("Location", "?")[:200]
                        problem = (f"HTTP {resp.status} redirect to {where!r}; redirects are "
                                   "not followed, point --webhook at the final URL")
                        continue
                    if resp.status >= 500 or resp.status in RETRY_STATUSES:
                        problem = f"HTTP {resp.status}"
                        wait = _retry_after(resp)
                        continue
                    log.warning(
                        "webhook rejected migration at %s with HTTP %d; skipped",
                        _where(rec),
                        resp.status,
                    )
                    self.stats.rejected += 1
                    return False
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
            log.debug(
                "attempt %d for migration at %s failed: %s", attempt + 1, _where(rec), problem
            )
        raise TriggerDeliveryError(
            f"webhook {self.url} failed {self.policy.max_attempts} times ({problem}) for the "
            f"migration at {_where(rec)}; offsets are not committed past it"
        )


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
) -> TriggerStats:
    """Consume the migrations topic in group ``group`` (default ``<app_id>-triggers``) and POST
    every actionable, non-hold-out migration to ``webhook_url`` until ``stop`` is set.

    Raises :class:`TriggerOptionError` for an invalid URL or timeout before connecting,
    :class:`~stream.errors.SettingsError` or :class:`~stream.errors.ServiceError` naming the
    setting when Kafka or Redis cannot be used, and :class:`TriggerDeliveryError` when one
    migration failed ``max_attempts`` times.
    """
    # Checked before anything connects, so a wrong option fails at once.
    check_webhook_url(webhook_url)
    check_request_timeout(request_timeout_s)
    stop = stop or asyncio.Event()
    policy = RetryPolicy(max_attempts, backoff_base_s, backoff_max_s, request_timeout_s)
    # Fails naming SEGSTREAM_REDIS_URL (or the TLS, cluster or ACL setting) when Redis
    # cannot be used, before anything is consumed.
    await asyncio.to_thread(check_redis, settings)
    consumer = AIOKafkaConsumer(
        settings.migrations_topic,
        group_id=group or settings.triggers_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **aiokafka_config(settings),
    )
    redis = redis_client(settings)
    try:
        await consumer.start()
    except KafkaError as exc:
        await redis.aclose()
        raise ServiceError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} (SEGSTREAM_KAFKA_BOOTSTRAP): {exc}"
        ) from None
    log.info("triggers: consuming %s, posting to the webhook", settings.migrations_topic)
    try:
        async with aiohttp.ClientSession() as http:
            runner = TriggerRunner(settings, webhook_url, redis, http, policy, stop, seen_ttl_s)
            await _loop(consumer, runner, stop, batch_max)
            return runner.stats
    finally:
        await consumer.stop()
        await redis.aclose()


async def _loop(
    consumer: AIOKafkaConsumer, runner: TriggerRunner, stop: asyncio.Event, batch_max: int
) -> None:
    logged = TriggerStats()
    while not stop.is_set():
        batch = await consumer.getmany(timeout_ms=500, max_records=batch_max)
        if not batch:
            continue
        tps = list(batch)
        # Partitions run concurrently; records within one stay in order.
        results = await asyncio.gather(
            *(runner.handle_partition(batch[tp]) for tp in tps), return_exceptions=True
        )
        done: dict[TopicPartition, int] = {}
        failure: BaseException | None = None
        for tp, res in zip(tps, results, strict=True):
            if isinstance(res, BaseException):
                failure = failure if isinstance(failure, TriggerDeliveryError) else res
            else:
                done[tp] = res
        if done:
            try:
                await consumer.commit(done)
                runner.stats.commits += 1
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
        if s.posted // 1000 != logged.posted // 1000:
            log.info(
                "triggers: %d posted, %d duplicates, %d hold-out, %d rejected, %d retries",
                s.posted,
                s.duplicates,
                s.holdout,
                s.rejected,
                s.retries,
            )
            logged = TriggerStats(**vars(s))
