"""Input at the edges of the contract: reused and duplicate ids, large amounts, timestamps."""
from __future__ import annotations

import asyncio
import random
from decimal import ROUND_HALF_EVEN, Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features import serial
from features.events import MS_PER_DAY as DAY
from features.events import TransactionEvent as T
from features.state import apply_many, derive, empty
from features.store import MemoryFeatureStore
from stream.pipeline import BatchProcessor, RawRecord
from stream.schemas import decode
from stream.settings import load_settings

T0 = 1_735_689_600_000


class Sink:
    def __init__(self) -> None:
        self.sent: list = []

    async def publish(self, recs) -> None:
        self.sent.extend(recs)


def _proc():
    st, sink = MemoryFeatureStore(), Sink()
    bp = BatchProcessor(load_settings(), st, sink, clock=lambda: (T0 + 365 * DAY) / 1000)
    return bp, st, sink


def _tx(eid: str, ts: int, amount: float = 10) -> bytes:
    return orjson.dumps({"event_id": eid, "customer_id": "c1", "ts": ts, "amount": amount})


def _run(batches: list[list[tuple[str, int]]]) -> dict:
    bp, st, _ = _proc()
    off = 0
    for b in batches:
        recs = []
        for eid, ts in b:
            recs.append(RawRecord("transactions", 0, off, b"c1", _tx(eid, ts)))
            off += 1
        asyncio.run(bp.process(recs))
    return derive(serial.decode(st.customers[(0, "c1")]), st.global_now)


def test_reused_event_id_counts_the_same_whatever_the_batching() -> None:
    """README (Correctness model): "an id reused with a timestamp more than 7 days after the
    first is taken for a new event"; DESIGN §2: state equals a batch recomputation after
    any restart (i.e. whatever the micro-batch boundaries). Same records, same offsets."""
    a, b, a2 = ("A", T0), ("B", T0 + int(7.5 * DAY)), ("A", T0 + 8 * DAY)
    split = _run([[a], [b], [a2]])
    joined = _run([[a], [b, a2]])
    alone = _run([[a], [a2]])
    assert split["purchases_total"] == joined["purchases_total"] == 3
    assert alone["purchases_total"] == 2


def test_a_discarded_duplicate_does_not_move_engine_time() -> None:
    """DESIGN §2: now is the largest timestamp *accepted*; a record whose event_id was
    already applied is not applied again, so it must not age every customer nor make valid
    events too late."""
    bp, st, sink = _proc()
    asyncio.run(bp.process([RawRecord("transactions", 0, 0, b"c1", _tx("e1", T0))]))
    asyncio.run(bp.process([RawRecord("transactions", 0, 1, b"c1", _tx("e1", T0 + 6 * DAY))]))
    asyncio.run(bp.process([RawRecord("transactions", 0, 2, b"c1",
                                      _tx("e2", T0 - int(1.5 * DAY)))]))
    assert st.global_now == T0
    assert [orjson.loads(v)["reason"] for _, _, v in sink.sent] == []
    f = derive(serial.decode(st.customers[(0, "c1")]), st.global_now)
    assert (f["purchases_total"], f["recency_days"]) == (2, 0)


@pytest.mark.parametrize("text", ["785864134478.8205", "999999999999.9999", "651180653605.9472",
                                  "500000000001.37"])
def test_large_amounts_are_summed_exactly_in_ten_thousandths(text: str) -> None:
    """README (Features): money is summed in integer units of 1/10,000 (DESIGN §4: sums are
    exact); amounts up to 1e12 are valid."""
    value = orjson.dumps({"event_id": "e", "customer_id": "c1", "ts": T0}).replace(
        b"}", b',"amount":' + text.encode() + b"}")
    ev = decode("transactions", b"c1", value, 65536)
    ip, fr = text.split(".")
    assert ev.amount_units == int(ip) * 10_000 + int(fr.ljust(4, "0"))


def test_four_decimal_amounts_below_1e12_are_exact_property() -> None:
    rnd = random.Random(0)
    bad = []
    for _ in range(20_000):
        ip, fr = rnd.randint(0, 10**12 - 1), rnd.randint(0, 9999)
        v = (b'{"event_id":"e","customer_id":"c1","ts":0,"amount":'
             + f"{ip}.{fr:04d}".encode() + b"}")
        if decode("transactions", b"c1", v, 65536).amount_units != ip * 10_000 + fr:
            bad.append(f"{ip}.{fr:04d}")
    assert bad == []


def test_an_id_is_deduplicated_per_input_topic() -> None:
    """A click and a purchase are different events even when their producers picked the
    same id (README, Correctness model): each counts once, and a repeat of either does not."""
    bp, st, _ = _proc()
    click = orjson.dumps({"event_id": "X", "customer_id": "c1", "ts": T0, "event_type": "login"})
    asyncio.run(bp.process([RawRecord("transactions", 0, 0, b"c1", _tx("X", T0)),
                            RawRecord("clickstream", 0, 0, b"c1", click)]))
    asyncio.run(bp.process([RawRecord("transactions", 0, 1, b"c1", _tx("X", T0)),
                            RawRecord("clickstream", 0, 1, b"c1", click)]))
    f = derive(serial.decode(st.customers[(0, "c1")]), st.global_now)
    assert (f["purchases_total"], f["events_total"]) == (1, 1)


@pytest.mark.parametrize("ts", ["20250101T000000Z", "2025-W01-1T00:00:00Z", "2025-01-01T00:00Z",
                                "2025-01-01T00:00:00+0000", "2025-01-01T00:00:00,5Z",
                                "2025-01-01T00:00:00+05:99", "2025-01-01T00:00:00-00:60",
                                "2025-01-01T00:00:00+24:00", "2025-01-01T00:00:00+00:75",
                                # RFC 3339 has no room for whitespace or control characters
                                " 2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z\n",
                                "\x1c2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z\x1f",
                                "\x852025-01-01T00:00:00Z", "\u20282025-01-01T00:00:00Z"])
def test_timestamps_that_are_not_rfc3339_are_rejected(ts: str) -> None:
    """DESIGN §3: ts is an RFC 3339 string or epoch ms; README: a record failing the schema
    goes to the DLQ as invalid_schema. datetime.fromisoformat (3.11) takes ISO 8601 forms."""
    v = orjson.dumps({"event_id": "e", "customer_id": "c1", "ts": ts, "event_type": "login"})
    res = decode("clickstream", b"c1", v, 65536)
    assert getattr(res, "reason", None) == "invalid_schema"


def test_rfc3339_leap_second_is_accepted() -> None:
    """RFC 3339 §5.6 allows time-second 60 (2016-12-31T23:59:60Z was a real leap second)."""
    v = orjson.dumps({"event_id": "e", "customer_id": "c1", "ts": "2016-12-31T23:59:60Z",
                      "event_type": "login"})
    assert not hasattr(decode("clickstream", b"c1", v, 65536), "reason")


def test_pure_state_is_independent_of_grouping_for_reused_ids() -> None:
    a, b, a2 = T("A", "c", 0, 100), T("B", "c", int(7.5 * DAY), 100), T("A", "c", 8 * DAY, 100)
    one = apply_many(apply_many(apply_many(empty(), [a]), [b]), [a2])
    two = apply_many(apply_many(empty(), [a]), [b, a2])
    assert derive(one, 8 * DAY)["purchases_total"] == derive(two, 8 * DAY)["purchases_total"]


def _txc(eid: str, cid: str, ts: int, amount: float = 10) -> bytes:
    return orjson.dumps({"event_id": eid, "customer_id": cid, "ts": ts, "amount": amount})


def test_a_poison_customers_events_do_not_move_engine_time() -> None:
    """DESIGN §2: now is the largest timestamp *accepted*. Events dead-lettered because their
    customer's state cannot be stored were not accepted: they must neither age the other
    customers nor make their valid events too late."""
    bp, st, sink = _proc()
    asyncio.run(bp.process([RawRecord("transactions", 0, 0, b"c1", _txc("a", "c1", T0))]))
    # 2,000 purchases of 1e12 pass 2**63 ten-thousandths: no store can hold the sum
    huge = [RawRecord("transactions", 0, 1 + i, b"big", _txc(f"b{i}", "big", T0 + 30 * DAY,
                                                             1e12)) for i in range(2_000)]
    mixed = [*huge, RawRecord("transactions", 0, 2_001, b"c2", _txc("c", "c2", T0 + DAY))]
    stats = asyncio.run(bp.process(mixed))
    assert stats.dead_letters == {"processing_error": 2_000}
    assert st.global_now == T0 + DAY
    late = asyncio.run(bp.process([RawRecord("transactions", 0, 2_002, b"c1",
                                             _txc("d", "c1", T0 + 2 * DAY))]))
    assert late.dead_letters == {}
    f = derive(serial.decode(st.customers[(0, "c1")]), st.global_now)
    assert (f["purchases_total"], f["recency_days"]) == (2, 0)
    assert st.meta[0]["wm:transactions"] == 2_002
    assert [orjson.loads(v)["reason"] for _, _, v in sink.sent
            if orjson.loads(v).get("reason")] == ["processing_error"] * 2_000


def test_a_customer_whose_scoring_fails_does_not_move_engine_time(monkeypatch) -> None:
    """The same when evaluation raises for one customer: the others are scored at the engine
    time of the accepted events only."""
    import stream.pipeline as pl
    from scorers.rules import default_catalogue
    from stream.runtime import StaticScoring

    wall = (T0 + 365 * DAY) / 1000
    settings = load_settings()
    st, sink = MemoryFeatureStore(), Sink()
    scoring = StaticScoring(settings, st, default_catalogue(), None, clock=lambda: wall)
    bp = BatchProcessor(settings, st, sink, clock=lambda: wall, scoring=scoring)
    real = pl.evaluate
    seen_now: list[int] = []

    def fail_bad(inputs, ctx):
        if any(c.customer_id == "bad" for c in inputs):
            raise RuntimeError("boom")
        seen_now.append(ctx.now_ms)
        return real(inputs, ctx)

    monkeypatch.setattr(pl, "evaluate", fail_bad)
    recs = [RawRecord("transactions", 0, 0, b"c1", _txc("a", "c1", T0)),
            RawRecord("transactions", 0, 1, b"bad", _txc("b", "bad", T0 + 20 * DAY))]
    stats = asyncio.run(bp.process(recs))
    assert stats.dead_letters == {"processing_error": 1}
    assert st.global_now == T0
    assert seen_now[-1] == T0  # the kept evaluation (the first attempt's is discarded)
    assert (0, "bad") not in st.customers and (0, "c1") in st.customers
    assert [orjson.loads(v)["reason"] for t, _, v in sink.sent
            if t == settings.dlq_topic] == ["processing_error"]


@pytest.mark.parametrize("amount, units", [("2e10", 200_000_000_000_000),
                                            ("1.00005", 10_000), ("1.5", 15_000),
                                            ("123456789.00015", 1_234_567_890_002)])
def test_a_deeply_nested_unknown_field_does_not_decide_whether_a_record_is_accepted(
        amount: str, units: int) -> None:
    """Unknown fields are ignored however deep (up to orjson's limit). An amount that is
    re-read as a decimal (large, or near a half unit) went through the standard library's
    JSON parser, whose nesting limit is lower: the record was rejected for its amount."""
    deep = "[" * 1_000 + "]" * 1_000
    rec = (f'{{"event_id":"b","customer_id":"c2","ts":{T0},"amount":{amount},"x":{deep}}}'
           ).encode()
    res = decode("transactions", b"c2", rec, 1_000_000)
    assert isinstance(res, T) and res.amount_units == units, res
    assert res.amount_units == int((Decimal(amount) * 10_000).to_integral_value(
        ROUND_HALF_EVEN))
    bp, st, _sink = _proc()
    stats = asyncio.run(bp.process([RawRecord("transactions", 0, 0, b"c1", _tx("g", T0)),
                                    RawRecord("transactions", 0, 1, b"c2", rec)]))
    assert stats.dead_letters == {} and stats.applied == 2
    assert derive(serial.decode(st.customers[(0, "c2")]), T0)["monetary_total"] == units / 10_000


@pytest.mark.parametrize("items", ["2", "-5", '"abc"', '{"sku": "a"}', "2.5", "1e30", "true",
                                   '[{"sku": "a", "qty": 2}]', "null",
                                   # valid JSON numbers beyond a double's range
                                   "1e400", "-1e400", "1" * 401, "9" * 5001,
                                   '{"qty": [1e999]}'])
def test_a_purchase_is_never_lost_over_its_items(items: str) -> None:
    """The engine does not read ``items``: any JSON value is accepted, by both decoders."""
    rec = (f'{{"event_id":"b","customer_id":"c2","ts":{T0},"amount":3.5,"kind":"purchase",'
           f'"items":{items}}}').encode()
    res = decode("transactions", b"c2", rec, 10_000)
    assert isinstance(res, T) and res.amount_units == 35_000, res
    # with a field the fast path leaves to the model, the model accepts it too
    res = decode("transactions", b"c2", rec.replace(b'"amount":3.5', b'"amount":3.50001'),
                 10_000)
    assert isinstance(res, T) and res.amount_units == 35_000, res


@pytest.mark.parametrize("currency", ['" "', '"\\u0000"', '"US\\nD"', '""', '"ABCDEFGHI"', "5"])
def test_a_currency_that_is_not_text_of_one_to_eight_characters_is_rejected(
        currency: str) -> None:
    rec = (f'{{"event_id":"b","customer_id":"c2","ts":{T0},"amount":3.5,'
           f'"currency":{currency}}}').encode()
    res = decode("transactions", b"c2", rec, 10_000)
    assert res.reason == "invalid_schema" and res.error.startswith("currency"), res


def test_the_deployments_currency_dead_letters_transactions_in_another() -> None:
    """``SEGSTREAM_CURRENCY`` set: another currency is a ``currency`` dead letter (any case
    names the same one), none is taken to be the deployment's; unset, all are summed."""
    def tx(eid: str, currency: str | None) -> bytes:
        doc = {"event_id": eid, "customer_id": "c1", "ts": T0, "amount": 10}
        if currency is not None:
            doc["currency"] = currency
        return orjson.dumps(doc)

    recs = [RawRecord("transactions", 0, i, b"c1", tx(f"e{i}", c))
            for i, c in enumerate(["USD", "usd", None, "JPY", "EUR", "u\u017fd"])]
    # "u\u017fd" (a long s) is "USD" to str.upper(), not to ISO 4217
    for setting, kept, dead in ((None, 6, {}), ("USD", 3, {"currency": 3}),
                                ("usd", 3, {"currency": 3})):
        st, sink = MemoryFeatureStore(), Sink()
        bp = BatchProcessor(load_settings(currency=setting), st, sink,
                            clock=lambda: (T0 + 365 * DAY) / 1000)
        stats = asyncio.run(bp.process(recs))
        assert stats.dead_letters == dead, setting
        feats = derive(serial.decode(st.customers[(0, "c1")]), T0)
        assert feats["monetary_total"] == 10 * kept, (setting, feats["monetary_total"])
        if dead:
            dl = [orjson.loads(v) for _, _, v in sink.sent if orjson.loads(v).get("reason")]
            assert sorted(d["offset"] for d in dl) == [3, 4, 5]
            assert all("SEGSTREAM_CURRENCY" in d["error"] for d in dl), dl


def test_a_currency_setting_that_is_not_three_letters_fails_naming_it() -> None:
    from stream.errors import SettingsError

    for bad in ("US", "USDX", "U$D", ""):
        with pytest.raises((SettingsError, ValueError), match=r"currency|CURRENCY"):
            load_settings(currency=bad)


def _reference_purchases(records: list[tuple[str, int]], lateness: int) -> int:
    """Independent reading of the README's rules, records in arrival order: a record more
    than ``lateness`` behind the newest accepted one is too late; an id seen before
    (never forgotten here) at a timestamp within ``lateness`` of that first one is a
    duplicate; anything else is a new purchase, and an id reused later starts again."""
    first: dict[str, int] = {}
    newest, count = None, 0
    for eid, ts in records:
        if newest is not None and ts < newest - lateness:
            continue
        seen = first.get(eid)
        if seen is not None and ts - seen <= lateness:
            continue
        first[eid] = ts
        newest = ts if newest is None else max(newest, ts)
        count += 1
    return count


def test_a_duplicate_counts_once_after_its_first_copy_is_a_lateness_old() -> None:
    """An id first seen at t is a duplicate up to t + 7 days, and such a record is still
    accepted while the newest event is at most 7 days past it: the id must be kept that
    long. It was kept 7 days behind the newest event only, so in a later batch it was
    counted again (in the same batch it was not)."""
    recs = [("A", T0), ("B", T0 + 7 * DAY + 1), ("A", T0 + 6 * DAY)]
    split = _run([[r] for r in recs])
    joined = _run([recs])
    assert split["purchases_total"] == joined["purchases_total"] == 2
    assert split["monetary_total"] == joined["monetary_total"] == 20


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_duplicates_and_reused_ids_count_as_the_reference_whatever_the_batching(
        data: st.DataObject) -> None:
    """Records of a few ids at timestamps spread over weeks, in any arrival order and any
    split into micro-batches: the purchases counted equal an independent reading of the
    rules (which never forgets an id)."""
    lateness = 7 * DAY
    n = data.draw(st.integers(1, 12))
    recs = [(data.draw(st.sampled_from("ABCD")),
             T0 + data.draw(st.integers(0, 40)) * DAY // 2 + data.draw(st.sampled_from(
                 [0, 1, -1, DAY // 3]))) for _ in range(n)]
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=n))))
    batches = [recs[i:j] for i, j in zip([0, *cuts], [*cuts, n], strict=True) if recs[i:j]]
    got = _run(batches)
    assert got["purchases_total"] == _reference_purchases(recs, lateness)


@pytest.mark.parametrize(("ts", "ms"), [("2025-01-01T05:30:00+05:30", 1_735_689_600_000),
                                        ("2025-01-01T00:00:00-23:59", 1_735_775_940_000),
                                        ("2025-01-01T23:59:00+23:59", 1_735_689_600_000)])
def test_rfc3339_offsets_up_to_23_59_are_read(ts: str, ms: int) -> None:
    v = orjson.dumps({"event_id": "e", "customer_id": "c1", "ts": ts, "event_type": "login"})
    assert decode("clickstream", b"c1", v, 65536).ts_ms == ms


@pytest.mark.parametrize(("text", "units"), [("1.00005", 10_000), ("0.00015", 2),
                                             ("0.00005", 0), ("2.00025", 20_002),
                                             ("123456.78915", 1_234_567_892),
                                             ("1.000051", 10_001), ("0.00016", 2)])
def test_amounts_round_half_even_on_the_decimal_they_write(text: str, units: int) -> None:
    """README (Features): amounts are summed in units of 1/10,000, rounded half-even; the
    rounding is the decimal's, not the nearest double's."""
    value = b'{"event_id":"e","customer_id":"c1","ts":0,"amount":' + text.encode() + b"}"
    assert decode("transactions", b"c1", value, 65536).amount_units == units
    assert units == int((Decimal(text) * 10_000).to_integral_value(ROUND_HALF_EVEN))


@pytest.mark.parametrize("field", ["event_id", "customer_id", "session_id", "event_type"])
@pytest.mark.parametrize("bad", [" ", "\t \u3000", "a\u0085b", "a\u2028b", "a\u2029b",
                                 "a\x9fb", "a\x00b", "\u200b", "\ufeff", "\u200b \u2060\u00ad",
                                 "\u3164", "a\u202eb", "\u2066a\u2069"])
def test_ids_of_whitespace_or_with_control_characters_are_rejected(field: str,
                                                                    bad: str) -> None:
    doc = {"event_id": "e", "customer_id": "c1", "ts": T0, "event_type": "login",
           "session_id": "s1", field: bad}
    key = doc["customer_id"].encode()
    for d in (doc, {**doc, "ts": "2025-01-01T00:00:00Z"}):  # fast path and the model
        res = decode("clickstream", key, orjson.dumps(d), 65536)
        assert getattr(res, "reason", None) == "invalid_schema", (field, bad, res)


@pytest.mark.parametrize("good", ["c 1", " c1", "kund\u00e9-7", "\u00a0x", "\u4e2d\u6587",
                                  "\u200bx", "\U0001f469\u200d\U0001f4bb"])
def test_ids_with_inner_spaces_or_letters_beyond_ascii_are_accepted(good: str) -> None:
    doc = {"event_id": good, "customer_id": good, "ts": T0, "event_type": "login"}
    res = decode("clickstream", good.encode(), orjson.dumps(doc), 65536)
    assert res.customer_id == good and res.event_id == good


@pytest.mark.parametrize("ts, accepted", [(-0.5, False), (-1e-9, False), (0.0, True),
                                          (0.5, True)])
def test_epoch_ms_floats_before_the_epoch_are_rejected_like_negative_integers(
        ts: float, accepted: bool) -> None:
    """-0.5 ms is before 1970-01-01 as -1 is: truncating it toward zero accepted it."""
    v = orjson.dumps({"event_id": "e", "customer_id": "c1", "ts": ts, "event_type": "login"})
    res = decode("clickstream", b"c1", v, 65536)
    assert (getattr(res, "reason", None) is None) == accepted, res
    if not accepted:
        assert res.reason == "invalid_schema"


def _amount_units(text: str) -> object:
    value = b'{"event_id":"e","customer_id":"c1","ts":0,"amount":' + text.encode() + b"}"
    res = decode("transactions", b"c1", value, 65536)
    return getattr(res, "amount_units", res)


@settings(max_examples=3_000, deadline=None)
@given(ip=st.one_of(st.integers(0, 10**12 - 1), st.integers(4 * 10**9, 2 * 10**10)),
       fr=st.integers(0, 9999), tail=st.sampled_from(
    ["5", "50", "5000001", "4999999", "49", "51"]))
def test_amounts_with_a_fifth_decimal_round_as_their_decimal_at_every_size(
        ip: int, fr: int, tail: str) -> None:
    """README (Features): an amount with more decimals is rounded half-even on the decimal it
    writes, at every size up to 1e12. Exact halves of a unit are where a double's error
    decides, and that error grows with the amount (a check that held below 4e9 missed
    9191002977.91105)."""
    text = f"{ip}.{fr:04d}{tail}"
    assert _amount_units(text) == int((Decimal(text) * 10_000).to_integral_value(
        ROUND_HALF_EVEN))


def test_the_halves_that_a_double_rounded_the_wrong_way_are_exact() -> None:
    for text in ("9191002977.91105", "6000000000.00015", "11999999999.99985"):
        assert _amount_units(text) == int((Decimal(text) * 10_000).to_integral_value(
            ROUND_HALF_EVEN)), text


@pytest.mark.parametrize("text", ["1000000000000.00006", "1000000000000.0001",
                                  "1000000000000.00005000001"])
def test_an_amount_above_1e12_as_written_is_rejected(text: str) -> None:
    """README: amounts up to 1e12 are valid. One whose double is 1e12 but whose decimal is
    above it was summed as more than the largest valid amount."""
    res = _amount_units(text)
    assert getattr(res, "reason", None) == "invalid_schema", res
    assert _amount_units("1000000000000.00004") == 10**16  # half-even: 1e12 exactly
    assert _amount_units("1000000000000") == 10**16


@pytest.mark.parametrize("ts", ["2025-06-15T12:34:60Z", "2016-12-31T23:58:60Z",
                                "2025-01-01T23:59:60+05:00", "2016-12-31T22:59:60Z"])
def test_second_60_outside_the_last_minute_of_a_utc_day_is_rejected(ts: str) -> None:
    """RFC 3339 §5.7: a leap second ends a UTC day. Second 60 of another minute is no time:
    it was read as the next minute."""
    v = orjson.dumps({"event_id": "e", "customer_id": "c1", "ts": ts, "event_type": "login"})
    assert getattr(decode("clickstream", b"c1", v, 65536), "reason", None) == "invalid_schema"


@pytest.mark.parametrize("ts", ["2016-12-31T23:59:60Z", "2016-12-31T18:59:60-05:00",
                                "2017-01-01T05:29:60+05:30", "2016-12-31T23:59:60.999Z"])
def test_a_leap_second_in_any_offset_is_read_as_the_next_second(ts: str) -> None:
    v = orjson.dumps({"event_id": "e", "customer_id": "c1", "ts": ts, "event_type": "login"})
    assert decode("clickstream", b"c1", v, 65536).ts_ms == 1_483_228_800_000  # 2017-01-01Z


@pytest.mark.parametrize("doc,reason", [
    (f'{{"event_id":"b","customer_id":"c2","ts":{T0},"amount":1e400}}', "invalid_schema"),
    (f'{{"event_id":"b","customer_id":"c2","ts":{T0},"amount":{"9" * 500}}}', "invalid_schema"),
    ('{"event_id":"b","customer_id":"c2","ts":1e400,"amount":1}', "invalid_schema"),
    (f'{{"event_id":"b","customer_id":"c2","ts":{"9" * 500},"amount":1}}', "invalid_schema"),
    # still not JSON, whatever number comes first
    (f'{{"event_id":"b","customer_id":"c2","ts":{T0},"amount":1,"items":[1e400,NaN]}}',
     "not_json"),
    (f'{{"event_id":"b","customer_id":"c2","ts":{T0},"amount":1,"items":1e400,'
     '"x":"\\ud800"}', "not_json"),
    (f'{{"event_id":"b","customer_id":"c2","ts":{T0},"amount":1,"items":1e400}} {{}}',
     "not_json"),
])
def test_a_number_beyond_a_double_is_judged_where_the_engine_reads_it(doc: str,
                                                                       reason: str) -> None:
    """An ``amount`` or ``ts`` beyond a double's range fails the schema like any amount or
    time out of range; a document that is not JSON elsewhere stays ``not_json``."""
    res = decode("transactions", b"c2", doc.encode(), 100_000)
    assert getattr(res, "reason", None) == reason, res


def test_a_click_is_not_lost_over_a_huge_number_in_its_properties() -> None:
    v = (f'{{"event_id":"e","customer_id":"c1","ts":{T0},"event_type":"view",'
         f'"properties":{{"n":{"1" * 5001},"m":-1e400}}}}').encode()
    res = decode("clickstream", b"c1", v, 65536)
    assert getattr(res, "customer_id", None) == "c1" and res.ts_ms == T0, res


@pytest.mark.parametrize("value,error", [(None, "no value"), (b"", "empty")])
def test_a_record_without_a_value_or_of_zero_bytes_is_empty(value: bytes | None,
                                                           error: str) -> None:
    """README: the reason ``empty`` is a record with no value; zero bytes are no value."""
    res = decode("transactions", b"c1", value, 65536)
    assert getattr(res, "reason", None) == "empty" and error in res.error, res
    assert getattr(decode("transactions", b"c1", b" ", 65536), "reason", None) == "not_json"


def test_an_amount_read_again_as_a_decimal_is_not_lost_over_a_huge_number_elsewhere() -> None:
    """An amount near a half unit is read again from the text as a decimal; a 5,001-digit
    integer in ``items`` made that second reading fail, and the purchase with it."""
    v = (f'{{"event_id":"b","customer_id":"c2","ts":{T0},"amount":1.00005,'
         f'"items":{"9" * 5001}}}').encode()
    res = decode("transactions", b"c2", v, 100_000)
    assert isinstance(res, T) and res.amount_units == 10_000, res  # 10,000.5 half-even


def test_duplicates_and_redeliveries_are_counted_as_skipped() -> None:
    """segstream_events_skipped_total: a duplicate event (same id within the lateness, at a
    new offset) and a redelivery of an applied offset are neither applied nor lost from
    sight."""
    bp, _, _ = _proc()
    first = asyncio.run(bp.process([RawRecord("transactions", 0, 0, b"c1", _tx("a", T0)),
                                    RawRecord("transactions", 0, 1, b"c1", _tx("a", T0))]))
    assert (first.applied, first.duplicates, first.skipped_below_watermark) == (1, 1, 0)
    again = asyncio.run(bp.process([RawRecord("transactions", 0, 0, b"c1", _tx("a", T0)),
                                    RawRecord("transactions", 0, 2, b"c1", _tx("a", T0 + 1))]))
    assert (again.applied, again.duplicates, again.skipped_below_watermark) == (0, 1, 1)
