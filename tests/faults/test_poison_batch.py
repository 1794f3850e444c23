"""A customer whose scoring always raises: dead-lettered, and the partition keeps going.

The worker runs with a test-only hook (``tests/fault_probe.py``) that makes the scoring
step (``stream.pipeline.evaluate``, what ``BatchProcessor.score`` calls) raise whenever
one chosen customer is among its inputs. Every event of that customer must land in
``segmentation-dlq`` with reason ``processing_error`` and its original payload; every
other event, on that partition too, must be applied exactly; the worker keeps running.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import fault_oracle
import fault_probe
import orjson
import pytest

from stream.schemas import DlqRecord

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 20_000


def test_poison_customer_is_dead_lettered_and_its_partition_keeps_going(
        deployment, tmp_path: Path) -> None:
    inputs = fault_oracle.synthetic_input(EVENTS, seed=61)
    counts = Counter(d["customer_id"] for _, d in inputs)
    kinds = {d["customer_id"] for t, d in inputs if t == "transactions"}
    # A busy customer with purchases, whose events are spread over the whole stream.
    poison = max((c for c in counts if c in kinds), key=lambda c: (counts[c], c))
    positions = [i for i, (_, d) in enumerate(inputs) if d["customer_id"] == poison]
    assert counts[poison] >= 10 and positions[-1] - positions[0] > EVENTS // 2, counts[poison]
    hooks = fault_probe.install(tmp_path / "hooks", FAULT_POISON_CUSTOMER=poison)

    fault_oracle.produce(deployment, inputs)
    t0 = time.monotonic()
    w = fault_probe.start_worker(deployment, tmp_path, **hooks)
    deployment.cli("wait", "--timeout", "600")
    print(f"caught up after {time.monotonic() - t0:.0f}s")
    assert w.poll() is None, "the worker exited"
    raised = fault_probe.lines(deployment.logs[0], f"FAULT-PROBE poison raised for {poison}")
    assert raised, "the fault was never injected"

    dlq = fault_oracle.dead_letters(deployment)
    for d in dlq:
        DlqRecord.model_validate(d)
    assert {d["reason"] for d in dlq} == {"processing_error"}, Counter(d["reason"] for d in dlq)
    dead = Counter(orjson.loads(d["payload"])["event_id"] for d in dlq)
    want = {d["event_id"] for _, d in inputs if d["customer_id"] == poison}
    assert set(dead) == want, (len(dead), len(want))
    # Dead letters are published at least once: a copy may repeat, none may be missing.
    assert all(d["key"] == poison for d in dlq)

    rest = [(t, d) for t, d in inputs if d["customer_id"] != poison]
    summary = fault_oracle.judge(deployment, rest, allow_dead=True,
                                 newest=max(int(d["ts"]) for _, d in inputs))
    _, states = deployment.states()
    assert poison not in states
    print({"poison": poison, "poison_events": len(want), "dead_letter_records": len(dlq),
           **summary})
