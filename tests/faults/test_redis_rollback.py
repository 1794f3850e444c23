"""Redis loses its newest writes (restored from an older copy), with no worker running
and under a running one.

With ``appendfsync everysec`` (what ``segstream up`` runs), a host crash loses up to a
second of acknowledged writes; a failover to a lagging replica or a restore from a backup
loses more. The engine's real commit is the per-partition watermark in Redis; Kafka's
committed offsets only follow it. After such a loss the watermarks are behind the
committed offsets, and a worker that resumed at the committed offsets never applied the
events in between: they were lost for good, and ``segstream wait`` never returned. The
worker now seeks back to the offset after the watermark where that is earlier (records
at or below a watermark are skipped, so nothing counts twice).

The loss is simulated on this deployment's keys only: they are copied (DUMP) while the
worker is stopped with SIGSTOP, the worker goes on, is stopped, and the keys are put back.
Features and counters must be exact afterwards; migrations made in the lost span are made
again (the profiles that remembered them were lost too), possibly under other ids.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import fault_oracle
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 8_000


def _copy_after(deployment, tmp_path: Path, r, inputs: list, first: int):
    """Produce ``inputs[:first]``, start a worker, and once it applied them copy this
    deployment's keys while the worker is stopped (SIGSTOP). Returns the worker, the
    copy and the records applied at the copy."""
    fault_oracle.produce(deployment, inputs[:first])
    w = deployment.start_worker(tmp_path)
    fault_oracle.wait_applied(deployment, first)
    os.killpg(w.pid, signal.SIGSTOP)
    try:
        pattern = deployment.settings.redis_prefix + "*"
        copy = {k: r.dump(k) for k in r.scan_iter(match=pattern, count=1000)}
        return w, copy, fault_oracle.applied(deployment)
    finally:
        os.killpg(w.pid, signal.SIGCONT)


def _put_back(deployment, r, copy: dict) -> None:
    """Replace this deployment's keys by the copy."""
    for k in list(r.scan_iter(match=deployment.settings.redis_prefix + "*", count=1000)):
        r.delete(k)
    for k, v in copy.items():
        r.restore(k, 0, v, replace=True)


def _stopped_then_exact_after_restart(deployment, tmp_path: Path, inputs: list) -> None:
    """The stopped worker said why (one critical line); a restarted one applies every
    input and the state is exact."""
    log = deployment.logs[-1].read_bytes()
    assert b"lost committed writes" in log and b"CRITICAL" in log
    w = deployment.start_worker(tmp_path)
    deployment.cli("wait", "--timeout", "240", timeout=300)
    assert w.poll() is None
    assert fault_oracle.applied(deployment) == len(inputs)
    fault_oracle.check_features(deployment, inputs)
    fault_oracle.check_counters(deployment, fault_oracle.profiles(deployment))


def _emptied_under(deployment, tmp_path: Path, w, inputs: list) -> None:
    """Every key of the deployment deleted under the idle worker ``w``: it must stop by
    itself (exit 70), and a restarted one applies everything again exactly."""
    import redis

    r = redis.Redis.from_url(deployment.settings.redis_url)
    try:
        _put_back(deployment, r, {})
    finally:
        r.close()
    assert w.wait(timeout=120) == 70
    _stopped_then_exact_after_restart(deployment, tmp_path, inputs)


def test_a_worker_after_redis_lost_writes_reads_the_lost_events_again(
        deployment, tmp_path: Path) -> None:
    import redis

    inputs = fault_oracle.synthetic_input(EVENTS, seed=9)
    # The copy is taken after the first part and before the rest is produced: a worker
    # faster than the test's polling applied all 8,000 events before a copy taken "a
    # third of the way through", and the loss lost nothing.
    first = EVENTS // 3
    r = redis.Redis.from_url(deployment.settings.redis_url)
    try:
        w, copy, at_copy = _copy_after(deployment, tmp_path, r, inputs, first)
        fault_oracle.produce(deployment, inputs[first:])
        fault_oracle.wait_applied(deployment, EVENTS)
        deployment.cli("wait", "--timeout", "300", "--no-settled", timeout=360)
        deployment.kill(w, signal.SIGTERM)  # Kafka's offsets are committed at the end
        _put_back(deployment, r, copy)
        assert fault_oracle.applied(deployment) == at_copy < EVENTS
    finally:
        r.close()
    w = deployment.start_worker(tmp_path)
    deployment.cli("wait", "--timeout", "240", timeout=300)
    assert w.poll() is None
    assert fault_oracle.applied(deployment) == EVENTS
    assert b"lost writes" in deployment.logs[-1].read_bytes()
    # Features and counters are exact. Migrations are not checked: what Redis lost
    # includes the profiles' record of migrations already published, so a customer's
    # move in the lost span is made, and published, again, and its id (from the
    # triggering offset) need not match the first one's if the batches fell differently.
    fault_oracle.check_features(deployment, inputs)
    fault_oracle.check_counters(deployment, fault_oracle.profiles(deployment))


def test_a_running_worker_whose_redis_lost_writes_stops_and_its_restart_reads_them_again(
        deployment, tmp_path: Path) -> None:
    """The same loss under a running worker, with no rebalance (a failover to a lagging
    replica): the consumer is past the lost records, and the next batch would have moved
    the watermarks past them for good. The worker stops at that batch instead (exit 70,
    one critical line); restarted, it seeks back and everything is exact."""
    import redis

    inputs = fault_oracle.synthetic_input(EVENTS, seed=11)
    first, second = EVENTS // 3, 2 * EVENTS // 3
    r = redis.Redis.from_url(deployment.settings.redis_url)
    try:
        w, copy, at_copy = _copy_after(deployment, tmp_path, r, inputs, first)
        fault_oracle.produce(deployment, inputs[first:second])
        fault_oracle.wait_applied(deployment, second)
        os.killpg(w.pid, signal.SIGSTOP)  # the loss happens between two of its batches
        try:
            _put_back(deployment, r, copy)
        finally:
            os.killpg(w.pid, signal.SIGCONT)
        assert fault_oracle.applied(deployment) == at_copy < second
        fault_oracle.produce(deployment, inputs[second:])
        assert w.wait(timeout=180) == 70
        assert fault_oracle.applied(deployment) == at_copy  # nothing applied past the hole
    finally:
        r.close()
    _stopped_then_exact_after_restart(deployment, tmp_path, inputs)


def test_an_idle_worker_whose_redis_was_emptied_stops_without_new_input(
        deployment, tmp_path: Path) -> None:
    """Redis restarted empty (no persistence) under a worker with no input: the worker
    loads nothing, and used to go on unaware (sweeping emptied partitions, scoring the
    next input against the partial state) until input came for a partition it had
    committed to. Its idle check of the stored watermarks stops it by itself (exit 70);
    restarted, it reads the input again from the start and everything is exact."""

    events = 3_000
    inputs = fault_oracle.synthetic_input(events, seed=13)
    fault_oracle.produce(deployment, inputs)
    w = deployment.start_worker(tmp_path)
    fault_oracle.wait_applied(deployment, events)
    _emptied_under(deployment, tmp_path, w, inputs)


def test_a_freshly_started_idle_worker_whose_redis_was_emptied_stops(
        deployment, tmp_path: Path) -> None:
    """The same loss under a worker that has committed nothing yet (just started after
    another applied everything): it knew no watermark to check, went on unaware, and
    the next input was applied on top of an empty state, the earlier events lost for
    good. It now takes the watermarks it finds when its partitions are assigned."""
    import time


    events = 2_000
    inputs = fault_oracle.synthetic_input(events, seed=17)
    fault_oracle.produce(deployment, inputs)
    first = deployment.start_worker(tmp_path)
    fault_oracle.wait_applied(deployment, events)
    deployment.kill(first, signal.SIGTERM)
    assert first.returncode == 0
    w = deployment.start_worker(tmp_path)
    time.sleep(8)  # assigned, positioned, idle
    assert w.poll() is None
    _emptied_under(deployment, tmp_path, w, inputs)
