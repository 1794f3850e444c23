"""Model snapshots in Redis that cannot be read (corrupt, or of an unknown format): the
learner, the worker and ``segstream models`` go on with what they can read."""
from __future__ import annotations

import asyncio
import logging
import pickle
from typing import Any

import pytest

from scorers.labels import Example
from stream.learner import Learner, checkpoint_key
from stream.runtime import ScoringRuntime, model_key, registry_keys
from stream.settings import load_settings

GARBAGE = b"\x80\x04garbage"
UNKNOWN = pickle.dumps({"format": "segstream.online/99", "state": {}})


class _Redis:
    """The reads the learner, the runtime and models_doc make, from a dict."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    async def mget(self, keys: list[str]) -> list[Any]:
        return [self.data.get(k) for k in keys]

    async def get(self, key: str) -> Any:
        return self.data.get(key)

    async def hgetall(self, key: str) -> Any:
        return self.data.get(key, {})


def _trained(name: str) -> tuple[Learner, bytes]:
    s = load_settings()
    learner = Learner(s, None)  # type: ignore[arg-type]
    learner.learn([(i, Example(f"e{i}", name, "h", i, i, {"a": float(i % 7)}, i % 2).to_bytes())
                   for i in range(200)])
    return learner, learner.models[name].snapshot()


@pytest.mark.parametrize("bad", [GARBAGE, pickle.dumps({"no": "format"})])
def test_a_corrupt_checkpoint_falls_back_to_the_serving_snapshot(
        bad: bytes, caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings()
    _, good = _trained("churn")
    r = _Redis({checkpoint_key(s.redis_prefix, "churn"): bad,
                model_key(s.redis_prefix, "churn"): good,
                checkpoint_key(s.redis_prefix, "purchase_7d"): bad})
    learner = Learner(s, r)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        asyncio.run(learner.load())  # used to raise, and the learner retried it forever
    assert learner.models["churn"].examples == 200  # the serving snapshot's
    assert learner.models["purchase_7d"].examples == 0  # nothing readable: a fresh model
    assert checkpoint_key(s.redis_prefix, "churn") in caplog.text
    assert "serving snapshot" in caplog.text and "afresh" in caplog.text
    learner.learn([(0, Example("x", "purchase_7d", "h", 0, 0, {"a": 1.0}, 1).to_bytes())])
    assert learner.models["purchase_7d"].examples == 1  # learning goes on


def test_a_newer_releases_snapshot_is_not_overwritten_by_a_fresh_model() -> None:
    """A learner of an older release (a rollback) meets a format it does not read: it
    stops with a message naming the key instead of promoting a fresh model over it."""
    from stream.errors import SegstreamError

    s = load_settings()
    r = _Redis({checkpoint_key(s.redis_prefix, "churn"): GARBAGE,
                model_key(s.redis_prefix, "churn"): UNKNOWN})
    with pytest.raises(SegstreamError, match=r"segstream\.online/99.*delete the key"):
        asyncio.run(Learner(s, r).load())  # type: ignore[arg-type]


def test_the_worker_logs_an_unreadable_version_once_and_keeps_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings()
    _, good = _trained("churn")
    data: dict[str, Any] = {model_key(s.redis_prefix, "churn"): good}
    rt = ScoringRuntime(s, _Redis(data), None)  # type: ignore[arg-type]
    asyncio.run(rt._load_models({"churn": 1}))
    assert rt.versions == {"churn": 1}
    data[model_key(s.redis_prefix, "churn")] = GARBAGE
    with caplog.at_level(logging.ERROR):
        for _ in range(5):  # every models check
            asyncio.run(rt._load_models({"churn": 2}))
    assert rt.versions == {"churn": 1} and rt.models["churn"].examples == 200
    assert caplog.text.count("cannot be read") == 1
    data[model_key(s.redis_prefix, "churn")] = good
    asyncio.run(rt._load_models({"churn": 3}))
    assert rt.versions == {"churn": 3}


def test_models_shows_the_readable_models_beside_an_unreadable_one() -> None:
    from stream.queries import models_doc

    s = load_settings()
    _, good = _trained("churn")
    r = _Redis({registry_keys(s.redis_prefix)["models"]: {b"churn": b"2", b"purchase_7d": b"1",
                                                          b"cluster": b"v-garbage"},
                model_key(s.redis_prefix, "churn"): good,
                model_key(s.redis_prefix, "purchase_7d"): UNKNOWN})
    doc = asyncio.run(models_doc(s, r))  # type: ignore[arg-type]
    assert doc["models"]["churn"]["version"] == 2 and "auc" in doc["models"]["churn"]
    assert doc["models"]["purchase_7d"] == {"version": 1,
                                            "error": "snapshot unreadable (ValueError)"}
    assert "cluster" not in doc["models"]
