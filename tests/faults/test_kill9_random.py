"""kill -9 of the worker at five random moments of a 200,000-event replay: exact end state.

The moments are drawn from a seeded generator (``SEGSTREAM_FAULT_SEED`` to repeat a
run; the seed is printed): each is a share of the input applied, plus a random delay
of up to one second so that the kill lands anywhere in a batch (loading, scoring,
committing, publishing). After each kill a new worker starts and resumes from the
committed watermarks.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import fault_oracle
import pytest

# 200,000 events at a few hundred to 2,000 events/s, plus a session timeout per restart.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

EVENTS = 200_000
KILLS = 5


def test_kill9_at_five_random_moments_gives_exact_state(deployment, tmp_path: Path) -> None:
    seed = int(os.environ.get("SEGSTREAM_FAULT_SEED", random.randrange(1_000_000)))
    print(f"SEGSTREAM_FAULT_SEED={seed}")
    rng = random.Random(seed)
    inputs = fault_oracle.synthetic_input(EVENTS, seed=seed % 1000)
    fault_oracle.produce(deployment, inputs)  # all input is in Kafka before the first worker
    moments = sorted(rng.uniform(0.03, 0.85) for _ in range(KILLS))
    t0 = time.monotonic()
    for share in moments:
        w = deployment.start_worker(tmp_path)
        fault_oracle.wait_applied(deployment, int(share * EVENTS))
        time.sleep(rng.uniform(0.0, 1.0))
        done = fault_oracle.applied(deployment)
        assert w.poll() is None, "the worker died before it was killed"
        assert done < EVENTS, "the replay finished before the kill; nothing was tested"
        deployment.kill(w)
        print(f"kill -9 at {done} of {EVENTS} applied ({time.monotonic() - t0:.0f}s)")
    last = deployment.start_worker(tmp_path)
    deployment.cli("wait", "--timeout", "1800", timeout=1900)
    assert last.poll() is None
    print(f"caught up after {time.monotonic() - t0:.0f}s")
    summary = fault_oracle.judge(deployment, inputs)
    print(summary)
