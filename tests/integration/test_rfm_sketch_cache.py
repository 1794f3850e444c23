"""A purchaser's RFM scores must not vanish because the worker's cached population
sketch is empty (fresh deployment, first second): DESIGN §5 scores every purchasing customer,
and the catalogue keeps Prospects for customers who never bought."""
from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from features.store import RedisFeatureStore
from stream.pipeline import BatchProcessor, RawRecord
from stream.redisconn import redis_client
from stream.runtime import ScoringRuntime
from stream.settings import load_settings

pytestmark = pytest.mark.integration
T0 = 1_735_689_600_000
WALL = (T0 + 365 * 86_400_000) / 1000


class Sink:
    def __init__(self) -> None:
        self.sent: list = []

    async def publish(self, recs) -> None:
        self.sent.extend(recs)


def test_purchaser_is_not_demoted_to_prospects_by_a_click_within_the_population_refresh(
        services) -> None:
    s = load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                      redis_prefix=f"sk-{uuid.uuid4().hex[:8]}:", partitions=1,
                      models_enabled=False)

    async def run() -> list[dict]:
        r = redis_client(s)
        try:
            store = RedisFeatureStore(r, s.redis_prefix)
            # a worker's runtime; the clock stands still, as it nearly does within the
            # one second (population_refresh_s) between two re-reads of the sketch
            rt = ScoringRuntime(s, r, store, clock=lambda: WALL)
            sink = Sink()
            bp = BatchProcessor(s, store, sink, clock=lambda: WALL, scoring=rt)
            buy = orjson.dumps({"event_id": "t1", "customer_id": "c1", "ts": T0, "amount": 50})
            await bp.process([RawRecord(s.transactions_topic, 0, 0, b"c1", buy)])
            click = orjson.dumps({"event_id": "k1", "customer_id": "c1", "ts": T0 + 8 * 86_400_000,
                                  "event_type": "login"})
            await bp.process([RawRecord(s.clickstream_topic, 0, 0, b"c1", click)])
            async for k in r.scan_iter(f"{s.redis_prefix}*"):
                await r.delete(k)
            return [orjson.loads(v) for t, _, v in sink.sent if t == s.migrations_topic]
        finally:
            await r.aclose()

    migs = [m for m in asyncio.run(run()) if m["scheme"] == "rfm"]
    assert migs[0]["from_segment"] is None and migs[0]["to_segment"] != "Prospects"
    # The click (past the 7-day minimum dwell) changes no sketch field, and a population of
    # one ranks its customer the same: no further rfm migration, and above all not a
    # purchaser's move to Prospects with every RFM score null.
    assert [(m["from_segment"], m["to_segment"], m["scores"]["rfm"]) for m in migs[1:]] == []
