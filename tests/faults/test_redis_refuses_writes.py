"""A Redis that answers pings and reads but refuses every write, under a running worker.

A private ``redis-server`` is given a ``maxmemory`` below what it holds (the default
``noeviction`` policy then refuses writes with ``OOM command not allowed``, as a full
production Redis does). The worker must keep its events (retrying, never exiting),
``/readyz`` must say it is not ready once its commits have failed for
``COMMITS_FAILING_S`` (it used to stay 200 while nothing committed, since Redis still
answered its ping), and once Redis accepts writes again everything must be exact and the
worker ready.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import fault_oracle
import pytest
import redis
from fault_oracle import eventually
from redis_servers import free_port, plain_redis, stop

from stream.backend import COMMITS_FAILING_S

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 12_000


def _metric(base: str, name: str) -> float | None:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def test_writes_refused_make_the_worker_unready_and_lose_nothing(make_deployment,
                                                                  tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "redis").mkdir()
    proc = plain_redis(port, tmp_path / "redis")
    admin = redis.Redis(port=port)
    try:
        dep = make_deployment(SEGSTREAM_REDIS_URL=f"redis://127.0.0.1:{port}/0")
        inputs = fault_oracle.synthetic_input(EVENTS, seed=43)
        half = EVENTS // 2
        fault_oracle.produce(dep, inputs[:half])
        w = dep.start_worker(tmp_path)
        base = dep.web_url(w)
        dep.cli("wait", "--timeout", "300")
        assert fault_oracle.readyz(base)[0] == 200

        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", str(max(1, used // 2)))
        at_refusal = fault_oracle.applied(dep)
        fault_oracle.produce(dep, inputs[half:])
        refused_at = time.monotonic()
        _, checks = eventually(
            lambda: (lambda r: r if r[0] == 503 else None)(fault_oracle.readyz(base)),
            COMMITS_FAILING_S + 60, "/readyz not ready while every commit is refused")
        waited = time.monotonic() - refused_at
        print(f"not ready after {waited:.0f}s: {checks}")
        assert checks["redis"] is True, "Redis answered pings all along"
        assert checks["commits_failing_s"] >= COMMITS_FAILING_S
        assert fault_oracle.applied(dep) == at_refusal, "a write got through"
        assert eventually(lambda: _metric(base, "segstream_worker_ready") == 0, 30,
                          "segstream_worker_ready 0")
        assert w.poll() is None, "the worker exited while Redis refused writes"

        admin.config_set("maxmemory", "0")
        dep.cli("wait", "--timeout", "300")
        assert eventually(lambda: fault_oracle.readyz(base)[0] == 200, 30, "ready again")
        assert w.poll() is None
        text = dep.logs[0].read_text(errors="replace")
        assert "maxmemory" in text, "the refusal was not logged"
        assert text.count("Worker]: Ready") == 1, "the worker restarted"
        print(fault_oracle.judge(dep, inputs))
    finally:
        admin.close()
        stop(proc)
