"""`segstream up` reuses running services; `status` reports them healthy."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_up_twice_reuses_and_status_is_healthy(deployment) -> None:
    first = json.loads(deployment.cli("up", "--json").stdout)
    second = json.loads(deployment.cli("up", "--json").stdout)
    assert second["kafka"]["action"] == "reused"
    assert second["redis"]["action"] == "reused"
    assert first["kafka"]["bootstrap"] == deployment.env["SEGSTREAM_KAFKA_BOOTSTRAP"]
    status = json.loads(deployment.cli("status", "--json").stdout)
    assert status["kafka"] == {"bootstrap": deployment.env["SEGSTREAM_KAFKA_BOOTSTRAP"],
                               "healthy": True}
    assert status["redis"]["healthy"] is True
    assert status["api"].startswith("http://")


def test_status_reports_an_unreachable_broker(deployment) -> None:
    env = dict(deployment.env, SEGSTREAM_KAFKA_BOOTSTRAP="127.0.0.1:1")
    deployment.env, saved = env, deployment.env
    try:
        res = deployment.cli("status", "--json", check=False)
    finally:
        deployment.env = saved
    assert res.returncode == 1
    assert json.loads(res.stdout)["kafka"]["healthy"] is False


def test_a_wrong_setting_fails_at_start_naming_it(deployment) -> None:
    env = dict(deployment.env, SEGSTREAM_PARTITIONS="lots")
    deployment.env, saved = env, deployment.env
    try:
        res = deployment.cli("worker", check=False, timeout=60)
    finally:
        deployment.env = saved
    assert res.returncode != 0
    assert "SEGSTREAM_PARTITIONS" in res.stderr


def test_a_batch_size_the_output_topics_refuse_fails_at_start(deployment) -> None:
    """A record batch larger than an output topic's max.message.bytes would be refused
    forever (the outbox retrying it): the worker refuses to start, naming the setting."""
    from kafka.admin import NewTopic

    from stream.errors import ServiceError
    from stream.kafka import admin, ensure_topics, message_limits

    s = deployment.settings
    a = admin(s)
    try:
        a.create_topics([NewTopic(s.migrations_topic, s.partitions, 1,
                                  topic_configs={"max.message.bytes": "100000"})])
        assert message_limits(a, [s.migrations_topic]) == {s.migrations_topic: 100_000}
    finally:
        a.close()
    res = deployment.cli("worker", check=False, timeout=120)
    assert res.returncode != 0
    assert "SEGSTREAM_KAFKA_PRODUCE_BATCH_BYTES" in res.stderr
    assert s.migrations_topic in res.stderr and "100000" in res.stderr
    with pytest.raises(ServiceError, match="SEGSTREAM_KAFKA_PRODUCE_BATCH_BYTES is 100001"):
        ensure_topics(s.model_copy(update={"kafka_produce_batch_bytes": 100_001}))
    ensure_topics(s.model_copy(update={"kafka_produce_batch_bytes": 100_000}))  # fits
