"""The learner process's loop: fetched examples are never dropped."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from stream import learner_service
from stream.learner import Learner
from stream.learner_service import LearnerService
from stream.settings import load_settings
from tests.unit.test_learner_chunks import _records


class _Consumer:
    """Returns one fetch of examples before any assignment callback ran, then stops."""

    def __init__(self, service: LearnerService, records: list[Any]) -> None:
        self.service = service
        self.fetches = [{"tp": records}]
        self.commits = 0

    async def start(self) -> None: ...

    def subscribe(self, topics: list[str], listener: Any) -> None: ...

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[str, list[Any]]:
        if not self.fetches:
            self.service.stop.set()
            return {}
        return self.fetches.pop()

    async def commit(self, offsets: Any = None) -> None:
        self.commits += 1

    async def stop(self) -> None: ...


def test_examples_fetched_before_the_assignment_callback_finished_are_learned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    records = [SimpleNamespace(offset=o, value=v) for o, v in _records(300)]

    async def no_redis_load(self: Learner) -> None: ...

    monkeypatch.setattr(Learner, "load", no_redis_load)

    async def run() -> LearnerService:
        service = LearnerService(load_settings())
        consumer = _Consumer(service, records)
        monkeypatch.setattr(learner_service, "AIOKafkaConsumer", lambda **_: consumer)

        async def no_publish() -> None: ...

        service._publish = no_publish  # type: ignore[method-assign]
        service.redis = SimpleNamespace(aclose=no_publish)  # type: ignore[assignment]
        await service.run()
        # Nothing was checkpointed (publishing is stubbed out): committing the offsets
        # would lose these examples if the learner died now.
        assert consumer.commits == 0
        return service

    service = asyncio.run(run())
    assert service.learner is not None
    assert service.learner.learned == 300 and service.learner.offset == 300
