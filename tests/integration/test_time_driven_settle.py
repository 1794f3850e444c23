"""Time-driven moves within an engine day, and ``segstream wait`` after a worker died.

* A customer held in a segment by the minimum dwell is moved once engine time passes the
  dwell's end, with no event of theirs, within that engine day: a pass over a partition
  follows only a new engine day or new scoring inputs, and the move used to wait for the
  next day's pass while ``segstream wait`` called everything settled.
* A worker killed right after a batch moved engine time into a new day leaves the sweep
  of that day undone: ``segstream wait`` must not report the deployment settled (the
  context the workers last swept with names the day before), and a restarted worker
  finishes it.

Real Kafka and Redis (the suite's own); models off, so that only the rules decide.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import fault_oracle
import pytest

pytestmark = [pytest.mark.integration]

HOUR, DAY = 3_600_000, 86_400_000
T0 = int(datetime(2025, 3, 10, 5, 0, tzinfo=UTC).timestamp() * 1000)


def _click(eid: str, cid: str, ts: int, event_type: str) -> tuple[str, dict[str, object]]:
    return ("clickstream", {"event_id": eid, "customer_id": cid, "ts": ts,
                            "event_type": event_type, "session_id": f"{cid}-{ts}"})


def _lifecycle(dep, cid: str) -> tuple[str, str, list[tuple[str, str]]]:
    doc = json.loads(dep.cli("customer", cid, "--json").stdout)
    moves = [(h["at"], h["to_segment"]) for h in doc["history"] if h["scheme"] == "lifecycle"]
    return doc["segments"]["lifecycle"], doc["segments_since"]["lifecycle"], moves


def test_a_held_customer_moves_when_the_dwell_ends_within_the_day_and_wait_waits(
        make_deployment, tmp_path: Path) -> None:
    dep = make_deployment(SEGSTREAM_MODELS_ENABLED="false",
                          SEGSTREAM_CLV_REFIT_INTERVAL_S="0", SEGSTREAM_SWEEP_INTERVAL_S="3600")
    w = dep.start_worker(tmp_path)

    def step(records: list[tuple[str, dict[str, object]]]) -> tuple[str, str, list]:
        fault_oracle.produce(dep, records)
        dep.cli("wait", "--timeout", "120", timeout=180)  # settled: every partition swept
        return _lifecycle(dep, "x1")

    # x1 logs in (placed in a lifecycle segment), then files two support tickets an hour
    # later: the rules now say Struggling Newbie, but the lifecycle scheme's 3-day
    # minimum dwell holds x1 where it was until day 3, 05:00.
    first, since, _ = step([_click("x1-a", "x1", T0, "login")])
    assert since == "2025-03-10T05:00:00.000Z"
    held, _, _ = step([_click("x1-b", "x1", T0 + HOUR, "support_ticket"),
                       _click("x1-c", "x1", T0 + HOUR + 60_000, "support_ticket")])
    assert held == first != "Struggling Newbie"
    # Another customer moves engine time to day 3, 04:00 (a new day: a pass; x1 held)...
    seg, _, _ = step([_click("y1-a", "y1", T0 + 3 * DAY - HOUR, "page_view")])
    assert seg == first
    # ... and to 06:00: the dwell ended an hour before, within the same engine day.
    seg, since, moves = step([_click("y1-b", "y1", T0 + 3 * DAY + HOUR, "page_view")])
    assert seg == "Struggling Newbie", (seg, moves)
    assert since == moves[-1][0] == "2025-03-13T06:00:00.000Z", moves
    assert w.poll() is None

    # The worker dies right after the batch that moves engine time into a new day
    # (SIGSTOP at once, so no sweep of the new day runs; then SIGKILL).
    # A sweep waits for a second without input (and the busy-time sweep interval is an
    # hour here), so the batch is caught between its commit and that sweep.
    fault_oracle.produce(dep, [_click("y1-c", "y1", T0 + 10 * DAY, "page_view")])
    deadline = time.monotonic() + 60
    while fault_oracle.applied(dep) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(w.pid, signal.SIGSTOP)
    dep.kill(w, signal.SIGKILL)
    assert fault_oracle.applied(dep) == 6
    # x1 went silent 10 days ago: the new day's sweep would re-evaluate x1 (and y1).
    stale = dep.cli("wait", "--timeout", "20", check=False, timeout=60)
    assert stale.returncode == 1, "wait called a deployment settled whose sweep never ran"
    w = dep.start_worker(tmp_path)
    dep.cli("wait", "--timeout", "120", timeout=180)
    assert w.poll() is None
    doc = json.loads(dep.cli("customer", "x1", "--json").stdout)
    assert doc["as_of"] == "2025-03-20T05:00:00.000Z"
