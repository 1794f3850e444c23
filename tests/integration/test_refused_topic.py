"""One output topic refusing its records does not repeat what the others took.

The dead-letter topic's ``max.message.bytes`` is set below a dead letter's size once the
worker runs (at start it refuses such a topic, naming it), so the
broker refuses every dead letter while it accepts the migrations of the same outbox
flush. Before, the whole flush counted as failed and was sent again every flush interval:
each migration of it reached the topic about ten times in 40 s. Now the migrations go out
once each, the dead letters wait in the outbox, and once the topic accepts them again
they go out once each too; every feature and migration chain is exact. While the topic
refuses them, the worker's ``/readyz`` turns 503 (Kafka answering all along), and 200 once
they went out.
"""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path

import fault_oracle
import orjson
import pytest
from fault_oracle import eventually
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from stream.backend import PUBLISHES_FAILING_S

pytestmark = pytest.mark.integration

EVENTS = 1_500
BAD = 4


def _max_message_bytes(dep, value: str, topic: str = "segmentation-dlq") -> None:
    from stream.kafka import client_config

    s = dep.settings
    admin = KafkaAdminClient(**client_config(s))
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, s.topic(topic),
                                            configs={"max.message.bytes": value})])
    finally:
        admin.close()


def _produce(dep, records: list[tuple[str, bytes, bytes]]) -> None:
    """Without the topic checks of ``fault_oracle.produce``, which refuse the small topic."""
    from stream.kafka import producer

    s = dep.settings
    p = producer(s)
    try:
        for topic, key, value in records:
            p.send(s.topic(topic), key=key, value=value)
        p.flush()
    finally:
        p.close()


def _migration_ids(dep) -> collections.Counter[str]:
    return collections.Counter(orjson.loads(r.value)["migration_id"]
                               for r in dep.consume_all("segment-migrations"))


def test_a_topic_refusing_its_records_does_not_repeat_the_migrations(make_deployment,
                                                                      tmp_path: Path) -> None:
    from stream.kafka import ensure_topics

    dep = make_deployment()
    ensure_topics(dep.settings)
    w = dep.start_worker(tmp_path)
    base = dep.web_url(w)
    # After the worker's start-up check, which refuses a topic this small by name.
    _max_message_bytes(dep, "200")
    inputs = fault_oracle.synthetic_input(EVENTS, seed=47)
    _produce(dep, [(t, str(d["customer_id"]).encode(), orjson.dumps(d)) for t, d in inputs]
             + [("transactions", b"c-bad", b"not json %d " % i + b"x" * 300)
                for i in range(BAD)])
    fault_oracle.wait_applied(dep, EVENTS)
    assert fault_oracle.readyz(base)[0] == 200, "a refusal of seconds is retried, not reported"
    # Every outbox flush is refused by the dead-letter topic, Kafka answering all along:
    # the worker says it is not ready once that has lasted PUBLISHES_FAILING_S.
    t0 = time.monotonic()
    _, checks = eventually(
        lambda: (lambda r: r if r[0] == 503 else None)(fault_oracle.readyz(base)),
        PUBLISHES_FAILING_S + 60, "/readyz 503 while a topic refuses")
    print(f"not ready {time.monotonic() - t0:.0f}s after the input was applied: {checks}")
    assert checks["kafka"] is True and checks["redis"] is True
    assert checks["publishes_failing_s"] >= PUBLISHES_FAILING_S
    assert "commits_failing_s" not in checks
    ids = _migration_ids(dep)
    assert ids, "no migration was published"
    repeated = {k: n for k, n in ids.items() if n > 1}
    assert not repeated, f"{len(repeated)} of {len(ids)} migrations published again"
    assert fault_oracle.dead_letters(dep, timeout_s=5) == []
    log = dep.logs[0].read_text(errors="replace")
    # "publishing 4 of N outbox records failed" when the flush also held migrations Kafka
    # took, "publishing 4 outbox records failed" when it held only the dead letters
    assert re.search(rf"publishing {BAD} (of \d+ )?outbox records failed", log), \
        "the refused dead letters were not reported"

    _max_message_bytes(dep, "1048588")
    dead = eventually(lambda: (lambda d: d if len(d) >= BAD else None)(
        fault_oracle.dead_letters(dep, timeout_s=5)), 60, "the dead letters published")
    assert len(dead) == BAD, f"{len(dead)} dead letters for {BAD} bad records"
    dep.cli("wait", "--timeout", "300")
    after = _migration_ids(dep)
    assert after == ids, "migrations published again once the dead letters went out"
    assert eventually(lambda: fault_oracle.readyz(base)[0] == 200, 30, "ready again")
    print(fault_oracle.judge(dep, inputs, allow_dead=True))


def test_a_topic_whose_limit_drops_below_a_batch_gets_smaller_batches(make_deployment,
                                                                      tmp_path: Path) -> None:
    """The migrations topic's max.message.bytes lowered under the worker below a batch but
    above each record: every flush was refused for good, and no migration went out. The
    worker now makes that topic's batches smaller until they pass, in the same publish."""
    from stream.kafka import ensure_topics

    dep = make_deployment()
    ensure_topics(dep.settings)
    dep.start_worker(tmp_path)
    _max_message_bytes(dep, "4000", "segment-migrations")  # a few records, not a batch
    inputs = fault_oracle.synthetic_input(EVENTS, seed=53)
    _produce(dep, [(t, str(d["customer_id"]).encode(), orjson.dumps(d)) for t, d in inputs])
    fault_oracle.wait_applied(dep, EVENTS)
    dep.cli("wait", "--timeout", "300")  # returns once every outbox is published
    ids = _migration_ids(dep)
    assert ids and max(ids.values()) == 1, "a migration was published twice"
    log = dep.logs[0].read_text(errors="replace")
    assert "refused a batch" in log and "max.message.bytes" in log
    # The batches halve within the publish that met the refusal: no flush failed (each
    # failed flush used to halve them once, five seconds apart).
    assert "outbox records failed" not in log
    print(fault_oracle.judge(dep, inputs))
