"""A replay worked off at full speed: every migration carries its customer's features as of
its own ``at``, recomputed in pandas from the input events up to that time.

The whole input is in Kafka before the worker starts, so every partition of both topics
is behind and Kafka hands them out at its own pace. Without the inbox's alignment on
event time (``SEGSTREAM_ALIGN_WAIT_S=0``) a batch evaluates customers at an engine time
ahead of their own events still unread, and some migrations carry stale windows and
recency.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from fault_oracle import produce, synthetic_input, to_event, wait_applied
from feature_oracle import assert_features_equal, oracle

from features.state import FEATURE_NAMES

pytestmark = pytest.mark.integration


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def test_catch_up_migrations_carry_the_features_of_their_own_moment(
        make_deployment, tmp_path: Path) -> None:
    # Small batches: most of what waits is more than one batch, so the oldest events
    # must go first, not only those below the partitions behind.
    dep = make_deployment(partitions=3, SEGSTREAM_BATCH_MAX="250")
    inputs = synthetic_input(12_000, seed=23, customers=1_200)
    produce(dep, inputs)
    dep.start_worker(tmp_path)
    wait_applied(dep, len(inputs))
    migrations = [orjson.loads(r.value)
                  for r in dep.consume_all("segment-migrations", timeout_s=120)
                  if r.value is not None]
    assert len(migrations) > 1_000

    events = defaultdict(list)
    for topic, doc in inputs:
        ev = to_event(topic, doc)
        events[ev.customer_id].append(ev)
    bad = []
    checked = compared = 0
    by_moment: dict[tuple[str, int], dict] = {}
    for m in migrations:
        if m["features"] is None:
            continue
        at = _ms(m["at"])
        key = (m["customer_id"], at)
        if key not in by_moment:
            cid = m["customer_id"]
            by_moment[key] = oracle([e for e in events[cid] if e.ts_ms <= at], at,
                                    customers=(cid,))[cid]
        checked += 1
        try:
            # A migration carries the features its scheme's rules read: those are
            # compared, the rest taken from the oracle.
            want = by_moment[key]
            got = {name: m["features"].get(name, want[name]) for name in FEATURE_NAMES}
            compared += len(set(m["features"]) & set(FEATURE_NAMES))
            assert_features_equal(got, want,
                                  f"{m['customer_id']} {m['scheme']} at {m['at']}")
        except AssertionError as exc:
            bad.append(str(exc).replace("\n", "; "))
    assert checked > 1_000 and compared > 2 * checked
    assert not bad, f"{len(bad)} of {checked} migrations carry other features:\n" + "\n".join(
        bad[:10])
