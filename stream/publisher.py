"""Outbox records published by a Kafka producer that runs on its own thread.

The micro-batch step is CPU-bound Python on the worker's event loop, and while it
evaluates a batch nothing else on that loop runs. Published with the Faust app's own
producer (on the same loop), a batch's outbox therefore only moved while the next batch
awaited Redis, and that batch's commit, which waits for the previous publish so records
go out in commit order (:meth:`stream.pipeline.BatchProcessor.drain`), waited for the
rest. :class:`ThreadedPublisher` runs an aiokafka producer on an event loop of its own
thread instead: its network waits and the broker's work overlap the next batch's
evaluation, and it takes the interpreter lock only for its own short steps.

Records of one :meth:`~ThreadedPublisher.publish` call are sent in order, calls are
made one at a time, and the producer keeps one request per broker in flight, so a
partition receives the records in the order given. The producer is started on first
use; one that cannot start (broker down) fails that publish, and the next publish tries
again. The partitioner is aiokafka's default, the one Faust's producer uses as well, so
a key goes to the same partition either way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from stream.kafka import aiokafka_config
from stream.settings import Settings

log = logging.getLogger(__name__)

#: Largest record batch the producer builds per partition (Faust's default is 16 KiB;
#: a batch's outbox is hundreds of records, and fewer, larger batches cost the producer
#: and the broker less per record). Below the broker's default ``message.max.bytes``.
MAX_BATCH_BYTES = 256 * 1024

Record = tuple[str, bytes | None, bytes]


class ThreadedPublisher:
    """Publishes records with an aiokafka producer on its own thread and event loop."""

    def __init__(self, settings: Settings, client_id: str = "segstream-outbox") -> None:
        self.settings = settings
        self.client_id = client_id
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: AIOKafkaProducer | None = None

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                ready = threading.Event()
                loop = asyncio.new_event_loop()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="outbox-publisher",
                                                daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    async def _producer_ready(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(**aiokafka_config(self.settings),
                                        client_id=self.client_id, acks="all",
                                        max_batch_size=MAX_BATCH_BYTES)
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _send(self, records: list[Record]) -> None:
        producer = await self._producer_ready()
        send = producer.send
        acks = [await send(topic, value, key) for topic, key, value in records]
        await asyncio.gather(*acks)

    def submit(self, records: Sequence[Record]) -> concurrent.futures.Future[None]:
        """Start publishing; the future is done once the broker acknowledged every record."""
        return asyncio.run_coroutine_threadsafe(self._send(list(records)), self._ensure_loop())

    async def publish(self, records: Sequence[Record]) -> None:
        """Publish and wait until the broker acknowledged every record."""
        if records:
            await asyncio.wrap_future(self.submit(records))

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """Stop the producer (sending what it still holds), then the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        producer, self._producer = self._producer, None

        async def stop() -> None:
            if producer is not None:
                await producer.stop()

        try:
            await asyncio.wait_for(
                asyncio.wrap_future(asyncio.run_coroutine_threadsafe(stop(), loop)), timeout_s)
        except Exception as exc:
            log.warning("outbox producer did not stop cleanly: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, timeout_s)
        if not thread.is_alive():
            loop.close()
