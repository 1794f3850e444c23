"""A partition whose version another writer keeps moving: the worker gives up and stops.

Processes outside the engine bump partition 0's version in Redis (``HINCRBY meta ver 1``)
in tight loops, as a writer that never stops would (a split brain, a runaway script).
Every commit of partition 0 is refused by the version fence, and after
``MAX_COMMIT_ATTEMPTS`` refusals in a row the batch gives up. The worker must then stop at
once, with exit code 70 and a critical log line, whether the batch commits in the
background (the default) or not, and also when no later batch arrives to find the failure
(the whole input here is one or two batches). It must not acknowledge to Kafka any input
of partition 0 that it did not commit. Once the writer is gone, a restarted worker
processes everything exactly once, judged against the input.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fault_oracle
import pytest
import redis

from stream.pipeline import MAX_COMMIT_ATTEMPTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 1_500
#: What fail_stop exits with.
EXIT_CODE = 70


#: Processes moving the version. One thread in the test process was not enough: on two
#: cores shared with the broker, Redis, the worker and its learner, a pause of the thread
#: longer than one load-to-commit cycle of the worker let that commit through (the engine
#: rightly took it) before the batch had been refused MAX_COMMIT_ATTEMPTS times. Three
#: processes sending one command at a time still let one through now and then on a loaded
#: machine (all three off the CPU for a whole cycle). Each now writes its increments to
#: the socket thousands at a time and reads the replies after: the kernel's buffers and
#: Redis' query buffer hold them, so Redis goes on moving the version while the process
#: waits for the CPU.
MOVERS = 3
_MOVE = """
import socket, sys, urllib.parse
url = urllib.parse.urlparse(sys.argv[1])
key = sys.argv[2].encode()
one = (b"*4\\r\\n$7\\r\\nHINCRBY\\r\\n$%d\\r\\n%s\\r\\n" % (len(key), key)
       + b"$3\\r\\nver\\r\\n$1\\r\\n1\\r\\n")
n = 20000
conn = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379))
db = (url.path or "/0").strip("/") or "0"
conn.sendall(b"*2\\r\\n$6\\r\\nSELECT\\r\\n$%d\\r\\n%s\\r\\n" % (len(db), db.encode()))
conn.recv(64)
while True:
    conn.sendall(one * n)
    seen = 0
    while seen < n:
        data = conn.recv(1 << 20)
        if not data:
            sys.exit(0)
        seen += data.count(b"\\r\\n")
"""


class VersionMover:
    """Moves one partition's version on, again and again, until stopped."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            before = int(client.hget(self.key, "ver") or 0)
            self.procs = [subprocess.Popen([sys.executable, "-c", _MOVE, self.url, self.key])
                          for _ in range(MOVERS)]
            deadline = time.monotonic() + 30
            # moving before the worker starts
            while int(client.hget(self.key, "ver") or 0) < before + 1000:
                assert time.monotonic() < deadline, "the version movers did not start"
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(timeout=10)


def acknowledged(dep: Any, partition: int) -> dict[str, int]:
    """The consumer group's committed offsets of one partition, by input topic."""
    from kafka import KafkaConsumer, TopicPartition

    from stream.kafka import client_config

    s = dep.settings
    c = KafkaConsumer(**client_config(s), group_id=s.app_id, enable_auto_commit=False)
    try:
        found = {t: c.committed(TopicPartition(t, partition)) for t in s.input_topics}
    finally:
        c.close()
    return {t: off for t, off in found.items() if off is not None}


@pytest.mark.parametrize("background", ["true", "false"])
def test_a_batch_that_gives_up_stops_the_worker_and_a_restart_loses_nothing(
        deployment, tmp_path: Path, background: str) -> None:
    deployment.env["SEGSTREAM_COMMIT_IN_BACKGROUND"] = background
    inputs = fault_oracle.synthetic_input(EVENTS, seed=83)
    fault_oracle.produce(deployment, inputs)
    s = deployment.settings
    mover = VersionMover(s.redis_url, f"{s.redis_prefix}{{p0}}:meta")
    mover.start()
    try:
        t0 = time.monotonic()
        w = deployment.start_worker(tmp_path)
        try:
            rc = w.wait(timeout=180)
        except Exception:
            deployment.kill(w)
            raise AssertionError("the worker kept running after its batch gave up:\n"
                                 + deployment.logs[0].read_text()[-3000:]) from None
        print(f"worker exited {rc} after {time.monotonic() - t0:.1f}s")
    finally:
        mover.stop()
    log = deployment.logs[0].read_text(errors="replace")
    assert rc == EXIT_CODE, log[-3000:]
    stops = [ln for ln in log.splitlines() if "CRITICAL" in ln and "the worker stops" in ln]
    # the reason is logged in full: it carries no customer data
    assert len(stops) == 1 and "gave up after repeated commit conflicts" in stops[0], \
        log[-3000:]
    assert log.count("commit fenced on partitions") >= MAX_COMMIT_ATTEMPTS - 1, log[-3000:]
    # Nothing of partition 0 acknowledged past what the store holds (here: nothing of it
    # was ever committed, so no watermark, and no offset may be acknowledged).
    wm = {t: w for (t, p), w in fault_oracle.watermarks(deployment).items() if p == 0}
    acked = acknowledged(deployment, 0)
    for topic, offset in acked.items():
        assert offset <= wm.get(topic, -1) + 1, (topic, offset, wm)

    deployment.start_worker(tmp_path)
    deployment.cli("wait", "--timeout", "600")
    summary = fault_oracle.judge(deployment, inputs)
    print({"background": background, "acknowledged_p0": acked, "watermarks_p0": wm, **summary})
