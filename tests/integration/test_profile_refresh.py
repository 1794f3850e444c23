"""``python -m bench.profile_refresh`` against the real Redis: it runs, reports both ways
of refreshing the sketch and both snapshots, and leaves no key behind."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis
from conftest import REDIS, ROOT

pytestmark = [pytest.mark.integration]


def test_the_refresh_benchmark_reports_both_ways_and_cleans_up(services: dict[str, str]
                                                               ) -> None:
    r = redis.from_url(REDIS)
    before = set(r.scan_iter("bench-refresh-*"))
    out = subprocess.run(
        [sys.executable, "-m", "bench.profile_refresh", "--customers", "3000",
         "--ids", "2000", "--rounds", "3", "--redis", REDIS],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "sketch of 3,000 customers, 6 partitions" in out
    assert "every partition, read and built from scratch: median" in out
    assert "one partition, read and replaced:" in out
    assert "model snapshot remembering 2,000 example ids" in out
    full = int(out.split("with the ids (")[1].split(" bytes")[0].replace(",", ""))
    serving = int(out.split("serving, without (")[1].split(" bytes")[0].replace(",", ""))
    assert serving < full
    assert set(r.scan_iter("bench-refresh-*")) == before
    r.close()
