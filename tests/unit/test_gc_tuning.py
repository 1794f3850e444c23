"""The worker's garbage-collector settings: no collection inside a micro-batch."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Iterator, Sequence

import orjson
import pytest

from features.store import MemoryFeatureStore
from scorers.nba import default_actions
from scorers.rules import default_catalogue
from stream import synthetic
from stream.app import tune_gc, watch_gc
from stream.errors import SettingsError
from stream.pipeline import BatchProcessor, RawRecord
from stream.runtime import StaticScoring
from stream.settings import Settings, load_settings

BATCH = 2_000


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


class _Sink:
    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        pass


def _records(s: Settings, n: int) -> list[RawRecord]:
    topics = {"clickstream": s.clickstream_topic, "transactions": s.transactions_topic}
    offsets = itertools.count()
    return [RawRecord(topics[kind], 0, next(offsets), e["customer_id"].encode(), orjson.dumps(e))
            for kind, e in itertools.islice(synthetic.iter_events(1_500, 30, 3), n)]


def _collections_during_batches(s: Settings, batches: int) -> int:
    """Young-generation collections while ``batches`` full micro-batches are processed."""
    store = MemoryFeatureStore()
    scoring = StaticScoring(s, store, default_catalogue(), default_actions())
    processor = BatchProcessor(s, store, _Sink(), scoring=scoring)
    records = _records(s, BATCH * batches)
    runs: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            runs.append(info["generation"])

    async def run() -> None:
        for i in range(0, len(records), BATCH):
            await processor.process(records[i:i + BATCH])

    gc.callbacks.append(count)
    try:
        asyncio.run(run())
    finally:
        gc.callbacks.remove(count)
    return len(runs)


def test_tune_gc_sets_the_threshold_and_freezes(restore_gc: None) -> None:
    gc.unfreeze()
    older = gc.get_threshold()[1:]
    tune_gc(load_settings(gc_threshold=12_345))
    assert gc.get_threshold() == (12_345, *older)
    assert gc.get_freeze_count() > 1_000  # at least this test run's modules
    gc.unfreeze()
    tune_gc(load_settings(gc_freeze=False))
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold()[0] == 200_000


def test_no_collection_runs_inside_a_micro_batch(restore_gc: None) -> None:
    """A full 2,000-record batch stays below the default threshold; Python's 700 does not."""
    s = load_settings(batch_max=BATCH)
    tune_gc(s)
    assert _collections_during_batches(s, 3) == 0
    gc.set_threshold(700, 10, 10)
    assert _collections_during_batches(s, 3) > 50


def test_gc_threshold_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSTREAM_GC_THRESHOLD", "10")
    with pytest.raises(SettingsError, match="SEGSTREAM_GC_THRESHOLD"):
        load_settings()


def test_watch_gc_reports_each_collection_and_how_long_it_held_the_process() -> None:
    seen: list[tuple[int, float]] = []
    callback = watch_gc(lambda gen, s: seen.append((gen, s)))
    try:
        gc.collect(0)
        # Reference cycles only the collector frees, enough for a full collection to take
        # measurable time.
        cycles = []
        for _ in range(200_000):
            a: list[object] = []
            a.append(a)
            cycles.append(a)
        del cycles, a
        t0 = time.perf_counter()
        gc.collect(2)
        wall = time.perf_counter() - t0
    finally:
        gc.callbacks.remove(callback)
    gens = [g for g, _ in seen]
    assert 0 in gens and gens[-1] == 2
    full = seen[-1][1]
    assert 0 < full <= wall and full >= 0.5 * wall
    count = len(seen)
    gc.collect(1)
    assert len(seen) == count  # removed: no longer reported
