"""The worker's fetch.min.bytes follows its input rate (``SEGSTREAM_KAFKA_FETCH_COALESCE_MS``)."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.errors import SettingsError
from stream.fetch_size import MAX_MIN_BYTES, WINDOW_S, FetchSizer
from stream.settings import load_settings


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def feed(sizer: FetchSizer, clock: Clock, bytes_per_s: float, seconds: float,
         fetches_per_s: int = 200, brokers: int = 1) -> None:
    """Fetches at a steady rate, each returning its share of the input."""
    per = bytes_per_s / fetches_per_s
    for _ in range(int(seconds * fetches_per_s)):
        clock.t += 1 / fetches_per_s
        sizer.observe(round(per), lambda: brokers)


@settings(max_examples=80, deadline=None)
@given(rate=st.floats(1_000, 50_000_000), coalesce_ms=st.integers(1, 100),
       brokers=st.integers(1, 6))
def test_steady_input_asks_for_coalesce_time_of_it(rate: float, coalesce_ms: int,
                                                    brokers: int) -> None:
    clock = Clock()
    sizer = FetchSizer(coalesce_ms, clock)
    feed(sizer, clock, rate, 5.0, brokers=brokers)
    want = rate * coalesce_ms / 1000 / brokers
    assert sizer.min_bytes == pytest.approx(max(1, min(MAX_MIN_BYTES, want)), rel=0.03, abs=2)


def test_a_quiet_or_slow_input_is_answered_at_the_first_record() -> None:
    clock = Clock()
    sizer = FetchSizer(10, clock)
    feed(sizer, clock, 50, 3.0)  # 50 bytes/s: half a byte in 10 ms
    assert sizer.min_bytes == 1


def test_the_minimum_halves_with_each_empty_window_after_input_stops() -> None:
    clock = Clock()
    sizer = FetchSizer(10, clock)
    feed(sizer, clock, 2_000_000, 3.0)
    assert sizer.min_bytes == pytest.approx(20_000, rel=0.03)
    seen = [sizer.min_bytes]
    for _ in range(6):
        clock.t += WINDOW_S
        sizer.observe(0)  # fetches that returned nothing
        seen.append(sizer.min_bytes)
    # (the first window after the input stopped may still hold some of its bytes)
    assert seen[1] < seen[0]
    assert [b / a for a, b in itertools.pairwise(seen[1:6])] == pytest.approx(
        [0.5] * 4, rel=0.01)
    # a long pause weighs as the empty windows it spans
    feed(sizer, clock, 2_000_000, 3.0)
    clock.t += 10
    sizer.observe(0)
    # (what it holds is the unfinished window's bytes, at most 0.5 s of input, spread
    # over the pause: 1,000,000 bytes / 10.5 s x 10 ms)
    assert sizer.min_bytes <= 1_000
    clock.t += WINDOW_S
    sizer.observe(0)
    assert sizer.min_bytes <= 500


def test_a_jump_in_input_raises_it_within_a_few_windows() -> None:
    clock = Clock()
    sizer = FetchSizer(10, clock)
    feed(sizer, clock, 100_000, 2.0)
    low = sizer.min_bytes
    feed(sizer, clock, 5_000_000, 1.5)
    assert low == pytest.approx(1_000, rel=0.05)
    assert sizer.min_bytes > 0.75 * 50_000
    feed(sizer, clock, 5_000_000, 2.5)
    assert sizer.min_bytes == pytest.approx(50_000, rel=0.03)


def test_zero_coalescing_keeps_kafkas_default() -> None:
    clock = Clock()
    sizer = FetchSizer(0, clock)
    feed(sizer, clock, 5_000_000, 2.0)
    assert sizer.min_bytes == 1
    with pytest.raises(ValueError):
        FetchSizer(-1)


def test_coalesce_setting_is_checked() -> None:
    assert load_settings().kafka_fetch_coalesce_ms == 0  # off unless asked for
    with pytest.raises(SettingsError, match="SEGSTREAM_KAFKA_FETCH_COALESCE_MS"):
        load_settings(kafka_fetch_coalesce_ms=-1)
    with pytest.raises(SettingsError, match=r"SEGSTREAM_KAFKA_FETCH_COALESCE_MS.*"
                                            r"SEGSTREAM_KAFKA_FETCH_MAX_WAIT_MS"):
        load_settings(kafka_fetch_coalesce_ms=80, kafka_fetch_max_wait_ms=50)
    assert load_settings(kafka_fetch_coalesce_ms=80,
                         kafka_fetch_max_wait_ms=100).kafka_fetch_coalesce_ms == 80


def _record(topic: str, partition: int, offset: int, value: bytes) -> Any:
    return SimpleNamespace(topic=topic, partition=partition, offset=offset, key=b"k",
                           value=value, timestamp=1_700_000_000_000)


def test_the_worker_consumer_sets_its_fetchers_minimum_from_what_it_fetched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring: the bytes of input records fetched reach the consumer thread's fetcher."""
    from stream.app import LeanApp
    from stream.inbox import Inbox

    async def run() -> tuple[int, int, int]:
        app = LeanApp("fetch-size-test", broker="kafka://127.0.0.1:1", store="memory://",
                      autodiscover=False, web_enabled=False, fetch_max_wait_ms=50,
                      fetch_coalesce_ms=10)
        app.inbox = Inbox(("in",), 1_000_000, lambda tp, first, last: None)
        consumer: Any = app.consumer
        consumer.inbox = app.inbox
        clock = Clock()
        consumer.fetch_sizer.clock = clock
        consumer.fetch_sizer._since = clock.t
        fetcher = SimpleNamespace(_fetch_min_bytes=1)
        consumer._thread._consumer = SimpleNamespace(_fetcher=fetcher)
        monkeypatch.setattr(type(consumer), "flow_active", property(lambda self: True))
        monkeypatch.setattr(type(consumer), "_input_brokers", lambda self: 2)
        from aiokafka import TopicPartition
        tp = TopicPartition("in", 0)
        app.inbox.assign([tp])
        offset = 0

        async def fetch(timeout: float) -> tuple[dict[Any, list[Any]], None]:
            nonlocal offset
            clock.t += 0.01  # 100 fetches a second, 4,000 bytes each: 400,000 bytes/s
            recs = [_record("in", 0, offset + i, b"x" * 400) for i in range(10)]
            offset += 10
            return {tp: recs}, None

        consumer._wait_next_records = fetch
        consumer.app.consumer_generation_id = 1
        for _ in range(300):
            async for _item in consumer.getmany(0.1):
                pass
            app.inbox.done(app.inbox.take(1_000_000))
        # 400,000 bytes/s x 10 ms over 2 brokers
        return fetcher._fetch_min_bytes, consumer.fetch_sizer.min_bytes, offset

    got, wanted, offset = asyncio.run(run())
    assert offset == 3_000
    assert got == wanted
    assert got == pytest.approx(2_000, rel=0.05)


def test_the_input_is_divided_among_the_brokers_leading_its_partitions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka import TopicPartition

    from stream.app import LeanApp
    from stream.inbox import Inbox

    leaders = {("in", 0): 1, ("in", 1): 2, ("in", 2): 1, ("in", 3): -1, ("in", 4): None,
               ("examples", 0): 3}

    async def run() -> tuple[int, int]:
        app = LeanApp("fetch-size-brokers", broker="kafka://127.0.0.1:1", store="memory://",
                      autodiscover=False, web_enabled=False, fetch_coalesce_ms=10)
        app.inbox = Inbox(("in",), 10, lambda tp, first, last: None)
        consumer: Any = app.consumer
        consumer.inbox = app.inbox
        before = consumer._input_brokers()  # no consumer started yet
        cluster = SimpleNamespace(leader_for_partition=lambda tp: leaders[tuple(tp)])
        consumer._thread._consumer = SimpleNamespace(_client=SimpleNamespace(cluster=cluster))
        monkeypatch.setattr(type(consumer), "assignment",
                            lambda self: {TopicPartition(t, p) for t, p in leaders})
        return before, consumer._input_brokers()

    assert asyncio.run(run()) == (1, 2)  # brokers 1 and 2; unknown leaders do not count


def test_the_engine_hands_the_setting_to_its_consumer(tmp_path: Any) -> None:
    from stream.app import Engine

    on = Engine(load_settings(data_dir=tmp_path, kafka_fetch_coalesce_ms=15))
    assert on.app.consumer.fetch_sizer.coalesce_s == pytest.approx(0.015)  # type: ignore[attr-defined]
    off = Engine(load_settings(data_dir=tmp_path / "off"))
    assert off.app.consumer.fetch_sizer is None  # type: ignore[attr-defined]
