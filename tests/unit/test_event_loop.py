"""The worker's Faust app and event loop: no per-event Monitor sensor, uvloop by default."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import faust
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from stream.app import LeanApp, stream_buffering, use_event_loop
from stream.errors import SettingsError
from stream.settings import load_settings


@pytest.fixture
def restore_policy() -> Iterator[None]:
    before = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(before)


def _sensors_after_start(cls: type[faust.App]) -> set[object]:
    app = cls("event-loop-test", broker="kafka://127.0.0.1:1", store="memory://",
              autodiscover=False, web_enabled=False)
    list(app.on_init_dependencies())  # what the worker calls when the app starts
    return set(app.sensors)


def test_lean_app_leaves_the_monitor_out_of_the_sensors() -> None:
    plain = _sensors_after_start(faust.App)
    lean = _sensors_after_start(LeanApp)
    assert any(isinstance(s, faust.Monitor) for s in plain)  # Faust's default
    assert not any(isinstance(s, faust.Monitor) for s in lean)


def test_uvloop_is_the_default_event_loop(restore_policy: None) -> None:
    use_event_loop(load_settings())
    loop = asyncio.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_asyncio_event_loop_on_request(restore_policy: None) -> None:
    use_event_loop(load_settings(event_loop="asyncio"))
    loop = asyncio.new_event_loop()
    try:
        assert not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_unknown_event_loop_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSTREAM_EVENT_LOOP", "trio")
    with pytest.raises(SettingsError, match="SEGSTREAM_EVENT_LOOP"):
        load_settings()


def test_worker_consumer_takes_the_fetch_wait_setting() -> None:
    """The broker may hold a fetch for ``SEGSTREAM_KAFKA_FETCH_MAX_WAIT_MS``, not Faust's 1.5 s."""
    s = load_settings(kafka_fetch_max_wait_ms=37)

    async def build(wait_ms: int | None) -> int:
        app = LeanApp("fetch-wait-test", broker="kafka://127.0.0.1:1", store="memory://",
                      autodiscover=False, web_enabled=False, fetch_max_wait_ms=wait_ms)
        thread = app.consumer._thread  # type: ignore[attr-defined]
        consumer = thread._create_worker_consumer(app.transport)
        return int(consumer._fetch_max_wait_ms)

    assert asyncio.run(build(s.kafka_fetch_max_wait_ms)) == 37
    assert asyncio.run(build(None)) == 1500  # Faust's own, when not set
    assert load_settings().kafka_fetch_max_wait_ms == 50


def test_fetch_wait_setting_is_checked() -> None:
    with pytest.raises(SettingsError, match="SEGSTREAM_KAFKA_FETCH_MAX_WAIT_MS"):
        load_settings(kafka_fetch_max_wait_ms=0)


def test_worker_producer_takes_the_batch_size_setting(tmp_path: Path) -> None:
    """The outbox's producer batches up to ``SEGSTREAM_KAFKA_PRODUCE_BATCH_BYTES`` per
    partition, not Faust's 16 KiB (one request in flight per broker carries one batch per
    partition, so 16 KiB batches sent a batch's outbox in many sequential round trips)."""
    from stream.app import Engine

    assert load_settings().kafka_produce_batch_bytes == 512 * 1024
    s = load_settings(data_dir=tmp_path, kafka_produce_batch_bytes=300_000)
    cfg = Engine(s).app.producer._settings_default()  # what aiokafka's producer is given
    assert cfg["max_batch_size"] == 300_000
    assert cfg["acks"] == -1


def test_batch_size_setting_is_checked() -> None:
    with pytest.raises(SettingsError, match="SEGSTREAM_KAFKA_PRODUCE_BATCH_BYTES"):
        load_settings(kafka_produce_batch_bytes=1_000)


def test_app_creates_the_parents_of_its_data_directory(tmp_path: Path) -> None:
    """Faust makes the app's directory at start but not its parents (a fresh machine)."""
    datadir = tmp_path / "fresh" / "faust" / "app"
    LeanApp("datadir-test", broker="kafka://127.0.0.1:1", store="memory://",
            autodiscover=False, web_enabled=False, datadir=str(datadir))
    assert datadir.parent.is_dir()


@settings(max_examples=200, deadline=None)
@given(batch_max=st.integers(1, 100_000))
def test_what_one_fetch_returns_fits_above_the_pressure_mark(batch_max: int) -> None:
    """Faust pauses a partition at the buffer's pressure mark but still pushes the records
    already fetched; they must fit in the room left, or each of them waits for room."""
    conf = stream_buffering(load_settings(batch_max=batch_max))
    queue: ThrowableQueue[int] = ThrowableQueue(maxsize=conf["stream_buffer_maxsize"],
                                                flow_control=FlowControlEvent())
    room = queue.maxsize - queue.pressure_high_size
    assert room >= conf["broker_max_poll_records"] >= 1
    assert queue.maxsize >= 2 * batch_max


def test_worker_and_floor_apps_take_the_buffering(tmp_path: Path) -> None:
    from bench.floor import create_app
    from stream.app import Engine

    s = load_settings(data_dir=tmp_path, batch_max=3_000)
    want = stream_buffering(s)
    for conf in (Engine(s).app.conf, create_app(s, 1, tmp_path / "floor.json").conf):
        assert conf.stream_buffer_maxsize == want["stream_buffer_maxsize"]
        assert conf.broker_max_poll_records == want["broker_max_poll_records"] == 2_000
