"""``segstream reset --yes`` deletes its deployment's keys and only those: a deployment
whose Redis prefix starts with this one's (``t-x:`` and ``t-x:eu:``) keeps its keys."""
from __future__ import annotations

import signal
from typing import Any

import pytest
import redis

from features.store import Keys
from stream.runtime import model_key, registry_keys

pytestmark = pytest.mark.integration


def _engine_keys(prefix: str) -> list[str]:
    """One key of each family the engine writes, named as the engine names them."""
    k = Keys(prefix)
    reg = registry_keys(prefix)
    return [k.meta(0), k.outbox(1), k.customer(2, "c1"), k.profile(2, "c1"), k.ids(0),
            k.table(0, "rfm"), k.now(), k.context(), reg["models"], reg["model_seq"],
            reg["clv"], reg["clv_version"], reg["rules"], reg["learner"],
            model_key(prefix, "churn"), f"{prefix}model:churn:checkpoint",
            f"{prefix}kept_lateness_ms", f"{prefix}triggers:seen:m1", f"{prefix}migrations:log"]


def test_reset_keeps_the_keys_of_a_deployment_whose_prefix_starts_with_its_own(
        make_deployment: Any) -> None:
    a = make_deployment()
    pa = a.settings.redis_prefix
    b = make_deployment(SEGSTREAM_REDIS_PREFIX=f"{pa}eu:")
    pb = b.settings.redis_prefix
    r = redis.from_url(a.settings.redis_url)
    try:
        for key in _engine_keys(pa) + _engine_keys(pb):
            r.set(key, b"x")
        a.cli("reset", "--yes", timeout=120)
        left = sorted(k.decode() for k in r.scan_iter(match=f"{pa}*"))
        assert left == sorted(_engine_keys(pb)), left
        b.cli("reset", "--yes", timeout=120)
        assert list(r.scan_iter(match=f"{pa}*")) == []
    finally:
        for k in r.scan_iter(match=f"{pa}*"):
            r.delete(k)
        r.close()


def test_reset_deletes_the_workers_learners_and_triggers_consumer_groups(
        make_deployment: Any) -> None:
    from kafka.structs import OffsetAndMetadata, TopicPartition

    from stream.kafka import admin, consumer, ensure_topics

    d = make_deployment()
    s = d.settings
    ensure_topics(s)
    groups = [s.app_id, f"{s.app_id}-learner", f"{s.app_id}-triggers"]
    topic = s.migrations_topic
    for g in groups:  # a committed offset makes the group exist, as a consumer's would
        c = consumer(s, group_id=g, enable_auto_commit=False)
        try:
            c.commit({TopicPartition(topic, 0): OffsetAndMetadata(0, "", -1)})
        finally:
            c.close()

    def present() -> set[str]:
        a = admin(s)
        try:
            return {g["group_id"] for g in a.list_groups()} & set(groups)
        finally:
            a.close()

    assert present() == set(groups)
    out = d.cli("reset", "--yes", timeout=120)
    assert present() == set(), out


def test_reset_with_redis_unreachable_deletes_nothing_and_names_the_setting(
        make_deployment: Any) -> None:
    """Topics deleted while Redis kept the partitions' watermarks made the recreated topics'
    records (from offset 0 again) look processed: reset checks both services first."""
    from stream.kafka import admin, ensure_topics

    d = make_deployment()
    s = d.settings
    ensure_topics(s)
    good, d.env["SEGSTREAM_REDIS_URL"] = d.env["SEGSTREAM_REDIS_URL"], "redis://127.0.0.1:1/0"
    try:
        proc = d.cli("reset", "--yes", check=False, timeout=120)
    finally:
        d.env["SEGSTREAM_REDIS_URL"] = good
    assert proc.returncode == 2, proc
    assert "SEGSTREAM_REDIS_URL" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    a = admin(s)
    try:
        assert set(s.input_topics) <= set(a.list_topics())
    finally:
        a.close()


def test_forget_with_the_wrong_partition_count_refuses_and_erases_nothing(
        make_deployment: Any) -> None:
    """forget looks for the customer in the partition SEGSTREAM_PARTITIONS gives: with the
    wrong count it found nothing, exited 0 and published a tombstone for a customer still
    stored. It now refuses, naming the setting."""
    from stream.kafka import ensure_topics

    d = make_deployment(partitions=3)
    s = d.settings
    ensure_topics(s)
    r = redis.from_url(s.redis_url)
    try:
        before = sorted(r.scan_iter(match=f"{s.redis_prefix}*"))
        d.env["SEGSTREAM_PARTITIONS"] = "2"
        try:
            proc = d.cli("forget", "c1", check=False, timeout=120)
        finally:
            d.env["SEGSTREAM_PARTITIONS"] = "3"
        assert proc.returncode == 2, proc
        assert "SEGSTREAM_PARTITIONS" in proc.stderr, proc.stderr
        assert sorted(r.scan_iter(match=f"{s.redis_prefix}*")) == before
        assert d.consume_all("segment-migrations", timeout_s=3) == []
    finally:
        r.close()


def test_reset_under_a_running_worker_refuses_and_deletes_nothing(
        make_deployment: Any, tmp_path: Any) -> None:
    """Reset under a running worker deleted its topics and keys anyway (only its consumer
    group was kept): the worker then went on against an empty store and recreated the
    topics it publishes to. It now refuses, naming the group, until the worker stops."""
    import fault_oracle

    from stream.kafka import admin

    d = make_deployment()
    s = d.settings
    inputs = fault_oracle.synthetic_input(600, seed=3)
    fault_oracle.produce(d, inputs)
    w = d.start_worker(tmp_path)
    fault_oracle.wait_applied(d, len(inputs))
    r = redis.from_url(s.redis_url)
    try:
        before = sorted(r.scan_iter(match=f"{s.redis_prefix}*"))
        assert before
        proc = d.cli("reset", "--yes", check=False, timeout=120)
        assert proc.returncode == 1, proc
        assert s.app_id in proc.stderr and "nothing was deleted" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        # every key is still there (the running worker may have written more meanwhile)
        assert set(before) <= set(r.scan_iter(match=f"{s.redis_prefix}*"))
        a = admin(s)
        try:
            assert set(s.input_topics) <= set(a.list_topics())
        finally:
            a.close()
        assert w.poll() is None, "the worker stopped"
        d.kill(w, signal.SIGTERM)  # a clean stop: the worker and its learner leave
        # Once the group has no member left (the broker drops a member that left at once).
        fault_oracle.eventually(
            lambda: d.cli("reset", "--yes", check=False, timeout=120).returncode == 0, 90,
            "reset once the worker stopped")
        assert list(r.scan_iter(match=f"{s.redis_prefix}*")) == []
    finally:
        r.close()
