"""The learner shares the worker's event loop: it learns in chunks and lets batches in."""

from __future__ import annotations

import asyncio
import math
import random

from scorers.labels import Example
from stream.learner import LEARN_CHUNK, Learner
from stream.settings import load_settings


def _records(n: int) -> list[tuple[int, bytes | None]]:
    rnd = random.Random(5)
    out: list[tuple[int, bytes | None]] = []
    for i in range(n):
        x = {"a": rnd.gauss(0, 1), "b": rnd.gauss(5, 3)}
        y = int(rnd.random() < 1 / (1 + math.exp(-2.0 * x["a"])))
        model = "churn" if i % 3 else "purchase_7d"
        out.append((i, Example(f"e{i}", model, "h", i, i, x, y).to_bytes()))
    out.append((n, None))  # a tombstone: skipped, its offset still counts
    return out


def test_chunked_learning_equals_learning_at_once() -> None:
    records = _records(1_000)
    whole = Learner(load_settings(), None)  # type: ignore[arg-type]  # learning needs no Redis
    whole.learn(records)
    chunked = Learner(load_settings(), None)  # type: ignore[arg-type]
    asyncio.run(chunked.learn_chunked(records))
    assert chunked.learned == whole.learned == 1_000
    assert chunked.offset == whole.offset == 1_000
    probe = [{"a": a / 4, "b": 5.0} for a in range(-8, 9)]
    for name in ("churn", "purchase_7d"):
        assert chunked.models[name].examples == whole.models[name].examples
        assert chunked.models[name].predict_many(probe) == whole.models[name].predict_many(probe)


def test_other_tasks_run_between_chunks() -> None:
    learner = Learner(load_settings(), None)  # type: ignore[arg-type]
    records = _records(10 * LEARN_CHUNK)
    seen: list[int] = []

    async def other_agent() -> None:
        while learner.learned < 10 * LEARN_CHUNK:
            seen.append(learner.learned)
            await asyncio.sleep(0)

    async def run() -> None:
        task = asyncio.create_task(other_agent())
        await asyncio.sleep(0)
        await learner.learn_chunked(records)
        await task

    asyncio.run(run())
    partial = sorted({n for n in seen if 0 < n < 10 * LEARN_CHUNK})
    assert partial == [k * LEARN_CHUNK for k in range(1, 10)], partial
