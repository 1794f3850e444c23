"""Valid and malformed events through the real broker into a running worker."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pandas as pd
import pytest
from conftest import jsonl

pytestmark = pytest.mark.integration

DAY = 86_400_000
T0 = 1_735_689_600_000  # 2025-01-01T00:00Z


def _valid(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append({
            "event_id": f"e{i}",
            "customer_id": f"c{rng.randrange(25)}",
            "ts": T0 + i * 3_600_000,
            "amount": round(rng.uniform(1, 200), 2),
            "kind": "purchase" if rng.random() > 0.1 else "refund",
        })
    return out


BAD: list[tuple[bytes | None, bytes, str]] = [
    (b"x1", b"not json at all", "not_json"),
    (b"x2", b"\xff\xfe\x00bad utf8", "not_utf8"),
    (b"x3", b'{"event_id": "b3", "customer_id": "x3", "ts": "yesterday", "amount": 1}',
     "invalid_schema"),
    (b"x4", b'{"event_id": "b4", "customer_id": "x4", "ts": 1735689600000}', "invalid_schema"),
    (b"x5", b'{"event_id": "b5", "customer_id": "x5", "ts": 1735689600000, "amount": -3}',
     "invalid_schema"),
    (b"x6", b'{"event_id": "b6", "customer_id": "x6", "ts": 1735689600000, "amount": "NaN"}',
     "invalid_schema"),
    (None, b'{"event_id": "b7", "customer_id": "x7", "ts": 1735689600000, "amount": 2}',
     "key_mismatch"),
    (b"x8", b"[1, 2, 3]", "invalid_schema"),
    (b"x9", b'{"event_id": "b9", "customer_id": "x9", "ts": 4102444800000, "amount": 2}',
     "from_future"),
    # A hostile corpus: huge ids, control characters, deep nesting, non-finite numbers,
    # oversized payloads.
    (b"y" * 10_000, b'{"event_id": "h1", "customer_id": "' + b"y" * 10_000
     + b'", "ts": 1735689600000, "amount": 1}', "invalid_schema"),
    (b"c\x07x", b'{"event_id": "h2", "customer_id": "c\\u0007x", "ts": 1735689600000, '
     b'"amount": 1}', "invalid_schema"),
    (b"x11", b'{"event_id": "h3", "customer_id": "x11", "ts": 1735689600000, "amount": 1, '
     b'"currency": "\\u0000"}', "invalid_schema"),
    # valid JSON (a number beyond a double's range): the amount fails the schema
    (b"x12", b'{"event_id": "h4", "customer_id": "x12", "ts": 1735689600000, "amount": 1e999}',
     "invalid_schema"),
    (b"x13", b'{"event_id": "h5", "customer_id": "x13", "ts": 1735689600000, "amount": 1, '
     b'"pad": "' + b"z" * 70_000 + b'"}', "too_large"),
    (b"x14", b'{"event_id": "h6", "customer_id": "x14", "ts": -5, "amount": 1}',
     "invalid_schema"),
    (b"x10", b'{"event_id": "b10", "customer_id": "x10", "ts": 1000, "amount": 2}',
     "too_late"),
]


def test_valid_events_land_in_redis_and_bad_ones_in_the_dlq(deployment, tmp_path: Path) -> None:
    valid = _valid(300)
    worker = deployment.start_worker(tmp_path)
    # Interleave bad records between valid ones; the too-late one must come after
    # the partition has seen newer events, so it goes last.
    records: list[tuple[bytes | None, bytes]] = []
    bad_iter = iter(BAD[:-1])
    for i, e in enumerate(valid):
        records.append((e["customer_id"].encode(), orjson.dumps(e)))
        if i % 17 == 15:
            bad = next(bad_iter, None)
            if bad:
                records.append((bad[0], bad[1]))
    deployment.produce("transactions", records)
    # the too-late record is keyed like a customer already seen so it shares its partition
    late = orjson.dumps({"event_id": "b10", "customer_id": "c1", "ts": T0 - 30 * DAY,
                         "amount": 2})
    deployment.produce("transactions", [(b"c1", late)])
    deployment.cli("wait", "--timeout", "120")

    assert worker.poll() is None, "worker died"
    now, feats = deployment.features()
    df = pd.DataFrame(valid)
    df["signed"] = df.amount.where(df.kind == "purchase", -df.amount)
    expected = df.groupby("customer_id").agg(
        purchases=("kind", lambda k: int((k == "purchase").sum())),
        monetary=("signed", "sum"),
        last_ts=("ts", "max"),
    )
    assert now == int(df.ts.max())
    assert set(feats) == set(expected.index)
    for cid, row in expected.iterrows():
        f = feats[cid]
        assert f["purchases_total"] == row.purchases, cid
        assert f["monetary_total"] == pytest.approx(row.monetary, abs=1e-6), cid

    dlq = [orjson.loads(m.value) for m in deployment.consume_all("segmentation-dlq")]
    want = sorted(r for _, _, r in BAD)
    assert sorted(d["reason"] for d in dlq) == want
    for d in dlq:
        assert d["source_topic"] == deployment.settings.transactions_topic
        assert d["offset"] >= 0 and d["partition"] >= 0 and d["error"]
    assert any(d["payload"] == "not json at all" for d in dlq if d["reason"] == "not_json")
    by_reason = {d["reason"]: d for d in dlq}
    assert by_reason["not_utf8"]["payload_encoding"] == "base64"
    big = by_reason["too_large"]  # the original bytes, truncated past the limit
    assert big["payload_truncated"] and len(big["payload"]) == deployment.settings.dlq_payload_bytes


def test_jsonl_replay_and_customer_command(deployment, tmp_path: Path) -> None:
    valid = _valid(60, seed=3)
    # A byte order mark, and a 2 MB line (over the broker's 1 MB message limit) halfway.
    huge = orjson.dumps({**valid[0], "event_id": "huge", "pad": "x" * 2_000_000}) + b"\n"
    path = tmp_path / "tx.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(valid[:30]) + huge + jsonl(valid[30:])
                     + b"{broken\n")
    deployment.start_worker(tmp_path)
    deployment.cli("replay", "jsonl", str(path), "--topic", "transactions")
    deployment.cli("wait", "--timeout", "120")
    for cid in {valid[0]["customer_id"], valid[-1]["customer_id"]}:
        doc = orjson.loads(deployment.cli("customer", cid, "--json").stdout)
        n = sum(1 for e in valid if e["customer_id"] == cid and e["kind"] == "purchase")
        assert doc["customer_id"] == cid
        assert doc["features"]["purchases_total"] == n
    missing = deployment.cli("customer", "nobody", "--json", check=False)
    assert missing.returncode != 0
    dlq = deployment.consume_all("segmentation-dlq")
    assert sorted(orjson.loads(m.value)["reason"] for m in dlq) == ["not_json", "too_large"]
    # Caught up already: a timeout shorter than the default quiet period (8 s) still succeeds.
    assert deployment.cli("wait", "--timeout", "4", check=False).returncode == 0
