"""The Faust app: topics, the ingest agent and its timers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import faust
import redis.asyncio as aioredis

from features.store import RedisFeatureStore
from stream.pipeline import BatchProcessor, RawRecord
from stream.settings import Settings

log = logging.getLogger(__name__)

OUTBOX_FLUSH_INTERVAL_S = 5.0


def redis_client(settings: Settings) -> aioredis.Redis:
    """The engine's asyncio Redis client."""
    return aioredis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )


class FaustPublisher:
    """Publishes outbox records with the app's producer and waits for every ack."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        producer = self.app.producer
        futures = [
            await producer.send(topic, key, value, None, None, None)
            for topic, key, value in records
        ]
        await asyncio.gather(*futures)


def _broker_credentials(settings: Settings) -> Any:
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    ssl_context = None
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        ssl_context = create_ssl_context(cafile=cafile)
    if settings.kafka_sasl_mechanism:
        password = settings.kafka_sasl_password
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password else None,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=ssl_context,
        )
    return faust.SSLCredentials(ssl_context)


class Engine:
    """Everything a worker holds: the Faust app, the store and the batch processor."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            settings.app_id,
            broker=settings.kafka_url,
            broker_credentials=_broker_credentials(settings),
            store="memory://",
            datadir=str(settings.data_dir / "faust" / settings.app_id),
            autodiscover=False,
            topic_partitions=settings.partitions,
            topic_allow_declare=False,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            web_enabled=True,
            web_host=settings.web_host,
            web_port=settings.web_port,
            web_bind=settings.web_host,
            stream_wait_empty=False,
            stream_buffer_maxsize=max(4096, settings.batch_max * 2),
            broker_commit_every=settings.batch_max,
            broker_commit_interval=1.0,
            # A crashed worker's partitions move after this long, not the 60 s default.
            broker_session_timeout=20.0,
            broker_heartbeat_interval=3.0,
            logging_config=None,
        )
        self.redis: aioredis.Redis | None = None
        self.store: RedisFeatureStore | None = None
        self.processor: BatchProcessor | None = None
        self.source = self.app.topic(
            *settings.input_topics,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )
        self.app.agent(self.source, name="ingest", concurrency=1)(self._ingest)
        self.app.timer(OUTBOX_FLUSH_INTERVAL_S)(self._flush_outbox)

    def _ensure(self) -> BatchProcessor:
        if self.processor is None:
            self.redis = redis_client(self.settings)
            self.store = RedisFeatureStore(self.redis, self.settings.redis_prefix)
            self.processor = BatchProcessor(self.settings, self.store, FaustPublisher(self.app))
        return self.processor

    async def _ingest(self, stream: Any) -> Any:
        processor = self._ensure()
        async for events in stream.take_events(
            self.settings.batch_max, within=self.settings.batch_within_s
        ):
            records = [
                RawRecord(e.message.topic, e.message.partition, e.message.offset,
                          e.message.key, e.message.value)
                for e in events
            ]
            await processor.process(records)
            yield len(records)

    async def _flush_outbox(self) -> None:
        processor = self._ensure()
        try:
            await processor.flush_outbox(range(self.settings.partitions))
        except Exception as exc:
            log.warning("outbox flush failed: %r", exc)


def create_engine(settings: Settings) -> Engine:
    return Engine(settings)
