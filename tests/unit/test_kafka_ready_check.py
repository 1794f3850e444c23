"""/readyz reads the input consumer's broker connections through Faust's and aiokafka's
internals: the installed versions must still have them, or every worker reads unready."""

from __future__ import annotations

import asyncio

from aiokafka.client import AIOKafkaClient
from aiokafka.conn import AIOKafkaConnection
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

from stream.app import create_engine
from stream.settings import load_settings


def test_the_internals_the_check_reads_exist() -> None:
    assert hasattr(AIOKafkaConsumerThread, "_consumer")
    assert callable(AIOKafkaConnection.connected)

    async def conns() -> object:
        client = AIOKafkaClient(bootstrap_servers="127.0.0.1:1")
        try:
            return client._conns
        finally:
            await client.close()

    assert asyncio.run(conns()) == {}


def test_a_worker_without_a_started_consumer_is_not_connected() -> None:
    """Before the consumer starts (or with no broker) there is no connection to report."""
    engine = create_engine(load_settings(kafka_bootstrap="127.0.0.1:1"))
    assert engine.kafka_connected() is False
    assert engine._kafka_check_failed is False  # nothing unexpected happened on the way
