"""``segstream learner`` on a real broker and Redis: what the in-loop learner would learn,
once, resumed by a restart, and gone with its worker."""

from __future__ import annotations

import contextlib
import math
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import redis

from scorers.labels import Example
from scorers.online import OnlineModel
from stream.learner import Learner, checkpoint_key
from stream.learner_service import group_id
from stream.runtime import model_key, registry_keys
from tests import redis_servers
from tests.conftest import ROOT


def examples(start: int, n: int) -> list[tuple[bytes | None, bytes]]:
    rnd = random.Random(start)
    out: list[tuple[bytes | None, bytes]] = []
    for i in range(start, start + n):
        x = {"events_30d": rnd.gauss(10, 4), "purchases_90d": rnd.gauss(2, 1)}
        y = int(rnd.random() < 1 / (1 + math.exp(-(x["events_30d"] - 10) / 2)))
        model = "churn" if i % 3 else "purchase_7d"
        out.append((None, Example(f"e{i}", model, f"c{i % 97}", i, i, x, y).to_bytes()))
    return out


#: Stands in for a worker: starts a learner the way ``segstream worker`` does and waits.
PARENT = ("from stream.learner_service import spawn; from stream.settings import load_settings;"
          " spawn(load_settings()).wait()")


def start_learner(d: Any, tmp: Path, name: str, script: str = PARENT, **env: str
                  ) -> tuple[subprocess.Popen[bytes], psutil.Process]:
    """A stand-in worker process (``script``) and the learner it started as its child."""
    env = dict(d.env, SEGSTREAM_MODEL_SNAPSHOT_S="0.5", **env)
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                              stdout=open(tmp / f"{name}.log", "wb"),  # noqa: SIM115
                              stderr=subprocess.STDOUT)
    children = wait_for(lambda: psutil.Process(parent.pid).children(), 30, "the learner")
    return parent, children[0]


def wait_for(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def served(r: redis.Redis, prefix: str) -> dict[str, OnlineModel]:
    out = {}
    for name in ("churn", "purchase_7d"):
        blob = r.get(model_key(prefix, name))
        if blob is not None:
            out[name] = OnlineModel.restore(blob)
    return out


def test_learner_process_learns_every_example_once_and_stops_with_its_worker(
        deployment: Any, tmp_path: Path) -> None:
    d = deployment
    s = d.settings
    first = examples(0, 600)
    d.produce("segmentation-examples", first)
    r = redis.from_url(s.redis_url)
    keys = registry_keys(s.redis_prefix)
    parent, learner = start_learner(d, tmp_path, "learner-1")
    try:
        def promoted() -> dict[str, OnlineModel] | None:
            models = served(r, s.redis_prefix)
            learned = sum(m.examples for m in models.values())
            return models if len(models) == 2 and learned == len(first) else None

        models = wait_for(promoted, 90, "both models promoted with every example")
        # The same records through the in-loop learner give the same models.
        reference = Learner(s, None)  # type: ignore[arg-type]  # learning needs no Redis
        reference.learn([(i, v) for i, (_, v) in enumerate(first)])
        probe = [{"events_30d": e, "purchases_90d": 2.0} for e in range(0, 21, 2)]
        for name, model in models.items():
            assert model.examples == reference.models[name].examples
            assert model.predict_many(probe) == reference.models[name].predict_many(probe)
        assert int(r.hget(keys["learner"], "offset")) == len(first) - 1
        # Workers load the serving snapshot: it leaves out the example ids, which only
        # learning uses; the checkpoint the learner resumes from keeps every one of them.
        for name, model in models.items():
            serving = r.get(model_key(s.redis_prefix, name))
            assert "_seen" not in pickle.loads(serving)["state"]
            assert not model._seen
            kept = OnlineModel.restore(r.get(checkpoint_key(s.redis_prefix, name)))
            assert len(kept._seen) == kept.examples == model.examples

        # The learner's worker dies: the learner follows within a couple of seconds.
        parent.kill()
        parent.wait()
        learner.wait(timeout=10)
        assert not learner.is_running()

        # A restarted learner resumes where the group committed: nothing learned twice.
        parent, learner = start_learner(d, tmp_path, "learner-2")
        second = examples(600, 300)
        d.produce("segmentation-examples", second)
        total = len(first) + len(second)

        def caught_up() -> dict[str, OnlineModel] | None:
            models = served(r, s.redis_prefix)
            return models if sum(m.examples for m in models.values()) >= total else None

        models = wait_for(caught_up, 90, "the second batch of examples learned")
        time.sleep(2)  # a double learning would show up as more examples by now
        models = served(r, s.redis_prefix)
        assert sum(m.examples for m in models.values()) == total
        reference.learn([(len(first) + i, v) for i, (_, v) in enumerate(second)])
        for name, model in models.items():
            assert model.predict_many(probe) == reference.models[name].predict_many(probe)
        # Its own consumer group, beside the workers' group, committed past every example.
        from kafka import KafkaConsumer, TopicPartition

        from stream.kafka import client_config

        c = KafkaConsumer(**client_config(s), group_id=group_id(s), enable_auto_commit=False)
        try:
            assert c.committed(TopicPartition(s.examples_topic, 0)) == total
        finally:
            c.close()
    finally:
        for p in (learner, parent):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in (learner, parent):
            with contextlib.suppress(psutil.Error, subprocess.TimeoutExpired):
                p.wait(timeout=30)
        r.close()


def test_a_learner_started_while_redis_is_down_waits_and_then_learns_everything(
        deployment: Any, tmp_path: Path) -> None:
    d = deployment
    port = redis_servers.free_port()
    url = f"redis://127.0.0.1:{port}/0"
    batch = examples(0, 300)
    d.produce("segmentation-examples", batch)
    parent, learner = start_learner(d, tmp_path, "learner", SEGSTREAM_REDIS_URL=url)
    server: subprocess.Popen[bytes] | None = None
    try:
        # It gets the examples partition and fetches while no Redis answers: it must
        # neither exit nor drop what it fetched.
        time.sleep(6)
        assert learner.is_running() and learner.status() != psutil.STATUS_ZOMBIE, \
            (tmp_path / "learner.log").read_text()[-3000:]
        server = redis_servers.plain_redis(port, tmp_path)
        r = redis.from_url(url)
        try:
            def learned() -> int | None:
                try:
                    n = sum(m.examples for m in served(r, d.settings.redis_prefix).values())
                except (redis.RedisError, OSError):
                    return None
                return n if n >= len(batch) else None

            wait_for(learned, 90, "every example learned once Redis answers")
            time.sleep(1.5)  # a double learning would show by now
            assert sum(m.examples for m in served(r, d.settings.redis_prefix).values()) \
                == len(batch)
        finally:
            r.close()
    finally:
        for p in (learner, parent):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in (learner, parent):
            with contextlib.suppress(psutil.Error, subprocess.TimeoutExpired):
                p.wait(timeout=30)
        if server is not None:
            redis_servers.stop(server)


#: Stands in for a worker that supervises its learner as ``segstream worker`` does.
SUPERVISOR = ("import time; from stream.learner_service import LearnerChild;"
              " from stream.settings import load_settings;"
              " LearnerChild(load_settings(), check_s=0.2); time.sleep(600)")


def test_a_learner_that_dies_is_started_again_and_goes_on_learning(
        deployment: Any, tmp_path: Path) -> None:
    d = deployment
    s = d.settings
    parent, first = start_learner(d, tmp_path, "supervisor", SUPERVISOR)
    r = redis.from_url(s.redis_url)
    try:
        d.produce("segmentation-examples", examples(0, 200))
        wait_for(lambda: sum(m.examples for m in served(r, s.redis_prefix).values()) >= 200,
                 90, "the first examples learned")
        first.kill()  # as an out-of-memory kill would
        first.wait(timeout=10)

        def replaced() -> psutil.Process | None:
            kids = [c for c in psutil.Process(parent.pid).children() if c.pid != first.pid
                    and c.status() != psutil.STATUS_ZOMBIE]
            return kids[0] if kids else None

        second = wait_for(replaced, 30, "a new learner process")
        d.produce("segmentation-examples", examples(200, 100))
        wait_for(lambda: sum(m.examples for m in served(r, s.redis_prefix).values()) >= 300,
                 90, "the examples after the restart learned")
        time.sleep(1.5)
        # Resumed from the snapshot and the group's committed offset: nothing twice. The
        # killed process may have learned examples it never snapshotted; those are learned
        # again by the new one, from the snapshot's state, so the count is still exact.
        assert sum(m.examples for m in served(r, s.redis_prefix).values()) == 300
        assert second.is_running()
        # A learner told to stop (as Ctrl-C or a shutdown does) is not started again.
        second.terminate()
        second.wait(timeout=30)
        time.sleep(3)
        assert [c for c in psutil.Process(parent.pid).children()
                if c.status() != psutil.STATUS_ZOMBIE] == []
    finally:
        parent.kill()
        parent.wait()
        for c in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if c.ppid() == parent.pid:
                    c.terminate()
        r.close()
