"""One benchmark run's isolated deployment on the shared broker and Redis.

Every run gets a fresh tag; app ids, the topic prefix and Redis prefixes all start
with ``bench-<tag>`` so that :meth:`BenchDeployment.cleanup` can remove exactly what
the run created (topics, Faust's internal topics, consumer groups, Redis keys, Faust
data directories) and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream.kafka import admin, delete_groups, end_offsets, ensure_topics, start_offsets
from stream.settings import Settings, env_name

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BenchDeployment:
    """Names, environment and child processes of one run."""

    base: Settings
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="segbench-")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    #: the HTTP port (API and ``/metrics``) of every child started by :meth:`spawn`, by pid
    web_ports: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"bench-{self.tag}"

    def settings(self, role: str) -> Settings:
        """Settings of one role (``engine``, ``floor``...): own app id and Redis prefix."""
        s = self.base.model_copy(update={
            "app_id": f"{self.name}-{role}",
            "topic_prefix": f"{self.name}.",
            "redis_prefix": f"{self.name}-{role}:",
        })
        self.groups.append(s.app_id)
        return s

    def create_topics(self) -> None:
        # Under the run's own app id: the contract topics include the app's leader topic,
        # which would otherwise be created (and left) under the user's SEGSTREAM_APP_ID.
        ensure_topics(self.base.model_copy(update={"topic_prefix": f"{self.name}.",
                                                   "app_id": f"{self.name}-topics"}))

    def env(self, s: Settings, **extra: str) -> dict[str, str]:
        """The environment of a child process running with settings ``s``."""
        env = dict(os.environ)
        for name in ("app_id", "topic_prefix", "redis_prefix", "kafka_bootstrap", "redis_url",
                     "partitions", "batch_max", "batch_within_s"):
            env[env_name(name)] = str(getattr(s, name))
        env[env_name("web_port")] = str(free_port())
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def spawn(self, module: str, s: Settings, log_name: str, **extra: str
              ) -> subprocess.Popen[bytes]:
        """Start ``python -m module`` in its own session, output to a log file."""
        log = self.workdir / f"{log_name}.log"
        env = self.env(s, **extra)
        proc = subprocess.Popen(
            [sys.executable, "-m", module], env=env, cwd=ROOT,
            stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115 - child owns it
            start_new_session=True,
        )
        self.procs.append(proc)
        self.web_ports[proc.pid] = int(env[env_name("web_port")])
        return proc

    def metrics_url(self, proc: subprocess.Popen[bytes]) -> str:
        """Where a child started by :meth:`spawn` serves ``/metrics``."""
        return f"http://127.0.0.1:{self.web_ports[proc.pid]}/metrics"

    def log_tail(self, log_name: str, n: int = 3000) -> str:
        try:
            return (self.workdir / f"{log_name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        """SIGTERM the process group; SIGKILL it if it does not exit in time."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def forget_examples(self) -> int:
        """Move the start of the learner examples topic past every record in it; returns
        how many records that skipped.

        A later E run's learners (a consumer group of their own, reading from the earliest
        offset) then learn only that run's examples, as a deployment's learner does, not
        also those of the runs before it."""
        from kafka.structs import TopicPartition

        s = self.base.model_copy(update={"topic_prefix": f"{self.name}."})
        topic = s.examples_topic
        ends = end_offsets(s, [topic])
        starts = start_offsets(s, [topic])
        todo = {TopicPartition(t, p): off for (t, p), off in ends.items()
                if off > starts.get((t, p), 0)}
        if not todo:
            return 0
        a = admin(self.base)
        try:
            a.delete_records(todo)
        finally:
            a.close()
        return sum(off - starts.get((tp.topic, tp.partition), 0) for tp, off in todo.items())

    def forget_keys(self, role: str) -> None:
        """Delete the Redis keys of one role (its prefix), e.g. an E run already measured."""
        from stream.redisconn import redis_sync_client

        r = redis_sync_client(self.base)
        try:
            _unlink_matching(r, f"{self.name}-{role}:*")
        finally:
            r.close()

    def cleanup(self, keep_logs: bool = False) -> None:
        """Stop children; delete the run's topics, groups, Redis keys (and logs unless kept)."""
        for p in self.procs:
            self.stop(p)
        a = admin(self.base)
        try:
            mine = [t for t in a.list_topics() if t.startswith(self.name)]
            if mine:
                with contextlib.suppress(Exception):
                    a.delete_topics(mine)
        finally:
            a.close()
        # Each engine role's learners have a group of their own beside the workers'.
        groups = sorted({*self.groups, *(f"{g}-learner" for g in self.groups)})
        try:
            failed = {g: e for g, e in delete_groups(self.base, groups).items() if e}
        except Exception as exc:
            failed = {"*": repr(exc)}
        if failed:
            print(f"benchmark consumer groups not deleted: {failed}", file=sys.stderr)
        from stream.redisconn import redis_sync_client

        r = redis_sync_client(self.base)
        try:
            _unlink_matching(r, f"{self.name}*")
        finally:
            r.close()
        for g in set(self.groups):
            shutil.rmtree(self.base.data_dir / "faust" / g, ignore_errors=True)
        if not keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.wait_topics_gone()

    def wait_topics_gone(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            a = admin(self.base)
            try:
                if not any(t.startswith(self.name) for t in a.list_topics()):
                    return
            finally:
                a.close()
            time.sleep(0.5)


def _unlink_matching(r: Any, pattern: str) -> None:
    batch: list[bytes] = []
    for k in r.scan_iter(match=pattern, count=2000):
        batch.append(k)
        if len(batch) >= 2000:
            r.unlink(*batch)
            batch = []
    if batch:
        r.unlink(*batch)
