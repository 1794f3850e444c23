"""A Redis timeout while a micro-batch reloads changed model snapshots loses that batch.

``ScoringRuntime.refresh`` turns Redis errors of its pipelined read into
``StoreUnavailable`` (which ``BatchProcessor.process`` retries with backoff), but the
``MGET`` of ``_load_models`` that follows whenever a model's serving version changed
(every learner promotion) is outside that ``try``: a ``redis.exceptions.TimeoutError``
escapes ``process``, the ingest agent crashes, Faust's supervisor restarts it in the same
process, and the records of the batch in flight are never fetched again (the consumer's
position is past them) while the next batches move the partition's watermark past them.

Two tests: the unit-level contract (``refresh`` raises ``StoreUnavailable``), and the
end-to-end consequence on a real worker: Redis is frozen (SIGSTOP) at the moment a batch
reloads a model, for longer than ``SEGSTREAM_REDIS_TIMEOUT_S``; after SIGCONT the events
of that batch are missing from the customers' state for good.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import fault_oracle
import pytest
import redis as redis_lib
from test_redis_restart import PrivateRedis

from features.store import StoreUnavailable

EVENTS = 6000
RATE = 200.0


class _FlakyRedis:
    """The pipelined read works; the model MGET times out (Redis stopped answering)."""

    def pipeline(self, transaction: bool = False):
        outer = self

        class P:
            def __init__(self) -> None:
                self.n = 0

            async def __aenter__(self):
                return self

            async def __aexit__(self, *a):
                return False

            def __getattr__(self, name):
                def queue(*a, **k):
                    self.n += 1
                return queue

            async def execute(self):
                # rfm tables (one per partition), the models hash, CLV params, rules SET
                return [{}] * outer.partitions + [{b"churn": b"7"}, None, True]

        return P()

    async def mget(self, keys):
        raise redis_lib.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379")


def test_model_reload_timeout_is_reported_as_store_unavailable() -> None:
    from features.store import RedisFeatureStore
    from stream.runtime import ScoringRuntime
    from stream.settings import load_settings

    s = load_settings(partitions=3)
    r = _FlakyRedis()
    r.partitions = s.partitions
    rt = ScoringRuntime(s, r, RedisFeatureStore(r, s.redis_prefix))  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        asyncio.run(rt.refresh(force=True))


FREEZE_HOOK = '''
import os, signal, sys

def _install():
    import stream.runtime as runtime
    original = runtime.mget_any
    flag = os.environ["FAULT_FREEZE_FLAG"]
    redis_pid = int(os.environ["FAULT_REDIS_PID"])

    async def mget_any(client, keys):
        f = sys._getframe(1)
        in_batch = False
        while f is not None:
            if f.f_code.co_name == "_attempt":
                in_batch = True
                break
            f = f.f_back
        if in_batch and os.path.exists(flag):
            os.unlink(flag)
            print("FAULT-PROBE freezing Redis during a batch's model reload", flush=True)
            os.kill(redis_pid, signal.SIGSTOP)
        return await original(client, keys)

    runtime.mget_any = mget_any

try:
    _install()
except Exception as exc:
    print(f"FAULT-PROBE not installed: {exc!r}", file=sys.stderr, flush=True)
'''


@pytest.fixture
def private_redis(tmp_path: Path):
    r = PrivateRedis(tmp_path / "redis")
    r.start()
    yield r
    if r.proc is not None and r.proc.poll() is None:
        r.proc.send_signal(signal.SIGCONT)
    r.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_redis_frozen_during_model_reload_loses_no_event(private_redis, make_deployment,
                                                         tmp_path: Path) -> None:
    from stream.runtime import registry_keys

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FREEZE_HOOK)
    flag = tmp_path / "freeze.flag"
    dep = make_deployment(
        SEGSTREAM_REDIS_URL=private_redis.url, SEGSTREAM_REDIS_TIMEOUT_S="2",
        PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        FAULT_FREEZE_FLAG=str(flag), FAULT_REDIS_PID=str(private_redis.proc.pid),
        # the hook finds the batch by its frame, which a compiled module does not make
        SEGSTREAM_NATIVE="0")
    inputs = fault_oracle.synthetic_input(EVENTS, seed=54)
    w = dep.start_worker(tmp_path)
    feed = fault_oracle.PacedProducer(dep, inputs, RATE)
    feed.start()
    fault_oracle.wait_applied(dep, EVENTS // 3)
    # What a learner promotion does: a model's serving version moves on; the worker reads
    # the new snapshot in its next batch (the hook freezes Redis right then).
    flag.write_text("1")
    r = redis_lib.Redis.from_url(private_redis.url)
    r.hincrby(registry_keys(dep.settings.redis_prefix)["models"], "churn", 1000)
    r.close()
    fault_oracle.eventually(lambda: not flag.exists(), 60, "the hook froze Redis")
    time.sleep(6)  # past SEGSTREAM_REDIS_TIMEOUT_S
    private_redis.proc.send_signal(signal.SIGCONT)
    feed.finish()
    dep.cli("wait", "--timeout", "600")
    assert w.poll() is None
    log = dep.logs[0].read_text(errors="replace")
    crashed = [ln for ln in log.splitlines() if "Crashed reason" in ln]
    print("agent crashes:", crashed)
    fault_oracle.judge(dep, inputs)  # fails: the crashed batch's events are missing
    assert crashed == [], crashed
