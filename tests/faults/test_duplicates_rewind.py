"""10 % of the events produced twice, and the consumer group rewound twice.

The input holds every event once and a tenth of them again, a little later in the
stream (same ``event_id``, same content, as a retrying producer would send them). The
worker is stopped once it has applied the first half of the stream (the second half is
produced afterwards), the group's committed offsets of every input partition are moved
back by ``REWIND`` records, and a new worker starts from there; after the whole input is
processed the same is done again. Redelivered records are at or below the Redis watermark
and must be skipped; duplicate ``event_id`` must count once. The end state is exact, and
the second rewind adds no migration id.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import fault_oracle
import orjson
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 30_000
DUPLICATE_SHARE = 0.10
REWIND = 3_000  # records per input partition


def with_duplicates(inputs: list[Any], share: float, rng: random.Random) -> list[Any]:
    """Every event, plus ``share`` of them sent again 1 to 500 records later."""
    later: dict[int, list[Any]] = {}
    for i, rec in enumerate(inputs):
        if rng.random() < share:
            later.setdefault(i + rng.randint(1, 500), []).append(rec)
    out = []
    for i, rec in enumerate(inputs):
        out.append(rec)
        out.extend(later.pop(i, []))
    for recs in later.values():
        out.extend(recs)
    return out


def rewind(dep: Any, n: int) -> dict[tuple[str, int], tuple[int, int]]:
    """Move the group's committed offset of every input partition back by ``n``."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from stream.kafka import client_config

    s = dep.settings
    c = KafkaConsumer(**client_config(s), group_id=s.app_id, enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t in s.input_topics
               for p in sorted(c.partitions_for_topic(t) or ())]
        moved = {}
        for tp in tps:
            old = c.committed(tp)
            assert old is not None, f"nothing committed for {tp}"
            moved[(tp.topic, tp.partition)] = (old, max(0, old - n))
        c.commit({TopicPartition(t, p): OffsetAndMetadata(new, "", -1)
                  for (t, p), (_, new) in moved.items()})
        for tp in tps:
            assert c.committed(tp) == moved[(tp.topic, tp.partition)][1], tp
        return moved
    finally:
        c.close()


def migration_ids(dep: Any) -> tuple[int, set[str]]:
    recs = dep.consume_all("segment-migrations", timeout_s=120)
    return len(recs), {orjson.loads(r.value)["migration_id"] for r in recs}


def test_duplicates_and_rewound_group_count_once(deployment, tmp_path: Path) -> None:
    rng = random.Random(51)
    inputs = fault_oracle.synthetic_input(EVENTS, seed=51)
    sent = with_duplicates(inputs, DUPLICATE_SHARE, rng)
    dupes = len(sent) - len(inputs)
    assert 0.09 * EVENTS < dupes < 0.11 * EVENTS, dupes
    # Rewind in the middle of the stream: the second half is produced only after the
    # rewind, so the stop falls mid-stream however fast the worker is.
    half = len(sent) // 2
    fault_oracle.produce(deployment, sent[:half])
    t0 = time.monotonic()
    w = deployment.start_worker(tmp_path)
    fault_oracle.wait_applied(deployment, half)
    deployment.kill(w, signal.SIGTERM)
    at_stop = fault_oracle.applied(deployment)
    moved = rewind(deployment, REWIND)
    assert at_stop == half, (at_stop, half)
    assert all(new < old for old, new in moved.values() if old > 0), moved
    print(f"stopped at {at_stop} of {len(sent)}; rewound {moved}")
    fault_oracle.produce(deployment, sent[half:])
    deployment.start_worker(tmp_path)
    deployment.cli("wait", "--timeout", "600")
    print(f"caught up after {time.monotonic() - t0:.0f}s")
    first = fault_oracle.judge(deployment, inputs)
    count, ids = migration_ids(deployment)

    # Rewind again after everything was processed: nothing may change.
    before_now, before = deployment.states()
    deployment.stop_all()
    moved = rewind(deployment, REWIND)
    print(f"rewound again: {moved}")
    w = deployment.start_worker(tmp_path)
    deployment.cli("wait", "--timeout", "600")
    assert w.poll() is None
    after_now, after = deployment.states()
    assert after_now == before_now and after == before, "redelivered records changed state"
    again, ids_again = migration_ids(deployment)
    assert ids_again == ids, f"{len(ids_again - ids)} new migration ids after the rewind"
    second = fault_oracle.judge(deployment, inputs)
    print({"produced": len(sent), "duplicates": dupes, "migration_records": (count, again),
           **first, "second": second})
