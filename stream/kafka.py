"""Blocking Kafka helpers for the CLI and start-up (topics, offsets, producing).

Every client here first passes :func:`check_connection`: one connection to a bootstrap broker
that negotiates TLS and authenticates, so a wrong setting fails at once with a message naming
it (kafka-python alone retries a rejected password until its timeout and then reports only
that it could not bootstrap).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import socket
import ssl
import time
from collections.abc import Coroutine, Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

from stream.errors import ServiceError
from stream.settings import Settings

log = logging.getLogger(__name__)

#: How long the connection check waits for TLS and SASL to complete.
CHECK_TIMEOUT_S = 15.0
#: How long the check waits for a broker that refuses connections (still starting).
UNREACHABLE_WAIT_S = 30.0
_checked: set[str] = set()


def client_config(settings: Settings) -> dict[str, Any]:
    """kafka-python connection settings, including SASL/SSL when configured."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": [h.strip() for h in settings.kafka_bootstrap.split(",")],
        "security_protocol": settings.kafka_security_protocol,
        "request_timeout_ms": 30_000,
    }
    if settings.kafka_sasl_mechanism:
        cfg["sasl_mechanism"] = settings.kafka_sasl_mechanism
        cfg["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            cfg["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_cafile:
        cfg["ssl_cafile"] = str(settings.kafka_ssl_cafile)
    return cfg


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the SSL and SASL_SSL protocols (host names verified), else None."""
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    from aiokafka.helpers import create_ssl_context

    cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    return create_ssl_context(cafile=cafile)


def aiokafka_config(settings: Settings) -> dict[str, Any]:
    """aiokafka connection settings equivalent to :func:`client_config`."""
    base = client_config(settings)
    cfg: dict[str, Any] = {
        "bootstrap_servers": base["bootstrap_servers"],
        "security_protocol": base["security_protocol"],
        "request_timeout_ms": base["request_timeout_ms"],
    }
    for key in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
        if key in base:
            cfg[key] = base[key]
    context = ssl_context(settings)
    if context is not None:
        cfg["ssl_context"] = context
    return cfg


def _unreachable(settings: Settings, why: object) -> ServiceError:
    return ServiceError(
        f"cannot reach Kafka at {settings.kafka_bootstrap} (SEGSTREAM_KAFKA_BOOTSTRAP): {why}")


def _nobody_listening(exc: BaseException) -> bool:
    # Plain OSError is asyncio's "Connect call failed"; resets and timeouts are not this.
    return isinstance(exc, ConnectionRefusedError | socket.gaierror) or type(exc) is OSError


def _explain(settings: Settings, exc: BaseException) -> ServiceError:
    """The connection failure as an error that names the setting to fix."""
    from aiokafka import errors as aioerrors

    where = settings.kafka_bootstrap
    protocol = settings.kafka_security_protocol
    if isinstance(exc, aioerrors.SaslAuthenticationFailed):
        return ServiceError(
            f"Kafka at {where} rejected the {settings.kafka_sasl_mechanism} credentials of user "
            f"{settings.kafka_sasl_username!r}: check SEGSTREAM_KAFKA_SASL_USERNAME and "
            "SEGSTREAM_KAFKA_SASL_PASSWORD")
    if isinstance(exc, aioerrors.UnsupportedSaslMechanismError):
        return ServiceError(f"Kafka at {where} does not offer SASL mechanism "
                            f"{settings.kafka_sasl_mechanism} (SEGSTREAM_KAFKA_SASL_MECHANISM)")
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_code in (62, 64):
        # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH: the CA is right
        return ServiceError(
            f"the TLS certificate of Kafka at {where} does not name that host "
            f"({exc.verify_message}): use in SEGSTREAM_KAFKA_BOOTSTRAP a name the broker's "
            "certificate carries (and the broker's advertised.listeners)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ServiceError(
            f"the TLS certificate of Kafka at {where} is not trusted ({exc.verify_message}): "
            "set SEGSTREAM_KAFKA_SSL_CAFILE to the CA that signed it")
    if isinstance(exc, ssl.SSLError):
        return ServiceError(
            f"TLS with Kafka at {where} failed ({exc.reason or exc}): does "
            f"SEGSTREAM_KAFKA_SECURITY_PROTOCOL={protocol} match the broker's listener?")
    if _nobody_listening(exc):
        return _unreachable(settings, exc)
    # A listener that expects TLS or SASL drops (or ignores) a client speaking something else.
    return ServiceError(
        f"Kafka at {where} closed the connection or did not answer during the handshake "
        f"({type(exc).__name__}): SEGSTREAM_KAFKA_SECURITY_PROTOCOL is {protocol}; is that what "
        "the broker's listener expects (TLS, SASL)?")


async def _probe(settings: Settings, timeout_s: float) -> BaseException | None:
    from aiokafka.conn import create_conn, get_ip_port_afi
    from aiokafka.protocol.metadata import MetadataRequest

    cfg = aiokafka_config(settings)
    first: BaseException | None = None
    for server in cfg["bootstrap_servers"]:
        host, port, _ = get_ip_port_afi(server)  # as the clients read it: "[::1]" is ::1
        conn = None
        try:
            conn = await asyncio.wait_for(create_conn(
                host, int(port), client_id="segstream-check",
                request_timeout_ms=int(timeout_s * 1000),
                ssl_context=cfg.get("ssl_context"),
                security_protocol=cfg["security_protocol"],
                sasl_mechanism=cfg.get("sasl_mechanism"),
                sasl_plain_username=cfg.get("sasl_plain_username"),
                sasl_plain_password=cfg.get("sasl_plain_password"),
            ), timeout_s)
            # A listener may complete TLS and still refuse to serve an unauthenticated client.
            await asyncio.wait_for(conn.send(MetadataRequest([])), timeout_s)
        except Exception as exc:  # classified by _explain
            first = first or exc
            continue
        finally:
            if conn is not None:
                conn.close()
        return None
    return first


def _run(coro: Coroutine[Any, Any, BaseException | None]) -> BaseException | None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from async code: run the check on its own loop in a helper thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def check_codecs() -> None:
    """Refuse to run without the libraries that decompress snappy, lz4 and zstd record
    batches: a producer may use any of them, and a batch the consumer cannot decompress
    stops the fetcher (the worker would crash on it again at every restart), far from
    where a dead letter could be written."""
    from aiokafka import codec

    missing = [name for name, present in (("snappy", codec.has_snappy), ("lz4", codec.has_lz4),
                                          ("zstd", codec.has_zstd)) if not present()]
    if missing:
        raise ServiceError(
            f"cannot decompress {', '.join(missing)} record batches: install the codecs "
            "with pip install 'aiokafka[lz4,snappy,zstd]' (segstream depends on them)")


def check_connection(settings: Settings, timeout_s: float = CHECK_TIMEOUT_S,
                     wait_s: float | None = None) -> None:
    """Connect to a bootstrap broker with the configured TLS and SASL settings, once per
    process and configuration; raise :class:`ServiceError` naming the setting to fix.
    A broker nobody answers for is waited for up to ``wait_s`` seconds
    (:data:`UNREACHABLE_WAIT_S` when not given)."""
    password = settings.kafka_sasl_password
    fingerprint = hashlib.sha256(repr((
        settings.kafka_bootstrap, settings.kafka_security_protocol,
        settings.kafka_sasl_mechanism, settings.kafka_sasl_username,
        password.get_secret_value() if password else None, str(settings.kafka_ssl_cafile),
    )).encode()).hexdigest()
    if fingerprint in _checked:
        return
    # A broker that is still starting refuses connections: wait for it as long as the clients
    # would; a rejected password or certificate fails at once.
    if wait_s is None:
        wait_s = UNREACHABLE_WAIT_S
    deadline = time.monotonic() + wait_s
    # A short wait shortens the handshake too, but never below what a remote TLS broker
    # needs to answer.
    timeout_s = min(timeout_s, max(wait_s, 5.0))
    failure = _run(_probe(settings, timeout_s))
    while failure is not None and _nobody_listening(failure) and time.monotonic() < deadline:
        time.sleep(1.0)
        failure = _run(_probe(settings, timeout_s))
    if failure is not None:
        raise _explain(settings, failure) from None
    _checked.add(fingerprint)


def admin(settings: Settings) -> KafkaAdminClient:
    check_connection(settings)
    try:
        return KafkaAdminClient(**client_config(settings))
    except KafkaError as exc:
        raise _unreachable(settings, exc) from None


def consumer(settings: Settings, **extra: Any) -> KafkaConsumer:
    """A kafka-python consumer with the deployment's connection settings."""
    check_connection(settings)
    try:
        return KafkaConsumer(**client_config(settings), **extra)
    except KafkaError as exc:
        raise _unreachable(settings, exc) from None


def contract_topics(settings: Settings) -> dict[str, int]:
    """Every topic the engine uses, with its partition count."""
    return {
        settings.clickstream_topic: settings.partitions,
        settings.transactions_topic: settings.partitions,
        settings.migrations_topic: settings.partitions,
        settings.dlq_topic: 1,
        # One partition: a single learner sees every labelled example in order.
        settings.examples_topic: 1,
        # Faust elects the group leader (which runs the scheduled CLV refit) through this
        # topic; the engine declares its topics itself, so it creates this one too.
        f"{settings.app_id}-__assignor-__leader": 1,
    }


def _partition_mismatch(settings: Settings, meta: Iterable[dict[str, Any]]) -> None:
    for t in meta:
        n = len(t.get("partitions") or ())
        if n != settings.partitions:
            name = t.get("topic") or t.get("name")
            raise ServiceError(
                f"topic {name} has {n} partitions but SEGSTREAM_PARTITIONS is "
                f"{settings.partitions}; input topics must be co-partitioned"
            )


def check_partitions(settings: Settings) -> None:
    """Fail naming ``SEGSTREAM_PARTITIONS`` when an existing input topic has another count
    (a customer's partition, and so where their state is, follows from it)."""
    check_connection(settings)
    a = admin(settings)
    try:
        existing = set(a.list_topics())
        present = [t for t in settings.input_topics if t in existing]
        if present:
            _partition_mismatch(settings, a.describe_topics(present))
    finally:
        a.close()


def ensure_topics(settings: Settings) -> None:
    """Create missing topics; fail if an input topic has the wrong partition count."""
    a = admin(settings)
    try:
        existing = set(a.list_topics())
        wanted = contract_topics(settings)
        new = [NewTopic(t, n, 1) for t, n in wanted.items() if t not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                a.create_topics(new)
        # Freshly created topics can report no partitions for a moment.
        for _ in range(50):
            meta = a.describe_topics(list(settings.input_topics))
            if all(t.get("partitions") for t in meta):
                break
            time.sleep(0.2)
        _partition_mismatch(settings, meta)
        check_batch_limit(a, settings)
    finally:
        a.close()


def output_topics(settings: Settings) -> tuple[str, ...]:
    """The topics a worker's producer writes: its outbox's (migrations, examples, DLQ)."""
    return settings.migrations_topic, settings.examples_topic, settings.dlq_topic


def message_limits(a: KafkaAdminClient, topics: Iterable[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes``: the largest record batch its brokers accept."""
    res = a.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t, configs=["max.message.bytes"])
         for t in topics],
        config_filter="all")
    out: dict[str, int] = {}
    for t, entries in (res.get("topic") or {}).items():
        value = (entries.get("max.message.bytes") or {}).get("value")
        if value is not None:
            out[t] = int(value)
    return out


def check_batch_limit(a: KafkaAdminClient, settings: Settings) -> None:
    """Fail if an output topic would refuse the producer's largest record batch.

    A refused batch fails its publish, and the records wait in the outbox, retried and
    refused again: caught here, at start, it names the setting instead.
    """
    want = settings.kafka_produce_batch_bytes
    try:
        limits = message_limits(a, output_topics(settings))
    except KafkaError as exc:  # e.g. a principal without DescribeConfigs on the topics
        log.warning("could not read the output topics' max.message.bytes (%r); "
                    "SEGSTREAM_KAFKA_PRODUCE_BATCH_BYTES (%d) is not checked", exc, want)
        return
    refused = sorted((n, t) for t, n in limits.items() if n < want)
    if refused:
        n, t = refused[0]
        raise ServiceError(
            f"SEGSTREAM_KAFKA_PRODUCE_BATCH_BYTES is {want} but topic {t} accepts record "
            f"batches of at most {n} bytes (its max.message.bytes); lower the setting to "
            f"{n} or less, or raise the topic's limit")


def delete_topics(settings: Settings) -> list[str]:
    a = admin(settings)
    try:
        existing = set(a.list_topics())
        names = [t for t in contract_topics(settings) if t in existing]
        if names:
            with contextlib.suppress(UnknownTopicOrPartitionError):
                a.delete_topics(names)
        return names
    finally:
        a.close()


def delete_groups(settings: Settings, names: Iterable[str]) -> dict[str, str | None]:
    """Delete these consumer groups; returns each one's error name (None: deleted, or
    there was no such group)."""
    names = list(names)
    if not names:
        return {}
    a = admin(settings)
    try:
        got = a.delete_groups(names)  # {group: "OK" or the error's name}
    finally:
        a.close()
    return {g: None if e in ("OK", "GroupIdNotFoundError") else str(e) for g, e in got.items()}


def group_members(settings: Settings, names: Iterable[str]) -> dict[str, int]:
    """How many members each of these consumer groups has, for those that have any (a
    consumer of it is running)."""
    names = list(names)
    if not names:
        return {}
    a = admin(settings)
    try:
        described = a.describe_groups(names)  # {group: {"members": [...], ...}}
    finally:
        a.close()
    return {g: len(d.get("members") or ()) for g, d in described.items() if d.get("members")}


def end_offsets(settings: Settings, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """Next offset to be written of every partition of these topics."""
    return _offsets(settings, topics, "end_offsets")


def start_offsets(settings: Settings, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """First offset still held of every partition of these topics."""
    return _offsets(settings, topics, "beginning_offsets")


def _offsets(settings: Settings, topics: Iterable[str], which: str
             ) -> dict[tuple[str, int], int]:
    c = consumer(settings)
    try:
        tps = []
        for t in topics:
            parts = c.partitions_for_topic(t) or set()
            tps += [TopicPartition(t, p) for p in parts]
        got = getattr(c, which)(tps) if tps else {}
        return {(tp.topic, tp.partition): off for tp, off in got.items()}
    finally:
        c.close()


def producer(settings: Settings, **extra: Any) -> KafkaProducer:
    check_connection(settings)
    cfg = client_config(settings)
    cfg.update({"acks": "all", "linger_ms": 20, "batch_size": 256 * 1024, "retries": 10,
                "max_in_flight_requests_per_connection": 1})
    cfg.update(extra)
    try:
        return KafkaProducer(**cfg)
    except KafkaError as exc:
        raise _unreachable(settings, exc) from None
