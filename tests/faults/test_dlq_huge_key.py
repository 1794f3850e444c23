"""A rejected record with a huge Kafka key: dead-lettered, and its partition's outbox keeps
flowing.

The input topics accept records up to the broker's size limit, keys included, and the
engine rejects one whose key is not its ``customer_id``. Its dead letter used to carry the
whole key as its own Kafka key: with a key over the producer's request limit (1 MB) no
publish of that partition's outbox could succeed, so that dead letter and every migration
and dead letter committed after it stayed in Redis, retried every few seconds, and
``segstream wait`` never returned.
"""

from __future__ import annotations

from pathlib import Path

import fault_oracle
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 1_500
KEY_BYTES = 1_100_000


def test_a_record_with_a_huge_key_reaches_the_dlq_and_blocks_nothing(
        make_deployment, tmp_path: Path) -> None:
    from kafka import KafkaProducer

    from stream.kafka import client_config

    dep = make_deployment(partitions=1)
    s = dep.settings
    inputs = fault_oracle.synthetic_input(EVENTS, seed=3)
    fault_oracle.produce(dep, inputs[:700])
    p = KafkaProducer(**client_config(s), acks="all", max_request_size=4_000_000)
    try:
        p.send(s.topic("clickstream"), key=b"k" * KEY_BYTES, value=b"not json").get(60)
    finally:
        p.close()
    fault_oracle.produce(dep, inputs[700:])
    w = dep.start_worker(tmp_path)
    dep.cli("wait", "--timeout", "180", timeout=240)
    assert w.poll() is None, "the worker exited"
    dlq = fault_oracle.dead_letters(dep)
    assert [d["reason"] for d in dlq] == ["not_json"], dlq
    clicks_before = sum(1 for t, _ in inputs[:700] if t == "clickstream")
    assert dlq[0]["key"] == "k" * 512 and dlq[0]["offset"] == clicks_before
    fault_oracle.judge(dep, inputs, allow_dead=True)
