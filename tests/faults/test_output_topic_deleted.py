"""The dead-letter topic deleted under a running worker while malformed input arrives.

The worker publishes a batch's outbox (migrations, examples, dead letters) in the
background and waits for that publish before the next commit. With the dead-letter topic
gone, the producer waited for its metadata for Faust's producer request timeout (20
minutes) before failing, and then the next flush did the same: every valid event of every
partition waited behind it. The worker now gives up queueing a record after a short
while, recreates the engine's missing topics, and publishes the kept outbox on the next
flush: valid events are processed as before and every dead letter arrives.
"""

from __future__ import annotations

import time
from pathlib import Path

import fault_oracle
import orjson
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 3_000
BAD = 5


def test_deleted_dlq_topic_is_recreated_and_stalls_nothing(
        make_deployment, tmp_path: Path) -> None:
    from kafka import KafkaAdminClient, KafkaProducer

    from stream.kafka import client_config

    dep = make_deployment(partitions=2)
    s = dep.settings
    inputs = fault_oracle.synthetic_input(EVENTS, seed=5)
    fault_oracle.produce(dep, inputs[:1000])
    w = dep.start_worker(tmp_path)
    fault_oracle.wait_applied(dep, 1000)
    admin = KafkaAdminClient(**client_config(s))
    try:
        admin.delete_topics([s.dlq_topic])
        fault_oracle.eventually(lambda: s.dlq_topic not in admin.list_topics(), 60,
                                "the dead-letter topic deleted")
    finally:
        admin.close()
    # Produced without ensure_topics (which would recreate the topic for the worker).
    p = KafkaProducer(**client_config(s), acks="all")
    try:
        for i in range(BAD):
            p.send(s.topic("clickstream"), key=b"c-bad", value=b"not json %d" % i)
        for topic, doc in inputs[1000:]:
            p.send(s.topic(topic), key=str(doc["customer_id"]).encode(),
                   value=orjson.dumps(doc))
        p.flush()
    finally:
        p.close()
    t0 = time.monotonic()
    dep.cli("wait", "--timeout", "240", timeout=300)
    print(f"caught up {time.monotonic() - t0:.0f}s after the topic was deleted")
    assert w.poll() is None, "the worker exited"
    dlq = fault_oracle.dead_letters(dep)
    assert {d["payload"] for d in dlq} == {f"not json {i}" for i in range(BAD)}, dlq
    fault_oracle.judge(dep, inputs, allow_dead=True)
