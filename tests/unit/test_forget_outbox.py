"""`segstream forget` drops every pending outbox record of the customer, also on a re-run."""
from __future__ import annotations

import asyncio

import orjson

from features.store import MemoryFeatureStore
from scorers.labels import Example, customer_hash
from stream.forget import forget
from stream.pipeline import encode_outbox
from stream.settings import load_settings


class NoLog:
    """The recent-migrations log holds nothing (that part has its own integration test)."""

    async def xrange(self, *args, **kwargs):
        return []

    async def set(self, key, value, **kwargs):  # the erase time kept for the trigger consumer
        self.erased = (key, value)
        return True


def _example(cid: str, n: int) -> bytes:
    return Example(f"ex-{cid}-{n}", "churn", customer_hash(cid), 1, 2, {"a": 1.0}, 0).to_bytes()


def test_a_rerun_drops_the_customers_migrations_dead_letters_and_examples() -> None:
    """The first run erased the state and failed before the outbox (a timeout, a kill):
    the state is gone, so the re-run finds no partition, and must search them all.
    Learner examples are keyed by nothing: they are the customer's by their pseudonym."""
    s = load_settings(partitions=3)
    store = MemoryFeatureStore()
    store.outboxes[2] = {
        "m:1": encode_outbox(s.migrations_topic, b"c7", orjson.dumps({"customer_id": "c7"})),
        "dlq:transactions:5": encode_outbox(s.dlq_topic, b"c7", b"{}"),
        "x:a": encode_outbox(s.examples_topic, None, _example("c7", 1)),
        "x:b": encode_outbox(s.examples_topic, None, _example("c8", 1)),
        "m:2": encode_outbox(s.migrations_topic, b"c8", orjson.dumps({"customer_id": "c8"})),
    }
    store.outboxes[0] = {"x:c": encode_outbox(s.examples_topic, None, _example("c7", 2))}
    out = asyncio.run(forget(s, NoLog(), store, "c7"))  # type: ignore[arg-type]
    assert out["found"] is False
    assert out["outbox_records"] == 4
    assert set(store.outboxes[2]) == {"x:b", "m:2"}
    assert not store.outboxes.get(0)
