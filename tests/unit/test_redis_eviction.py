"""A worker refuses a Redis whose maxmemory-policy evicts keys the engine never set to expire."""
from __future__ import annotations

import logging
from typing import Any

import pytest
from redis.exceptions import NoPermissionError

from stream import redisconn
from stream.errors import SettingsError
from stream.settings import load_settings


class _Client:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def config_get(self, _name: str) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def close(self) -> None:
        pass


def _with(monkeypatch: pytest.MonkeyPatch, answer: Any) -> None:
    monkeypatch.setattr(redisconn, "redis_sync_client", lambda _s: _Client(answer))


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
def test_an_evicting_policy_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                 policy: str) -> None:
    _with(monkeypatch, {"maxmemory-policy": policy})
    with pytest.raises(SettingsError, match=f"maxmemory-policy {policy}.*noeviction"):
        redisconn.check_eviction(load_settings())


def test_a_cluster_node_that_evicts_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every node is asked (redis-py asks one node unless told otherwise)."""
    asked: list[Any] = []

    class _Cluster(_Client):
        ALL_NODES = "all"

        def config_get(self, _name: str, target_nodes: Any = None) -> Any:
            asked.append(target_nodes)
            return self.answer if target_nodes == "all" else {"maxmemory-policy": "noeviction"}

    monkeypatch.setattr(redisconn, "redis_sync_client", lambda _s: _Cluster(
        {"10.0.0.1:6379": {b"maxmemory-policy": b"noeviction"},
         "10.0.0.2:6379": {b"maxmemory-policy": b"allkeys-lru"}}))
    with pytest.raises(SettingsError, match="allkeys-lru") as refused:
        redisconn.check_eviction(load_settings(redis_cluster=True))
    assert asked == ["all"]
    # The node to fix is named, not the one the URL points at.
    assert "node 10.0.0.2:6379 that" in str(refused.value)
    assert "10.0.0.1:6379" not in str(refused.value)


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru", "volatile-ttl"])
def test_policies_that_keep_the_engines_state_pass(monkeypatch: pytest.MonkeyPatch,
                                                  policy: str) -> None:
    _with(monkeypatch, {"maxmemory-policy": policy})
    redisconn.check_eviction(load_settings())


def test_a_server_that_hides_its_configuration_gets_a_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _with(monkeypatch, NoPermissionError("this user has no permissions to run 'config'"))
    with caplog.at_level(logging.WARNING):
        redisconn.check_eviction(load_settings())
    assert "maxmemory-policy" in caplog.text and "noeviction" in caplog.text


@pytest.mark.parametrize("answer", [{}, {"maxmemory-policy": "volatile-lru"}])
def test_no_answer_or_a_volatile_policy_gets_a_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, answer: Any) -> None:
    _with(monkeypatch, answer)
    with caplog.at_level(logging.WARNING):
        redisconn.check_eviction(load_settings())
    assert "noeviction" in caplog.text


@pytest.mark.parametrize("said", [
    "Error 1 connecting to 10.0.0.5:6380. [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 "
    "alert certificate required (_ssl.c:2580).",
    "Error 8 connecting to 10.0.0.5:6380. EOF occurred in violation of protocol (_ssl.c:992).",
])
def test_a_server_that_wants_a_client_certificate_names_those_settings(
        monkeypatch: pytest.MonkeyPatch, said: str) -> None:
    """It used to name the CA file and the host name, which were right."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    class _Refusing(_Client):
        def ping(self) -> Any:
            raise RedisConnectionError(said)

    monkeypatch.setattr(redisconn, "redis_sync_client", lambda _s: _Refusing(None))
    with pytest.raises(SettingsError, match="SEGSTREAM_REDIS_TLS_CERT_FILE"):
        redisconn.check_redis(load_settings(redis_url="rediss://10.0.0.5:6380/0"))
