"""Redis faults under a running worker: a SIGKILL and restart with AOF, and lost replies.

Both tests run against a private ``redis-server`` (own port, own directory, AOF with
``appendfsync always``) so that killing it cannot disturb the shared services.

* Redis is killed mid-stream and restarted from its AOF a few seconds later: the worker
  backs off and retries (``state store unavailable`` in its log), never exits or
  crashes an agent, and resumes; the end state is exact.
* A small TCP proxy between the worker and Redis forwards a commit (``EVALSHA``) and
  then withholds Redis's reply for longer than ``SEGSTREAM_REDIS_TIMEOUT_S``: the write
  was applied, the worker saw a timeout. Its retry must find the watermark moved on and
  count nothing twice; the end state is exact.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import fault_oracle
import pytest
import redis
from fault_oracle import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 30_000
#: Events per second of the live input of the timeout test (about 75 s of input).
TIMEOUT_TEST_RATE = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test only, on a free port, data in a temp dir, AOF on."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.starts += 1
        eventually(self.ping, 30, f"private Redis on port {self.port} answers")

    def ping(self) -> bool:
        try:
            r = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
            try:
                return bool(r.ping())
            finally:
                r.close()
        except (redis.RedisError, OSError):
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def private_redis(tmp_path: Path) -> Any:
    r = PrivateRedis(tmp_path / "redis")
    r.start()
    yield r
    r.stop()


def agent_crashes(log: Path) -> list[str]:
    text = log.read_text(errors="replace")
    return [ln for ln in text.splitlines()
            if "Crashed" in ln or "Traceback" in ln]


def test_redis_killed_and_restarted_with_aof(private_redis: PrivateRedis, make_deployment,
                                             tmp_path: Path) -> None:
    dep = make_deployment(SEGSTREAM_REDIS_URL=private_redis.url)
    inputs = fault_oracle.synthetic_input(EVENTS, seed=31)
    fault_oracle.produce(dep, inputs)
    w = dep.start_worker(tmp_path)
    t0 = time.monotonic()
    fault_oracle.wait_applied(dep, EVENTS // 3)
    private_redis.kill()
    print(f"Redis killed at {time.monotonic() - t0:.0f}s")
    time.sleep(8)  # the worker keeps trying against a dead Redis
    assert w.poll() is None, "the worker exited while Redis was down"
    private_redis.start()
    print(f"Redis restarted from its AOF at {time.monotonic() - t0:.0f}s")
    before = fault_oracle.applied(dep)
    assert 0 < before < EVENTS, before
    dep.cli("wait", "--timeout", "600")
    print(f"caught up after {time.monotonic() - t0:.0f}s")

    log = dep.logs[0]
    text = log.read_text(errors="replace")
    assert w.poll() is None, "the worker exited"
    assert text.count("Worker]: Ready") == 1, "the worker restarted"
    assert "state store unavailable" in text, "no retry with backoff was logged"
    assert agent_crashes(log) == [], agent_crashes(log)[:5]
    print(fault_oracle.judge(dep, inputs))


class ReplyHoldingProxy(threading.Thread):
    """TCP proxy to Redis that, when armed, withholds the replies to the next commit.

    Requests always go through at once. When armed, the first client chunk that holds an
    ``EVALSHA`` (the feature-store commit script) is forwarded and that connection's
    replies are then held back for ``hold_s``; by then the client has timed out and
    closed the connection, so the replies are dropped. ``before`` and ``after`` are
    the sum of every partition's commit version just before forwarding and shortly
    after: when ``after`` is larger, the write the worker timed out on was applied.
    """

    def __init__(self, upstream_port: int, versions: Any, hold_s: float) -> None:
        super().__init__(daemon=True)
        self.upstream_port = upstream_port
        self.port = _free_port()
        self.versions = versions
        self.hold_s = hold_s
        self.armed = threading.Event()
        self.held: list[tuple[int, int]] = []
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.ready.set()
        async with server:
            await server.serve_forever()

    async def _applied(self, before: int) -> None:
        """Record the version sum once the held commit landed (or the hold ran out)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.hold_s
        after = before
        while after == before and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            after = await loop.run_in_executor(None, self.versions)
        self.held.append((before, after))

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.close()
            return
        hold_until = [0.0]
        pending: list[asyncio.Future[None]] = []

        async def up() -> None:
            loop = asyncio.get_running_loop()
            while data := await cr.read(65536):
                measure = None
                if self.armed.is_set() and b"EVALSHA" in data.upper():
                    self.armed.clear()
                    before = await loop.run_in_executor(None, self.versions)
                    hold_until[0] = time.monotonic() + self.hold_s
                    measure = before
                sw.write(data)  # a long pipeline continues in the next chunks
                await sw.drain()
                if measure is not None:
                    pending.append(asyncio.ensure_future(self._applied(measure)))

        async def down() -> None:
            while data := await sr.read(65536):
                wait = hold_until[0] - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    return  # the client gave up on this connection: drop the replies
                cw.write(data)
                await cw.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        if pending:
            await asyncio.gather(*pending)
        for w in (cw, sw):
            w.close()


def test_redis_timeout_after_the_commit_applied_counts_nothing_twice(
        private_redis: PrivateRedis, make_deployment, tmp_path: Path) -> None:
    timeout_s = 1.0

    def versions() -> int:
        from features.store import Keys

        keys = Keys(dep.settings.redis_prefix)
        r = redis.Redis.from_url(private_redis.url)
        try:
            return sum(int(r.hget(keys.meta(p), "ver") or 0)
                       for p in range(dep.settings.partitions))
        finally:
            r.close()

    proxy = ReplyHoldingProxy(private_redis.port, versions, hold_s=3 * timeout_s)
    proxy.start()
    assert proxy.ready.wait(10)
    dep = make_deployment(SEGSTREAM_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0",
                          SEGSTREAM_REDIS_TIMEOUT_S=str(timeout_s))
    inputs = fault_oracle.synthetic_input(EVENTS, seed=37)
    w = dep.start_worker(tmp_path)
    # A live stream at a steady rate, so input still arrives after the last fault however
    # fast the worker catches up (a backlog produced up front can drain before it).
    feed = fault_oracle.PacedProducer(dep, inputs, TIMEOUT_TEST_RATE)
    feed.start()
    t0 = time.monotonic()
    shares = (0.15, 0.3, 0.45, 0.6, 0.75)
    for share in shares:
        fault_oracle.wait_applied(dep, int(share * EVENTS))
        held = len(proxy.held)
        proxy.armed.set()
        eventually(lambda n=held: len(proxy.held) > n, 60, "a commit's reply is held back")
        time.sleep(proxy.hold_s + 1)
    print(f"held commits (version sum before, after): {proxy.held}")
    assert len(proxy.held) == len(shares)
    assert all(after > before for before, after in proxy.held), (
        "a held commit was not applied; the fault was not injected", proxy.held)
    assert fault_oracle.applied(dep) < EVENTS, "the replay finished before the last fault"
    feed.finish()
    dep.cli("wait", "--timeout", "600")
    print(f"caught up after {time.monotonic() - t0:.0f}s")
    text = dep.logs[0].read_text(errors="replace")
    assert w.poll() is None, "the worker exited"
    assert text.count("Worker]: Ready") == 1, "the worker restarted"
    # A held reply may belong to a batch's commit (made in the background while the next
    # batch is evaluated, or in the batch itself) or to a sweep's (an idle worker sweeps).
    timeouts = (text.count("state store unavailable") + text.count("sweep commit failed")
                + text.count("background commit failed"))
    assert timeouts >= len(shares), "a held commit's timeout was not seen"
    assert agent_crashes(dep.logs[0]) == []
    print(fault_oracle.judge(dep, inputs))
