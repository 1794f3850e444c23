"""Shared fixtures: the real Kafka broker and Redis server, started once per session.

Services are started by the project's own ``segstream up`` logic (local processes;
a Docker engine is never required). Each test gets its own app id, topic prefix
and Redis prefix, so tests share one broker and one Redis without seeing each other.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
SEGSTREAM = [sys.executable, "-m", "stream.cli"]
KAFKA = os.environ.get("SEGSTREAM_TEST_KAFKA", "127.0.0.1:19092")
REDIS = os.environ.get("SEGSTREAM_TEST_REDIS", "redis://127.0.0.1:16379/0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    """Kafka and Redis up (reused when already running)."""
    from stream import services as svc
    from stream.settings import load_settings

    s = load_settings(kafka_bootstrap=KAFKA, redis_url=REDIS)
    svc.up(s)
    return {"kafka": KAFKA, "redis": REDIS}


class Deployment:
    """One isolated deployment (own topics and keys) on the shared services."""

    def __init__(self, services: dict[str, str], partitions: int = 3, **extra: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.env = dict(os.environ)
        self.env.update({
            "SEGSTREAM_KAFKA_BOOTSTRAP": services["kafka"],
            "SEGSTREAM_REDIS_URL": services["redis"],
            "SEGSTREAM_APP_ID": f"t-{tag}",
            "SEGSTREAM_TOPIC_PREFIX": f"t-{tag}.",
            "SEGSTREAM_REDIS_PREFIX": f"t-{tag}:",
            "SEGSTREAM_PARTITIONS": str(partitions),
            "PYTHONUNBUFFERED": "1",
        })
        self.env.update(extra)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.web_ports: dict[int, int] = {}

    @property
    def settings(self) -> Any:
        from stream.settings import Settings

        fields = {k[len("SEGSTREAM_"):].lower(): v for k, v in self.env.items()
                  if k.startswith("SEGSTREAM_") and not k.startswith("SEGSTREAM_TEST")}
        return Settings(**{k: v for k, v in fields.items() if k in Settings.model_fields})

    def cli(
        self, *args: str, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*SEGSTREAM, *args], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"segstream {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def start_worker(self, tmp: Path) -> subprocess.Popen[bytes]:
        port = _free_port()
        env = dict(self.env, SEGSTREAM_WEB_PORT=str(port))
        log = tmp / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        proc = subprocess.Popen([*SEGSTREAM, "worker"], env=env, cwd=ROOT,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                start_new_session=True)
        self.workers.append(proc)
        self.web_ports[proc.pid] = port
        # After a kill -9 the group waits for the dead member's session to expire.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{log.read_text()[-3000:]}")
            if b"Worker]: Ready" in log.read_bytes():
                return proc
            time.sleep(0.2)
        raise AssertionError(f"worker not ready:\n{log.read_text()[-3000:]}")

    def web_url(self, proc: subprocess.Popen[bytes]) -> str:
        """Base URL of a worker's HTTP API, dashboard and /metrics (its SEGSTREAM_WEB_PORT)."""
        return f"http://127.0.0.1:{self.web_ports[proc.pid]}"

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=60)

    def stop_all(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.workers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    def produce(self, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
        from stream.kafka import ensure_topics, producer

        s = self.settings
        ensure_topics(s)
        p = producer(s)
        for key, value in records:
            p.send(s.topic(topic), key=key, value=value)
        p.flush()
        p.close()

    def consume_all(self, topic: str, timeout_s: float = 10.0) -> list[Any]:
        """Every record now in a topic of this deployment (from the beginning)."""
        from kafka import KafkaConsumer, TopicPartition

        from stream.kafka import client_config, end_offsets

        s = self.settings
        name = s.topic(topic)
        ends = end_offsets(s, [name])
        c = KafkaConsumer(**client_config(s), enable_auto_commit=False,
                          consumer_timeout_ms=int(timeout_s * 1000))
        tps = [TopicPartition(t, p) for (t, p) in ends]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        out = []
        want = sum(ends.values())
        deadline = time.monotonic() + timeout_s
        while len(out) < want and time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                out.extend(batch)
        c.close()
        return out

    def states(self) -> tuple[int, dict[str, Any]]:
        """Engine time and every stored customer's decoded state."""
        from features import serial
        from features.store import RedisFeatureStore
        from stream.app import redis_client

        s = self.settings

        async def run() -> tuple[int, dict[str, Any]]:
            r = redis_client(s)
            try:
                store = RedisFeatureStore(r, s.redis_prefix)
                out = {}
                async for _, cid, blob in store.iter_customers(s.partitions):
                    out[cid] = serial.decode(blob)
                return await store.now(), out
            finally:
                await r.aclose()

        return asyncio.run(run())

    def features(self) -> tuple[int, dict[str, dict[str, Any]]]:
        from features.state import derive

        now, states = self.states()
        return now, {cid: derive(st, now) for cid, st in states.items()}

    def cleanup(self) -> None:
        self.stop_all()
        done = self.cli("reset", "--yes", check=False, timeout=120)
        if done.returncode == 0:
            # A reset deletes only the engine's own key families (another deployment's
            # prefix may start with this one's): every key the test's engine wrote is one.
            from stream.redisconn import redis_sync_client

            r = redis_sync_client(self.settings)
            try:
                left = list(r.scan_iter(match=f"{self.settings.redis_prefix}*", count=1000))
            finally:
                r.close()
            assert not left, f"keys a reset left behind: {left[:10]}"


@pytest.fixture
def deployment(services: dict[str, str], tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(services)
    yield d
    d.cleanup()


@pytest.fixture
def make_deployment(services: dict[str, str]) -> Iterator[Any]:
    made: list[Deployment] = []

    def make(**kw: Any) -> Deployment:
        d = Deployment(services, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)
