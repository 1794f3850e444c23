"""Three workers in one consumer group on six partitions: CDNOW ends exactly as in batch."""

from __future__ import annotations

from pathlib import Path

import cdnow_oracle
import orjson
import pytest

from stream.replay import cdnow_events, cdnow_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_three_workers_share_the_partitions_and_the_state_is_exact(make_deployment,
                                                                   tmp_path: Path) -> None:
    dep = make_deployment(partitions=6)
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
