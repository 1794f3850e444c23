"""`segstream forget ID` erases a customer everywhere and publishes a tombstone."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.integration

DAY = 86_400_000
T0 = 1_735_689_600_000


def test_forget_erases_state_counters_and_publishes_a_tombstone(deployment,
                                                                 tmp_path: Path) -> None:
    rng = random.Random(3)
    events = [{"event_id": f"e{i}", "customer_id": f"c{rng.randrange(20)}",
               "ts": T0 + i * 3_600_000, "amount": round(rng.uniform(5, 90), 2)}
              for i in range(200)]
    deployment.start_worker(tmp_path)
    deployment.produce("transactions", [(e["customer_id"].encode(), orjson.dumps(e))
                                        for e in events])
    deployment.cli("wait", "--timeout", "300")
    before = orjson.loads(deployment.cli("segments", "--json").stdout)["schemes"]
    doc = orjson.loads(deployment.cli("customer", "c7", "--json").stdout)
    assert doc["history"], "the customer was placed in segments"

    out = orjson.loads(deployment.cli("forget", "c7", "--json").stdout)
    assert out["found"] and out["tombstone"]
    gone = deployment.cli("customer", "c7", "--json", check=False)
    assert gone.returncode != 0
    after = orjson.loads(deployment.cli("segments", "--json").stdout)["schemes"]
    for scheme, seg in doc["segments"].items():
        assert after[scheme].get(seg, 0) == before[scheme][seg] - 1
    assert sum(sum(v.values()) for v in after.values()) == \
        sum(sum(v.values()) for v in before.values()) - len(doc["segments"])

    # No key of the customer is left in Redis.
    import redis

    s = deployment.settings
    r = redis.Redis.from_url(s.redis_url)
    try:
        left = [k for k in r.scan_iter(match=f"{s.redis_prefix}*:c7") ] + \
            [k for k in r.scan_iter(match=f"{s.redis_prefix}*:s:c7")]
        assert left == []
        # Nor is its id in any set the engine keeps (the partitions' customer indexes).
        sets = [k for k in r.scan_iter(match=f"{s.redis_prefix}*") if r.type(k) == b"set"]
        assert sets, "the partitions' customer indexes are missing"
        assert not any(r.sismember(k, "c7") for k in sets)
        assert sum(r.scard(k) for k in sets) == len(deployment.states()[1])
    finally:
        r.close()

    tombstones = [rec for rec in deployment.consume_all("segment-migrations", timeout_s=60)
                  if rec.key == b"c7" and rec.value is None]
    assert len(tombstones) == 1
