"""Blocking Kafka helpers for the CLI and start-up (topics, offsets, producing)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

from stream.errors import ServiceError
from stream.settings import Settings

log = logging.getLogger(__name__)


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


def admin(settings: Settings) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(**client_config(settings))
    except KafkaError as exc:
        raise ServiceError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} (SEGSTREAM_KAFKA_BOOTSTRAP): {exc}"
        ) from None


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
        for t in meta:
            n = len(t.get("partitions") or ())
            if n != settings.partitions:
                name = t.get("topic") or t.get("name")
                raise ServiceError(
                    f"topic {name} has {n} partitions but SEGSTREAM_PARTITIONS is "
                    f"{settings.partitions}; input topics must be co-partitioned"
                )
    finally:
        a.close()


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


def end_offsets(settings: Settings, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """Next offset to be written of every partition of these topics."""
    c = KafkaConsumer(**client_config(settings))
    try:
        tps = []
        for t in topics:
            parts = c.partitions_for_topic(t) or set()
            tps += [TopicPartition(t, p) for p in parts]
        ends = c.end_offsets(tps) if tps else {}
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}
    finally:
        c.close()


def producer(settings: Settings, **extra: Any) -> KafkaProducer:
    cfg = client_config(settings)
    cfg.update({"acks": "all", "linger_ms": 20, "batch_size": 256 * 1024, "retries": 10,
                "max_in_flight_requests_per_connection": 1})
    cfg.update(extra)
    try:
        return KafkaProducer(**cfg)
    except KafkaError as exc:
        raise ServiceError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} (SEGSTREAM_KAFKA_BOOTSTRAP): {exc}"
        ) from None
