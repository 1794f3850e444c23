"""Three workers in one consumer group on six partitions: CDNOW ends exactly as in batch.

Run against the shared single Redis and against a real three-node Redis Cluster, where
every command must stay within one hash slot (the servers refuse anything else).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cdnow_oracle
import orjson
import pytest
import redis_servers

from stream.replay import cdnow_events, cdnow_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(params=["single", "cluster"])
def redis_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Environment overrides naming the Redis of the run (torn down after the deployment)."""
    if request.param == "single":
        yield {}
        return
    with redis_servers.redis_cluster(3) as cluster:
        yield {"SEGSTREAM_REDIS_URL": cluster.url, "SEGSTREAM_REDIS_CLUSTER": "true"}


def test_three_workers_share_the_partitions_and_the_state_is_exact(
        redis_env: dict[str, str], make_deployment, tmp_path: Path) -> None:
    dep = make_deployment(partitions=6, **redis_env)
    workers = [dep.start_worker(tmp_path) for _ in range(3)]
    dep.produce("transactions", [(e["customer_id"].encode(), orjson.dumps(e))
                                 for e in cdnow_events(cdnow_path())])
    dep.cli("wait", "--timeout", "900")
    assert all(w.poll() is None for w in workers), "a worker died"

    df = cdnow_oracle.load()
    _, feats = dep.features()
    assert cdnow_oracle.mismatches(cdnow_oracle.expected_features(df), feats) == []

    # Shared state stays consistent: every customer is in exactly one segment per scheme.
    segs = orjson.loads(dep.cli("segments", "--json").stdout)["schemes"]
    assert set(segs) == {"rfm", "lifecycle"}
    for scheme, sizes in segs.items():
        assert sum(sizes.values()) == 23_570, scheme
    # Every worker owned partitions and processed some of them.
    logs = [p.read_text() for p in dep.logs]
    assert sum("sweep:" in text for text in logs) >= 2
    # No Redis command was refused (a cross-slot one would be, on the cluster).
    assert not any("CROSSSLOT" in text or "RedisClusterException" in text for text in logs)
