"""Two workers in one group: a crash, a return, and a stalled worker coming back as a zombie.

Input arrives as a live stream (a paced producer) while:

1. worker B is killed with SIGKILL: its partitions move to A, which commits there;
2. B is started again: partitions move back, the new B commits to some of them;
3. B stops itself (SIGSTOP) in the middle of a batch, after loading and scoring and
   before its commit; it stays stopped past the 20 s session timeout, the group drops
   it and A takes over and commits on the stalled partitions; then B gets SIGCONT and
   sends its late commit: the per-partition version fence must refuse it (the probe in
   the worker logs ``fenced``);

and the end state is judged exactly against the input (features, migration chains,
counters). The probe (``tests/fault_probe.py``) only observes commits and triggers the
stall; it never changes what the engine writes.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import fault_oracle
import fault_probe
import pytest
from fault_oracle import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 60_000
RATE = 400  # events per second: the input outlasts every phase below
SESSION_TIMEOUT_S = 20  # broker_session_timeout in stream/app.py


def commits(log: Path, start: int = 0) -> list[dict[int, str]]:
    """The probe's commit lines after line ``start``: partition -> ok | fenced."""
    return _parse(fault_probe.lines(log)[start:])


def _parse(lines: list[str]) -> list[dict[int, str]]:
    return [{int(p): r for p, r in re.findall(r"p(\d+)=(ok|fenced)", ln)}
            for ln in lines if " commit " in ln]


def late_commit(log: Path) -> dict[int, str] | None:
    """The first commit after the probe's ``resumed`` line."""
    ls = fault_probe.lines(log)
    at = next((i for i, ln in enumerate(ls) if "FAULT-PROBE resumed" in ln), None)
    found = _parse(ls[at + 1:]) if at is not None else []
    return found[0] if found else None


def committed(log: Path, start: int = 0) -> set[int]:
    return {p for c in commits(log, start) for p, r in c.items() if r == "ok"}


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_kill_return_and_zombie_fencing_keep_state_exact(make_deployment,
                                                         tmp_path: Path) -> None:
    dep = make_deployment(partitions=4)
    hooks = fault_probe.install(tmp_path / "hooks", FAULT_PROBE_LOG="1")
    inputs = fault_oracle.synthetic_input(EVENTS, seed=21)
    t0 = time.monotonic()
    a = fault_probe.start_worker(dep, tmp_path, **hooks)
    b = fault_probe.start_worker(dep, tmp_path, **hooks)
    log_a, log_b = dep.logs[0], dep.logs[1]
    feed = fault_oracle.PacedProducer(dep, inputs, RATE)
    feed.start()
    eventually(lambda: committed(log_a) and committed(log_b), 120, "both workers commit")

    # 1. B crashes: A takes over B's partitions.
    b_parts = committed(log_b)
    mark = len(fault_probe.lines(log_a))
    dep.kill(b)
    eventually(lambda: b_parts <= committed(log_a, mark), 120,
               f"A commits on B's partitions {sorted(b_parts)} after B was killed")
    print(f"B killed: A took over {sorted(b_parts)} ({time.monotonic() - t0:.0f}s)")

    # 2. B returns: partitions move back.
    flag = tmp_path / "stall-flag"
    b2 = fault_probe.start_worker(dep, tmp_path, FAULT_STALL_FLAG=str(flag), **hooks)
    log_b2 = dep.logs[2]
    eventually(lambda: committed(log_b2), 120, "the restarted B commits")
    mark = len(fault_probe.lines(log_a))
    eventually(lambda: (len(commits(log_a, mark)) >= 10
                        and not committed(log_b2) & committed(log_a, len(fault_probe.lines(
                            log_a)) - 10)), 120, "A stops committing on B's partitions")
    moved_back = committed(log_b2)
    assert moved_back and moved_back != set(range(4)), moved_back
    print(f"B back: owns {sorted(moved_back)} ({time.monotonic() - t0:.0f}s)")

    # 3. B stalls with a batch in flight, past its session timeout.
    flag.touch()
    line = eventually(lambda: [ln for ln in fault_probe.lines(log_b2) if "stall" in ln], 60,
                      "B reaches a commit and stops")[0]
    stalled = {int(p) for p in line.rsplit("=", 1)[1].split(",")}
    eventually(lambda: stopped(b2.pid), 10, "B is stopped")
    at_stall = fault_oracle.progress(dep)
    time.sleep(SESSION_TIMEOUT_S + 2)
    eventually(lambda: all(fault_oracle.progress(dep)[p] > at_stall[p] for p in stalled), 120,
               f"A commits on the stalled partitions {sorted(stalled)}")
    assert stopped(b2.pid), "B must still be stopped while A owns its partitions"
    print(f"B stalled on {sorted(stalled)}; A took over ({time.monotonic() - t0:.0f}s)")
    os.kill(b2.pid, signal.SIGCONT)
    late = eventually(lambda: late_commit(log_b2), 30, "B resumes and sends its late commit")
    print(f"B's late commit: {late}")
    assert all(late[p] == "fenced" for p in stalled), late

    # 4. The stream ends; both workers catch up; the state is exact.
    feed.finish()
    dep.cli("wait", "--timeout", "600")
    assert a.poll() is None, "worker A died"
    print(f"zombie B after the fence: {'alive' if b2.poll() is None else 'exited'}; "
          f"caught up after {time.monotonic() - t0:.0f}s")
    summary = fault_oracle.judge(dep, inputs)
    print(summary)
