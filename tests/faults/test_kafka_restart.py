"""The Kafka broker is killed (SIGKILL) mid-stream and restarted: the worker reconnects.

A private single-node KRaft broker is started with ``stream.services.start_kafka`` on
two free ports and its own data directory (a temporary ``SEGSTREAM_DATA_DIR`` that
links the cached broker jars, so nothing is downloaded and the shared broker's pid file
is never touched). The input is in the broker before the worker starts; a third of the
way through, the broker is killed and restarted from its log directory. The worker must
stay up, reconnect, finish, and leave an exact end state; migrations and dead letters
it could not publish while the broker was down are published from the outbox.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import fault_oracle
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 30_000


def _two_free_ports() -> int:
    """A port whose successor is free too (the broker's controller listens on port + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


class PrivateKafka:
    def __init__(self, directory: Path) -> None:
        from stream import services
        from stream.settings import load_settings

        shared = services.kafka_libs(load_settings())  # the cached jars of this machine
        self.settings = load_settings(kafka_bootstrap=f"127.0.0.1:{_two_free_ports()}",
                                      data_dir=directory)
        (directory / "kafka").mkdir(parents=True, exist_ok=True)
        (directory / "kafka" / shared.name).symlink_to(shared, target_is_directory=True)
        port = int(self.bootstrap.rpartition(":")[2])
        self.pid_file = directory / "kafka" / f"node-{port}" / "kafka.pid"

    @property
    def bootstrap(self) -> str:
        return str(self.settings.kafka_bootstrap)

    def start(self) -> None:
        from stream import services

        services.start_kafka(self.settings)

    def _signal_and_reap(self, sig: int, timeout_s: float) -> bool:
        """Send ``sig`` to the broker (a child of this process) and reap it."""
        pid = int(self.pid_file.read_text())
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return True
            except ChildProcessError:
                return True
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        assert self._signal_and_reap(signal.SIGKILL, 30), "the broker did not die"

    def stop(self) -> None:
        if self.pid_file.exists() and not self._signal_and_reap(signal.SIGTERM, 30):
            self._signal_and_reap(signal.SIGKILL, 30)
        self.pid_file.unlink(missing_ok=True)


@pytest.fixture
def private_kafka(tmp_path: Path) -> Any:
    k = PrivateKafka(tmp_path / "kafka-home")
    k.start()
    yield k
    k.stop()


def test_kafka_killed_and_restarted_mid_stream(private_kafka: PrivateKafka, make_deployment,
                                               tmp_path: Path) -> None:
    dep = make_deployment(SEGSTREAM_KAFKA_BOOTSTRAP=private_kafka.bootstrap)
    inputs = fault_oracle.synthetic_input(EVENTS, seed=41)
    fault_oracle.produce(dep, inputs)
    w = dep.start_worker(tmp_path)
    t0 = time.monotonic()
    fault_oracle.wait_applied(dep, EVENTS // 3)
    assert _ready(dep.web_url(w)) == (200, True)
    private_kafka.kill()
    at_kill = fault_oracle.applied(dep)
    print(f"broker killed at {at_kill} of {EVENTS} applied ({time.monotonic() - t0:.0f}s)")
    # README: /readyz is ready when Redis and Kafka are reachable (it said Kafka was
    # reachable whenever the worker had a consumer object)
    down_at = time.monotonic()
    while _ready(dep.web_url(w)) != (503, False) and time.monotonic() - down_at < 10:
        time.sleep(0.5)
    assert _ready(dep.web_url(w)) == (503, False), "readyz still ready without a broker"
    time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
    assert w.poll() is None, "the worker exited while the broker was down"
    private_kafka.start()
    print(f"broker restarted ({time.monotonic() - t0:.0f}s)")
    dep.cli("wait", "--timeout", "600")
    print(f"caught up after {time.monotonic() - t0:.0f}s")
    assert _ready(dep.web_url(w)) == (200, True), "readyz not ready after the broker returned"
    text = dep.logs[0].read_text(errors="replace")
    assert w.poll() is None, "the worker exited"
    assert text.count("Worker]: Ready") == 1, "the worker restarted"
    assert at_kill < EVENTS, "the replay finished before the broker went down"
    print(fault_oracle.judge(dep, inputs))


def _ready(base: str) -> tuple[int, bool | None]:
    """/readyz's status and its ``kafka`` check."""
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())["kafka"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["kafka"]
