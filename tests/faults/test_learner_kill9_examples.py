"""kill -9 of the learner process loses the examples it learned since its last checkpoint.

``LearnerService.run`` commits the examples topic's offsets after every fetch, but what it
learned from them is written to Redis only by a checkpoint (``CHECKPOINT_S`` = 30 s) or a
promotion (when idle for 3 s, or every ``SEGSTREAM_MODEL_PROMOTE_S``). A learner killed in
between is restarted by its worker from the older checkpoint, at the committed offset:
the examples in between are never learned. Without the kill the models learn every
distinct example on the topic (checked as a control).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import fault_oracle
import orjson
import pytest
import redis as redis_lib

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 12_000
RATE = 400.0


def _children(pid: int) -> list[int]:
    return [int(k) for t in Path(f"/proc/{pid}/task").iterdir()
            for k in (t / "children").read_text().split()]


def _learned_vs_topic(dep) -> dict[str, tuple[int, int]]:
    from scorers.online import OnlineModel
    from stream.learner import checkpoint_key
    from stream.runtime import model_key

    s = dep.settings
    ids: dict[str, set[str]] = {}
    for rec in dep.consume_all("segmentation-examples", timeout_s=30):
        d = orjson.loads(rec.value)
        ids.setdefault(d["model"], set()).add(d["example_id"])
    r = redis_lib.Redis.from_url(s.redis_url)
    try:
        out = {}
        for name, seen in ids.items():
            blob = r.get(checkpoint_key(s.redis_prefix, name)) or r.get(
                model_key(s.redis_prefix, name))
            out[name] = (OnlineModel.restore(blob).examples if blob else 0, len(seen))
        return out
    finally:
        r.close()


@pytest.mark.parametrize("kill", [True, False], ids=["kill9", "control"])
def test_learner_kill9_loses_no_example(make_deployment, tmp_path: Path, kill: bool) -> None:
    dep = make_deployment()
    inputs = fault_oracle.synthetic_input(EVENTS, seed=56)
    w = dep.start_worker(tmp_path)
    feed = fault_oracle.PacedProducer(dep, inputs, RATE)
    feed.start()
    first = fault_oracle.eventually(lambda: _children(w.pid), 60, "the learner runs")[0]
    fault_oracle.wait_applied(dep, EVENTS // 2)  # examples are flowing into the learner
    if kill:
        os.kill(first, signal.SIGKILL)
        fault_oracle.eventually(lambda: [k for k in _children(w.pid) if k != first], 60,
                                "the worker started a new learner")
    feed.finish()
    dep.cli("wait", "--timeout", "600")
    assert w.poll() is None
    fault_oracle.judge(dep, inputs)  # the customer state is exact either way
    learned = _learned_vs_topic(dep)
    print("learned vs distinct examples on the topic:", learned)
    assert learned and all(a == b for a, b in learned.values()), (
        f"examples never learned (model: learned, on the topic): {learned}")
