"""Outbox records carry a migration's move, so the worker's metrics need not parse its JSON.

The moves are checked against the published migration JSON itself, and records written by
earlier versions (no move, no order, no ingestion time) still decode and still count.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import msgpack
import orjson
from hypothesis import given
from hypothesis import strategies as st

from scorers.rules import default_catalogue
from stream.backend import EngineBackend
from stream.metrics import EngineMetrics
from stream.pipeline import OutboxRecord, encode_outbox, outbox_order, unpack_outbox
from tests.unit.test_segments_pipeline import DAY, T0, Harness

names = st.text(min_size=1, max_size=12)


@given(topic=names, key=st.none() | st.binary(max_size=20), value=st.binary(max_size=50),
       ingested=st.none() | st.integers(0, 2**53), order=st.tuples(st.integers(0, 2**40),
                                                                   st.integers(0, 10**6)),
       move=st.none() | st.tuples(names, st.none() | names, names))
def test_an_outbox_record_decodes_to_what_was_encoded(
        topic: str, key: bytes | None, value: bytes, ingested: int | None,
        order: tuple[int, int], move: tuple[str, str | None, str] | None) -> None:
    blob = encode_outbox(topic, key, value, ingested, order, move)
    assert unpack_outbox(blob) == OutboxRecord(topic, key, value, ingested, move, order)
    assert outbox_order(blob) == order


def test_records_of_earlier_versions_decode_without_a_move() -> None:
    legacy = [["m", b"c", b"{}"], ["m", b"c", b"{}", 7], ["m", b"c", b"{}", 7, 3, 1]]
    got = [unpack_outbox(msgpack.packb(row)) for row in legacy]
    assert got == [OutboxRecord("m", b"c", b"{}", None, None),
                   OutboxRecord("m", b"c", b"{}", 7, None),
                   OutboxRecord("m", b"c", b"{}", 7, None, (3, 1))]


class _Captured:
    """The processor's ``on_published`` hook, keeping what it was handed."""

    def __init__(self) -> None:
        self.records: list[OutboxRecord] = []

    def __call__(self, records: list[OutboxRecord]) -> None:
        self.records.extend(records)


def _run_customers() -> tuple[Harness, _Captured]:
    h = Harness(default_catalogue().without_anti_flapping())
    hook = _Captured()
    h.p.on_published = hook
    for day in range(0, 120, 3):
        h.buy([(f"c{i}", T0 + day * DAY + i, 5.0 + 40.0 * ((day // 3 + i) % 4))
               for i in range(6)])
    return h, hook


def test_each_published_migration_carries_the_move_its_json_states() -> None:
    h, hook = _run_customers()
    published = h.sink.migrations()
    assert len(published) >= 10
    moves = [r for r in hook.records if r.topic == "segment-migrations"]
    assert [orjson.loads(r.value) for r in moves] == published
    for r, m in zip(moves, published, strict=True):
        assert r.move == (m["scheme"], m["from_segment"], m["to_segment"])
        assert r.key == m["customer_id"].encode()


class _Engine:
    def __init__(self, settings: Any) -> None:
        self.settings = settings


def _flows(backend: EngineBackend) -> Counter[tuple[str, str | None, str]]:
    return Counter({(s, f, t): n for s, rows in backend.flows.items()
                    for (f, t), n in rows.items()})


def _series(metrics: EngineMetrics) -> tuple[Counter[tuple[str, str, str]], float]:
    """Migrations counted per (scheme, from, to) label set, and latency observations."""
    counts: Counter[tuple[str, str, str]] = Counter()
    latencies = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "segstream_migrations_total":
                lab = sample.labels
                counts[(lab["scheme"], lab["from_segment"], lab["to_segment"])] += int(
                    sample.value)
            elif sample.name == "segstream_migration_latency_seconds_count":
                latencies += sample.value
    return counts, latencies


def test_the_metrics_count_the_same_flows_with_or_without_the_carried_move() -> None:
    h, hook = _run_customers()
    # As if each input had reached Kafka one second before its migration was published.
    ingested = int(time.time() * 1000) - 1000
    records = [OutboxRecord(r.topic, r.key, r.value, ingested, r.move) for r in hook.records]
    carried = EngineBackend(_Engine(h.s), EngineMetrics())  # type: ignore[arg-type]
    carried.on_published(records)
    # Records of an earlier version: the 6-field row, decoded as the publish decodes it.
    legacy = EngineBackend(_Engine(h.s), EngineMetrics())  # type: ignore[arg-type]
    legacy.on_published([unpack_outbox(msgpack.packb([r.topic, r.key, r.value, ingested, 0, i]))
                         for i, r in enumerate(records)])
    expected = Counter((m["scheme"], m["from_segment"], m["to_segment"])
                       for m in h.sink.migrations())
    assert sum(expected.values()) >= 10
    assert _flows(carried) == _flows(legacy) == expected
    assert carried._counts["migrations"] == sum(expected.values())
    labelled = Counter({(s, f or "", t): n for (s, f, t), n in expected.items()})
    for backend in (carried, legacy):
        counts, latencies = _series(backend.metrics)
        assert counts == labelled
        assert latencies == sum(expected.values())


def test_a_stale_partition_publishes_moves_read_back_from_the_store() -> None:
    h, hook = _run_customers()
    before = len(h.sink.migrations())
    # A commit whose publish was cut short: its records wait in the stored outbox, and a
    # flush without what a commit just wrote reads them back from the store.
    blob = encode_outbox("segment-migrations", b"cX", orjson.dumps(
        {"scheme": "rfm", "from_segment": None, "to_segment": "New"}), None, (10**9, 0),
        ("rfm", None, "New"))
    h.store.outboxes.setdefault(0, {})["m:left-behind"] = blob
    hook.records.clear()
    asyncio.run(h.p.flush_outbox([0]))
    assert len(h.sink.migrations()) == before + 1
    assert [r.move for r in hook.records] == [("rfm", None, "New")]
