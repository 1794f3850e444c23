"""A worker fetching with ``SEGSTREAM_KAFKA_FETCH_COALESCE_MS``, against the real broker: its
fetch.min.bytes follows the input rate up and back down, and every event is still applied."""

from __future__ import annotations

import random
import re
import time
import urllib.request
from pathlib import Path

import orjson
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

T0 = 1_735_689_600_000  # 2025-01-01T00:00Z
COALESCE_MS = 20
RATE = 1_500  # events/s
SECONDS = 8.0


def _min_bytes(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r"^segstream_kafka_fetch_min_bytes (\S+)$", text, re.M)
    assert m, "the gauge is missing from /metrics"
    return float(m.group(1))


def test_fetch_min_bytes_follows_the_input_rate_and_nothing_is_lost(make_deployment,
                                                                    tmp_path: Path) -> None:
    from stream.kafka import ensure_topics, producer

    d = make_deployment(SEGSTREAM_KAFKA_FETCH_COALESCE_MS=str(COALESCE_MS))
    worker = d.start_worker(tmp_path)
    url = d.web_url(worker)
    deadline = time.monotonic() + 15  # (0 until the first statistics sample)
    while _min_bytes(url) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _min_bytes(url) == 1  # nothing fetched yet: Kafka's default

    rng = random.Random(11)
    s = d.settings
    ensure_topics(s)
    p = producer(s)
    sent: list[dict] = []
    value_bytes = 0
    seen_while_busy: list[float] = []
    tick = 0.05
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < SECONDS:
        for _ in range(int(RATE * tick)):
            e = {"event_id": f"e{n}", "customer_id": f"c{rng.randrange(200)}",
                 "ts": T0 + n * 1_000, "amount": round(rng.uniform(1, 300), 2),
                 "kind": "purchase"}
            v = orjson.dumps(e)
            value_bytes += len(v)
            p.send(s.topic("transactions"), key=e["customer_id"].encode(), value=v)
            sent.append(e)
            n += 1
        p.flush()
        elapsed = time.monotonic() - start
        if elapsed > 4.0 and int(elapsed / 0.5) != int((elapsed - tick) / 0.5):
            seen_while_busy.append(_min_bytes(url))
        time.sleep(max(0.0, (n / RATE) - (time.monotonic() - start)))
    p.close()
    offered = value_bytes / (time.monotonic() - start)

    # At the steady rate the consumer asks for about COALESCE_MS of input per fetch (one
    # broker). The gauge is refreshed every 2 s and the rate is a running one: wide bounds,
    # but far from the default of 1 byte.
    want = offered * COALESCE_MS / 1000
    assert seen_while_busy, "no sample taken while the input flowed"
    assert max(seen_while_busy) > 100
    assert 0.5 * want <= max(seen_while_busy) <= 1.5 * want, (seen_while_busy, want)
    print(f"fetch.min.bytes while {offered:,.0f} B/s flowed: {seen_while_busy} (want ~{want:,.0f})")

    d.cli("wait", "--timeout", "120")
    # Input stopped: the minimum decays back to answering at the first record.
    deadline = time.monotonic() + 30
    while _min_bytes(url) > 10 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _min_bytes(url) <= 10

    # Every event applied exactly once, as a batch recomputation says.
    assert worker.poll() is None, "worker died"
    now, feats = d.features()
    df = pd.DataFrame(sent)
    expected = df.groupby("customer_id").agg(purchases=("kind", "size"),
                                             monetary=("amount", "sum"))
    assert now == int(df.ts.max())
    assert set(feats) == set(expected.index)
    for cid, row in expected.iterrows():
        assert feats[cid]["purchases_total"] == row.purchases, cid
        assert feats[cid]["monetary_total"] == pytest.approx(row.monetary, abs=1e-6), cid
