"""``up`` and ``down`` of the local services: a pid file only ever stops the process ``up``
started, each port has its own files, and a port in use fails at once naming the setting."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream import services
from stream.errors import ServiceError
from stream.settings import load_settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sleeper(*argv: str) -> subprocess.Popen[bytes]:
    """A process whose command line holds ``argv`` (it only sleeps)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv])
    deadline = time.monotonic() + 10
    last = argv[-1] if argv else "time.sleep"
    while (cmd := services._command_line(proc.pid)) is None or last not in cmd:
        assert time.monotonic() < deadline, "the process did not start"
        time.sleep(0.05)
    return proc


def test_a_stale_pid_file_never_stops_another_process(tmp_path: Path) -> None:
    """`down` used to signal whatever process had the pid of a leftover pid file."""
    port, kport = _free_port(), _free_port()
    s = load_settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{port}/0",
                      kafka_bootstrap=f"127.0.0.1:{kport}")
    # not the broker of this node, nor a Redis on this port (but one on a port it prefixes)
    other, other_too = _sleeper(f"redis-server 127.0.0.1:{port}0"), _sleeper("kafka.Kafka")
    try:
        rdir = tmp_path / "redis" / f"port-{port}"
        kdir = tmp_path / "kafka" / f"node-{kport}"
        rdir.mkdir(parents=True)
        kdir.mkdir(parents=True)
        (rdir / "redis.pid").write_text(str(other.pid))
        (kdir / "kafka.pid").write_text(str(other_too.pid))
        assert services.down(s) == {"kafka": False, "redis": False}
        time.sleep(0.3)
        assert other.poll() is None and other_too.poll() is None
        assert not (rdir / "redis.pid").exists()  # the stale files are dropped
    finally:
        other.kill()
        other_too.kill()


def test_down_stops_the_broker_up_started_on_that_port(tmp_path: Path) -> None:
    kport = _free_port()
    s = load_settings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{kport}",
                      redis_url=f"redis://127.0.0.1:{_free_port()}/0")
    kdir = tmp_path / "kafka" / f"node-{kport}"
    kdir.mkdir(parents=True)
    broker = _sleeper("kafka.Kafka", str(kdir / "server.properties"))
    try:
        (kdir / "kafka.pid").write_text(str(broker.pid))
        assert services.down(s)["kafka"] is True
        assert broker.wait(timeout=10) is not None
    finally:
        broker.kill()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_two_redis_ports_with_one_data_dir_keep_their_own_files(tmp_path: Path) -> None:
    """Two `up`s on different Redis ports with one data dir shared one append-only file
    and one pid file: the second server's data went into the first's file, and `down` for
    the first stopped the second."""
    a, b = _free_port(), _free_port()
    sa = load_settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{a}/0")
    sb = load_settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{b}/0")
    services.start_redis(sa)
    try:
        services.start_redis(sb)
        try:
            assert (tmp_path / "redis" / f"port-{a}" / "redis.pid").exists()
            assert (tmp_path / "redis" / f"port-{b}" / "redis.pid").exists()
            assert services.stop_redis(sa) is True
            assert not services.redis_healthy(sa)
            assert services.redis_healthy(sb), "stopping one port's Redis stopped the other"
        finally:
            services.stop_redis(sb)
    finally:
        services.stop_redis(sa)
    assert not services.redis_healthy(sb)


def test_a_port_in_use_fails_at_once_naming_the_setting(tmp_path: Path) -> None:
    """`up` waited 120 s and said "did not become healthy" for a server that had exited at
    once because its port was taken."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        s = load_settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{port}/0",
                          kafka_bootstrap=f"127.0.0.1:{port}")
        t0 = time.monotonic()
        with pytest.raises(ServiceError, match="SEGSTREAM_REDIS_URL"):
            services.start_redis(s)
        with pytest.raises(ServiceError, match=f"port {port} is in use.*SEGSTREAM_KAFKA_BOOTSTRAP"):
            services.start_kafka(s)
        # the broker's controller takes the next port
        s2 = load_settings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{port - 1}")
        if services._port_free(port - 1):
            with pytest.raises(ServiceError, match="controller listens on the next port"):
                services.start_kafka(s2)
        assert time.monotonic() - t0 < 10
