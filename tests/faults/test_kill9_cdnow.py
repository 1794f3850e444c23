"""kill -9 of the worker in the middle of the CDNOW replay, then a restart: exact state."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import cdnow_oracle
import pytest

from features.store import RedisFeatureStore
from stream.app import redis_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _applied(d) -> int:
    s = d.settings

    async def run() -> int:
        r = redis_client(s)
        try:
            wms = await RedisFeatureStore(r, s.redis_prefix).watermarks(
                s.partitions, list(s.input_topics))
            return sum(w + 1 for w in wms.values() if w >= 0)
        finally:
            await r.aclose()

    return asyncio.run(run())


def test_kill9_mid_replay_then_restart_gives_exact_state(deployment, tmp_path: Path) -> None:
    deployment.cli("replay", "cdnow")  # all input is in the topic before the worker starts
    total = 69_659
    kills = 0
    for target in (0.2, 0.5):
        w = deployment.start_worker(tmp_path)
        deadline = time.monotonic() + 300
        while _applied(deployment) < target * total and time.monotonic() < deadline:
            time.sleep(0.05)
        done = _applied(deployment)
        assert done < total, "replay finished before the kill; nothing was tested"
        deployment.kill(w)
        kills += 1
    deployment.start_worker(tmp_path)
    deployment.cli("wait", "--timeout", "600")
    assert kills == 2

    expected = cdnow_oracle.expected_features(cdnow_oracle.load())
    _, feats = deployment.features()
    assert cdnow_oracle.mismatches(expected, feats) == []
