"""Input produced with each of Kafka's compression codecs reaches a running worker intact.

A record batch the consumer cannot decompress stops its fetcher, before any record of it
could be dead-lettered, and the worker would stop again at every restart on the same
batch; the codecs are dependencies, and the worker refuses to start without them.
"""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pandas as pd
import pytest

from stream.errors import ServiceError
from stream.kafka import check_codecs, ensure_topics, producer

pytestmark = pytest.mark.integration

T0 = 1_735_689_600_000  # 2025-01-01T00:00Z
CODECS = ("gzip", "snappy", "lz4", "zstd")


def test_a_worker_reads_every_codec_a_producer_may_use(deployment, tmp_path: Path) -> None:
    rng = random.Random(11)
    events = [{"event_id": f"z{i}", "customer_id": f"c{rng.randrange(40)}",
               "ts": T0 + i * 60_000, "amount": round(rng.uniform(1, 90), 2)}
              for i in range(400)]
    worker = deployment.start_worker(tmp_path)
    s = deployment.settings
    ensure_topics(s)
    for i, codec in enumerate(CODECS):
        p = producer(s, compression_type=codec)
        for e in events[i::len(CODECS)]:
            p.send(s.transactions_topic, key=e["customer_id"].encode(), value=orjson.dumps(e))
        p.flush()
        p.close()
    deployment.cli("wait", "--timeout", "180")

    assert worker.poll() is None, "the worker died on compressed input"
    df = pd.DataFrame(events)
    want = df.groupby("customer_id").agg(n=("amount", "size"), total=("amount", "sum"))
    _, feats = deployment.features()
    assert set(feats) == set(want.index)
    for cid, row in want.iterrows():
        assert feats[cid]["purchases_total"] == row.n, cid
        assert feats[cid]["monetary_total"] == pytest.approx(row.total, abs=1e-6), cid
    assert deployment.consume_all("segmentation-dlq", timeout_s=3) == []
    log = deployment.logs[0].read_text()
    assert "UnsupportedCodecError" not in log and "crash" not in log.lower()


def test_a_worker_without_a_codec_refuses_to_start_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("aiokafka.codec.has_lz4", lambda: False)
    with pytest.raises(ServiceError, match=r"lz4.*pip install"):
        check_codecs()
