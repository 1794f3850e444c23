"""The worker's outbox publisher: a record that cannot be queued fails the publish in
bounded time (its records stay in the outbox) and missing topics are recreated, at most
once per interval."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from stream.app import RECREATE_TOPICS_EVERY_S, FaustPublisher
from stream.settings import load_settings


class _Producer:
    """Queues a record at once, except for a topic whose metadata never arrives."""

    def __init__(self, missing: str) -> None:
        self.missing = missing
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, topic: str, key: Any, value: bytes, *_: Any) -> asyncio.Future[Any]:
        if topic == self.missing:
            await asyncio.Event().wait()
        self.sent.append((topic, value))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def test_a_record_that_cannot_be_queued_fails_the_publish_and_topics_are_recreated() -> None:
    recreated: list[float] = []
    producer = _Producer("segmentation-dlq")
    pub = FaustPublisher(SimpleNamespace(producer=producer), load_settings(),
                         queue_timeout_s=0.2, recreate=lambda s: recreated.append(time.time()))
    records = [("segment-migrations", b"k", b"1"), ("segmentation-dlq", b"k", b"2"),
               ("segment-migrations", b"k", b"3")]

    async def go() -> None:
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError, match="segmentation-dlq"):
            await pub.publish(records)
        assert time.perf_counter() - t0 < 5  # not the producer's 20-minute timeout
        with pytest.raises(TimeoutError):
            await pub.publish(records)
        # a long publish whose records each queue at once is not cut short
        many = [("segment-migrations", b"k", b"x")] * 2000
        await pub.publish(many)

    asyncio.run(go())
    assert [v for _, v in producer.sent[:2]] == [b"1", b"1"]  # nothing after the stuck one
    assert len(recreated) == 1  # the second failure came within RECREATE_TOPICS_EVERY_S
    assert RECREATE_TOPICS_EVERY_S >= 1
