"""``segstream reset --yes`` deletes its deployment's keys and only those: a deployment
whose Redis prefix starts with this one's (``t-x:`` and ``t-x:eu:``) keeps its keys."""
from __future__ import annotations

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
