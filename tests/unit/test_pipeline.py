"""The micro-batch step against the in-memory store twin: watermarks, dedupe, event time."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence

import orjson
import pytest

from features import serial
from features.state import derive
from features.store import MemoryFeatureStore
from stream.pipeline import BatchProcessor, RawRecord
from stream.schemas import DlqRecord
from stream.settings import load_settings

DAY = 86_400_000
T0 = 1_735_689_600_000
WALL = (T0 + 365 * DAY) / 1000


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        self.sent.extend(records)


def tx(i: int, cid: str, ts: int, amount: float = 10.0, eid: str | None = None) -> bytes:
    return orjson.dumps({"event_id": eid or f"e{i}", "customer_id": cid, "ts": ts,
                         "amount": amount})


def make() -> tuple[BatchProcessor, MemoryFeatureStore, Sink]:
    s = load_settings()
    store, sink = MemoryFeatureStore(), Sink()
    return BatchProcessor(s, store, sink, clock=lambda: WALL), store, sink


def run(p: BatchProcessor, recs: list[RawRecord]):
    return asyncio.run(p.process(recs))


def rec(off: int, value: bytes, key: bytes | None = b"c1", part: int = 0,
        topic: str = "transactions") -> RawRecord:
    return RawRecord(topic, part, off, key, value)


def purchases(store: MemoryFeatureStore, cid: str = "c1", part: int = 0) -> int:
    return derive(serial.decode(store.customers[(part, cid)]), store.global_now)["purchases_total"]


def store_copy(store: MemoryFeatureStore) -> tuple:
    """What the store holds, to put back later as a Redis restored from a copy would."""
    import copy

    return copy.deepcopy((store.meta, store.customers, store.profiles, store.tables,
                          store.global_now))


def put_back(store: MemoryFeatureStore, held: tuple) -> None:
    (store.meta, store.customers, store.profiles, store.tables, store.global_now) = held


def test_redelivered_offsets_are_skipped() -> None:
    p, store, _ = make()
    batch = [rec(i, tx(i, "c1", T0 + i)) for i in range(5)]
    run(p, batch)
    stats = run(p, batch[2:])  # a consumer rewound after a crash
    assert stats.skipped_below_watermark == 3
    assert purchases(store) == 5


def test_duplicate_event_ids_count_once() -> None:
    p, store, _ = make()
    run(p, [rec(0, tx(0, "c1", T0)), rec(1, tx(0, "c1", T0)), rec(2, tx(1, "c1", T0 + 5))])
    assert purchases(store) == 2


def test_timeout_after_applied_write_does_not_double_count() -> None:
    p, store, _ = make()
    store.fail_next_commit_after_apply = True
    stats = run(p, [rec(i, tx(i, "c1", T0 + i)) for i in range(3)])
    assert stats.store_retries == 1
    assert purchases(store) == 3


def fence_next_commit(store: MemoryFeatureStore) -> None:
    """Another owner commits to partition 0 right before the next commit: that commit's
    version is stale, once."""
    original = store.commit

    async def bump_then_commit(commits):
        store.commit = original
        store.meta.setdefault(0, {})["ver"] = store.meta.get(0, {}).get("ver", 0) + 1
        return await original(commits)

    store.commit = bump_then_commit


def test_conflicting_writer_is_retried_not_lost() -> None:
    p, store, _ = make()
    fence_next_commit(store)
    stats = run(p, [rec(0, tx(0, "c1", T0))])
    assert stats.conflicts == 1
    assert purchases(store) == 1


def test_too_late_and_future_events_go_to_the_dlq() -> None:
    p, store, sink = make()
    run(p, [rec(0, tx(0, "c1", T0 + 30 * DAY))])
    run(p, [rec(1, tx(1, "c1", T0)),  # 30 days behind its partition: too late
            rec(2, tx(2, "c1", T0 + 29 * DAY)),  # within 7 days: accepted
            rec(3, tx(3, "c1", int(WALL * 1000) + 3_600_000))])  # an hour in the future
    reasons = sorted(orjson.loads(v)["reason"] for _, _, v in sink.sent)
    assert reasons == ["from_future", "too_late"]
    assert purchases(store) == 2
    assert store.outboxes[0] == {}  # published and forgotten


def test_lateness_is_per_topic_partition_so_uneven_partitions_lose_nothing() -> None:
    p, store, sink = make()
    run(p, [rec(0, tx(0, "a", T0 + 300 * DAY), key=b"a", part=0)])
    run(p, [rec(0, tx(1, "b", T0), key=b"b", part=1)])  # partition 1 is far behind: fine
    assert sink.sent == []
    assert purchases(store, "b", 1) == 1


def test_poison_customer_is_dead_lettered_and_others_proceed(monkeypatch) -> None:
    import stream.pipeline as pl

    p, store, sink = make()
    real = pl.apply_owned

    def boom(state, events, lateness):
        if events[0].customer_id == "bad":
            raise RuntimeError("scoring exploded")
        return real(state, events, lateness)

    monkeypatch.setattr(pl, "apply_owned", boom)
    run(p, [rec(0, tx(0, "bad", T0), key=b"bad"), rec(1, tx(1, "c1", T0))])
    assert [orjson.loads(v)["reason"] for _, _, v in sink.sent] == ["processing_error"]
    assert purchases(store) == 1
    assert store.meta[0]["wm:transactions"] == 1


def test_a_state_no_store_can_hold_dead_letters_its_events_not_the_batch() -> None:
    """Sums past 64 bits cannot be encoded: that customer's events go to the DLQ, the
    other customers of the batch are applied and the partition moves on."""
    p, store, sink = make()
    # 2,000 purchases of 1e12 pass 2**63 ten-thousandths of a currency unit
    huge = [rec(i, tx(i, "big", T0 + i, amount=1e12), key=b"big") for i in range(2_000)]
    stats = run(p, [*huge, rec(2_000, tx(2_000, "c1", T0))])
    assert (0, "big") not in store.customers
    assert purchases(store) == 1
    reasons = [orjson.loads(v)["reason"] for _, _, v in sink.sent
               if orjson.loads(v).get("reason")]
    assert reasons == ["processing_error"] * 2_000
    assert stats.dead_letters == {"processing_error": 2_000}
    assert store.meta[0]["wm:transactions"] == 2_000


def test_dlq_payload_is_truncated_and_keeps_the_source() -> None:
    p, _, sink = make()
    big = b"x" * 10_000
    run(p, [rec(7, big)])
    d = orjson.loads(sink.sent[0][2])
    assert d["reason"] == "not_json"
    assert d["offset"] == 7 and d["source_topic"] == "transactions"
    assert d["payload_truncated"] is True
    assert len(d["payload"]) == load_settings().dlq_payload_bytes


@pytest.mark.parametrize("lead", [0, 1, 2, 3])
def test_a_utf8_payload_cut_inside_a_character_stays_text(lead: int) -> None:
    """Truncation at a byte limit that falls inside a multi-byte character keeps the
    whole characters before it as text; only a payload that is not UTF-8 is base64."""
    p, _, sink = make()
    limit = load_settings().dlq_payload_bytes
    raw = b"x" * lead + "\U0001F600".encode() * limit  # 4-byte characters
    run(p, [rec(7, raw)])
    d = orjson.loads(sink.sent[0][2])
    assert d["payload_encoding"] == "utf-8" and d["payload_truncated"] is True
    kept = d["payload"].encode()
    assert raw.startswith(kept) and limit - 3 <= len(kept) <= limit
    # a payload that is not UTF-8 before the cut is still base64
    p, _, sink = make()
    run(p, [rec(8, b"\xff" + raw)])
    d = orjson.loads(sink.sent[0][2])
    assert d["payload_encoding"] == "base64"
    assert base64.b64decode(d["payload"]) == (b"\xff" + raw)[:limit]


@pytest.mark.parametrize("key,text,encoding,truncated", [
    (b"c1", "c1", "utf-8", False),
    (b"\xffc1", base64.b64encode(b"\xffc1").decode(), "base64", False),
    # cut at 512 bytes inside a character: the whole characters before it
    (("a" + "\u00e9" * 300).encode(), "a" + "\u00e9" * 255, "utf-8", True),
    (b"\xff" * 600, base64.b64encode(b"\xff" * 512).decode(), "base64", True),
])
def test_a_dead_letters_key_keeps_the_records_key_bytes(key: bytes, text: str, encoding: str,
                                                       truncated: bool) -> None:
    """README: a dead letter carries the record's Kafka key (its first 512 bytes); a key that
    is not UTF-8 is given in base64, as the payload is, so its bytes can be recovered."""
    p, _, sink = make()
    run(p, [RawRecord("transactions", 0, 3, key, b"not json")])
    d = DlqRecord.model_validate_json(sink.sent[0][2])
    assert (d.key, d.key_encoding, d.key_truncated) == (text, encoding, truncated)
    raw = base64.b64decode(d.key) if encoding == "base64" else d.key.encode()
    assert key.startswith(raw)
    assert len(raw) == len(key) if not truncated else 509 <= len(raw) <= 512


def test_a_dead_letter_without_a_key_has_no_key_encoding() -> None:
    p, _, sink = make()
    run(p, [RawRecord("transactions", 0, 3, None, b"not json")])
    d = orjson.loads(sink.sent[0][2])
    assert (d["key"], d["key_encoding"], d["key_truncated"]) == (None, None, False)


@pytest.mark.parametrize("var,value", [("SEGSTREAM_PARTITIONS", "0"),
                                       ("SEGSTREAM_REDIS_URL", "http://x"),
                                       # a typo for database 10: redis-py would use 0
                                       ("SEGSTREAM_REDIS_URL", "redis://h:6379/1O"),
                                       ("SEGSTREAM_REDIS_URL", "redis://h:6379/-1"),
                                       ("SEGSTREAM_REDIS_URL", "unix:///tmp/r.sock?db=x"),
                                       ("SEGSTREAM_KAFKA_BOOTSTRAP", "h:\uff19\uff10"),
                                       ("SEGSTREAM_DLQ_PAYLOAD_BYTES", "1000000"),
                                       ("SEGSTREAM_REDIS_PREFIX", "{bad}")])
def test_invalid_setting_names_the_variable(monkeypatch, var: str, value: str) -> None:
    from stream.errors import SettingsError

    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var):
        load_settings()


@pytest.mark.parametrize("url", ["redis://h:6379", "redis://h:6379/", "redis://h:6379/12",
                                 "rediss://u:p@h:6380/0", "unix:///tmp/r.sock?db=3"])
def test_valid_redis_urls_are_accepted(monkeypatch, url: str) -> None:
    monkeypatch.setenv("SEGSTREAM_REDIS_URL", url)
    assert load_settings().redis_url == url


@pytest.mark.parametrize("fill", [b"\x01", b'"', b"\xff", "\u2028".encode()])
def test_the_largest_dead_letter_fits_kafkas_default_record_limit(monkeypatch, fill) -> None:
    """At the largest SEGSTREAM_DLQ_PAYLOAD_BYTES, a dead letter of the worst bytes (JSON
    escapes a control character to six) with the longest key and error stays under 1 MB."""
    from stream.schemas import Rejection

    monkeypatch.setenv("SEGSTREAM_DLQ_PAYLOAD_BYTES", "160000")
    p, _, _ = make()
    raw = fill * 400_000
    dl = p.dead_letter(RawRecord("transactions", 0, 1, b"\x01" * 10_000, raw),
                       Rejection("invalid_schema", "\x01" * 5_000))
    assert len(dl) < 1_000_000
    d = orjson.loads(dl)
    assert d["payload_truncated"] is True


def test_each_stage_of_a_batch_is_reported_once_per_attempt_and_within_the_batch() -> None:
    p, store, _ = make()
    seen: list[tuple[str, float]] = []
    p.on_stage = lambda name, s: seen.append((name, s))
    original = store.load

    async def slow_load(*a, **k):
        await asyncio.sleep(0.03)  # the load stage must carry this, no other stage
        return await original(*a, **k)

    store.load = slow_load
    t0 = time.perf_counter()
    run(p, [rec(0, tx(0, "c1", T0)), rec(1, tx(1, "c2", T0), key=b"c2")])
    total = time.perf_counter() - t0
    names = [n for n, _ in seen]
    assert names == ["decode", "refresh", "load", "evaluate", "publish_wait", "commit", "publish"]
    spent = dict(seen)
    assert spent["load"] >= 0.03 and all(v < 0.03 for k, v in spent.items() if k != "load")
    assert sum(spent.values()) <= total


def test_a_fenced_attempt_reports_its_stages_again() -> None:
    p, store, _ = make()
    seen: list[str] = []
    p.on_stage = lambda name, s: seen.append(name)
    fence_next_commit(store)
    stats = run(p, [rec(0, tx(0, "c1", T0))])
    assert stats.conflicts == 1
    assert seen.count("decode") == 1 and seen.count("load") == 2 and seen.count("commit") == 2


def test_dlq_record_key_is_cut_so_a_huge_key_cannot_block_the_outbox() -> None:
    # A rejected record's key can be as large as the input topic allows (megabytes); its
    # dead letter used it whole as its Kafka key, over the producer's request limit.
    from stream.pipeline import DLQ_KEY_BYTES

    p, store, sink = make()
    run(p, [rec(0, b"not json", key=b"k" * 2_000_000), rec(1, tx(1, "c1", T0))])
    [(_, key, value)] = [r for r in sink.sent if r[0] == p.settings.dlq_topic]
    assert key == b"k" * DLQ_KEY_BYTES
    assert orjson.loads(value)["key"] == "k" * DLQ_KEY_BYTES
    assert purchases(store) == 1


@pytest.mark.parametrize("where", ["load", "commit"])
def test_a_batch_that_fails_unexpectedly_is_retried_not_dropped(where: str,
                                                                 monkeypatch) -> None:
    """Any error escaping an attempt (not only StoreUnavailable) retries the batch: an
    error that escaped process() crashed the ingest agent, and the batch in flight was
    never fetched again while the next batches' watermarks passed over it."""
    import stream.pipeline as pipeline_mod

    async def no_wait(_s: float) -> None:
        return None

    monkeypatch.setattr(pipeline_mod.asyncio, "sleep", no_wait)
    p, store, _ = make()
    real = getattr(store, where)
    failures = [2]

    async def flaky(*args, **kwargs):
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError(f"{where} went wrong")
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, where, flaky)
    stats = run(p, [rec(i, tx(i, "c1", T0 + i)) for i in range(3)])
    assert failures == [0] and stats.store_retries == 2
    assert purchases(store) == 3


class FailingOnce(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    async def publish(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        if self.fail:
            self.fail = False
            raise RuntimeError("output topic unavailable")
        self.sent.extend(records)


def test_a_large_stored_outbox_is_read_back_in_slices_that_let_the_loop_run(
        monkeypatch) -> None:
    import stream.pipeline as pipeline

    monkeypatch.setattr(pipeline, "OUTBOX_SLICE", 4)
    s = load_settings()
    store, sink = MemoryFeatureStore(), FailingOnce()
    bp = BatchProcessor(s, store, sink, clock=lambda: WALL)
    bad = [rec(i, b"{not json " + str(i).encode(), key=f"k{i}".encode()) for i in range(25)]
    run(bp, bad)  # 25 dead letters committed; their publish failed: left in the outbox
    assert sink.sent == [] and len(store.outboxes[0]) == 25
    slices: list[int] = []
    bp.on_published = lambda recs: slices.append(len(recs))

    async def flush_with_ticker() -> int:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        await bp.flush_outbox([0])
        done = True
        await t
        return ticks - before

    ticks = asyncio.run(flush_with_ticker())
    # every dead letter published once, oldest first, and the outbox emptied
    assert [orjson.loads(v)["offset"] for _, _, v in sink.sent] == list(range(25))
    assert store.outboxes.get(0, {}) == {}
    assert slices == [4, 4, 4, 4, 4, 4, 1]
    # the loop ran other tasks between the slices: at least once per slice read back
    assert ticks >= 6, ticks


def test_a_record_decoded_when_fetched_is_not_decoded_again(monkeypatch) -> None:
    """The consumer decodes input records as it fetches them; a batch applies what they
    carry and still judges event time against the wall clock of the batch."""
    import stream.pipeline as pipeline_mod

    p, store, sink = make()
    fetched = [rec(0, tx(0, "c1", T0)), rec(1, tx(1, "c1", int(WALL * 1000) + 3_600_000)),
               rec(2, b"not json")]
    early = [RawRecord(r.topic, r.partition, r.offset, r.key, r.value, None,
                       p.decode_record(r.topic, r.key, r.value)) for r in fetched]
    calls: list[bytes | None] = []
    real = pipeline_mod.decode

    def counting(kind, key, value, max_bytes):
        calls.append(value)
        return real(kind, key, value, max_bytes)

    monkeypatch.setattr(pipeline_mod, "decode", counting)
    run(p, early)
    assert calls == []
    assert purchases(store) == 1
    reasons = sorted(orjson.loads(v)["reason"] for t, _, v in sink.sent
                     if t == p.settings.dlq_topic)
    assert reasons == ["from_future", "not_json"]


@pytest.mark.parametrize("background", [False, True])
def test_a_store_that_lost_committed_writes_stops_the_worker_before_it_skips_them(
        background: bool) -> None:
    """Redis went back to an older copy while the worker ran (a failover to a lagging
    replica, say): the consumer is past records the store no longer holds. The next batch
    must not move the watermark past them; a worker restarted from the store's watermark
    then applies every record exactly once."""
    from stream.errors import PipelineFailed

    s = load_settings()
    store, sink = MemoryFeatureStore(), Sink()
    recs = [rec(i, tx(i, "c1", T0 + i * 1000)) for i in range(30)]

    def processor() -> BatchProcessor:
        return BatchProcessor(s, store, sink, clock=lambda: WALL,
                              background_publish=background, background_commit=background)

    async def scenario() -> tuple[BatchProcessor, int]:
        p = processor()
        await p.process(recs[:10])
        await p.drain()
        older = store_copy(store)
        await p.process(recs[10:20])
        await p.drain()
        # the store goes back to what it held after the first batch
        put_back(store, older)
        with pytest.raises(PipelineFailed, match="lost committed writes"):
            await p.process(recs[20:30])
        stuck = store.meta[0]["wm:transactions"]
        # the restart reads again from the store's watermark
        restarted = processor()
        await restarted.process(recs[stuck + 1:])
        await restarted.drain()
        return restarted, stuck

    _, stuck = asyncio.run(scenario())
    assert stuck == 9
    assert store.meta[0]["wm:transactions"] == 29
    assert purchases(store) == 30


def test_watermarks_another_owner_moved_forward_are_not_taken_for_lost_writes() -> None:
    p, store, _ = make()
    run(p, [rec(i, tx(i, "c1", T0 + i)) for i in range(5)])
    store.meta[0]["wm:transactions"] = 40  # another worker applied up to 40 meanwhile
    stats = run(p, [rec(i, tx(i, "c1", T0 + i)) for i in range(38, 45)])
    assert stats.skipped_below_watermark == 3
    assert purchases(store) == 5 + 4


def test_a_commit_whose_reply_was_lost_still_counts_when_the_store_loses_it_later() -> None:
    """The commit of offsets 10-19 was applied but its reply timed out: the retry reads
    watermark 19 and commits nothing. If the store then goes back to watermark 9, the next
    batch must stop, not commit 20-29 over the hole."""
    from stream.errors import PipelineFailed

    p, store, _ = make()
    recs = [rec(i, tx(i, "c1", T0 + i * 1000)) for i in range(30)]

    async def scenario() -> None:
        await p.process(recs[:10])
        older = store_copy(store)
        store.fail_next_commit_after_apply = True
        stats = await p.process(recs[10:20])
        assert stats.store_retries == 1
        put_back(store, older)
        with pytest.raises(PipelineFailed, match="lost committed writes"):
            await p.process(recs[20:30])

    asyncio.run(scenario())
    assert store.meta[0]["wm:transactions"] == 9


def test_a_partition_given_back_after_another_owner_saw_a_loss_is_not_a_loss() -> None:
    """Revoked, the partition's watermarks are forgotten: the store went back while
    another worker owned it, and the new assignment's seek already starts from there."""
    p, store, _ = make()
    recs = [rec(i, tx(i, "c1", T0 + i * 1000)) for i in range(30)]

    async def scenario() -> None:
        await p.process(recs[:10])
        older = store_copy(store)
        await p.process(recs[10:20])
        p.forget_partitions([0])
        put_back(store, older)
        await p.process(recs[10:30])  # read again from the store's watermark

    asyncio.run(scenario())
    assert store.meta[0]["wm:transactions"] == 29
    assert purchases(store) == 30


def test_a_record_in_another_partition_than_its_key_s_is_a_dead_letter() -> None:
    """A customer's records placed by another partitioner (librdkafka's default crc32) or
    an explicit partition started a second state of the customer in that partition: two
    half-histories, two segment counts, and a forget that left one behind."""
    from aiokafka.partitioner import murmur2

    s = load_settings()
    store, sink = MemoryFeatureStore(), Sink()
    p = BatchProcessor(s, store, sink, clock=lambda: WALL, check_partitions=True)
    home = (murmur2(b"m1") & 0x7FFFFFFF) % s.partitions
    away = (home + 1) % s.partitions
    stats = run(p, [rec(0, tx(0, "m1", T0, 10.0), key=b"m1", part=home),
                    rec(0, tx(1, "m1", T0 + 5, 20.0), key=b"m1", part=away),
                    rec(1, tx(2, "m1", T0 + 9, 5.0), key=b"m1", part=home)])
    assert stats.dead_letters == {"wrong_partition": 1}
    assert purchases(store, "m1", home) == 2
    assert (away, "m1") not in store.customers
    [dlq] = [DlqRecord.model_validate_json(v) for t, _, v in sink.sent if t == s.dlq_topic]
    assert dlq.reason == "wrong_partition" and dlq.partition == away
    assert f"belongs in partition {home} of {s.partitions}" in dlq.error
