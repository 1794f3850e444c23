"""Redis over TLS with an ACL user limited to the deployment's key prefix.

The server listens on TLS only (its certificate signed by a throw-away CA), the
``default`` user is off, and the engine's user has ``~<prefix>* +@all -@dangerous``
(see ``tests/redis_servers.py``). A real worker runs through it; what it stores is
held to the batch computation, and what the user may not do is tried for real.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cdnow_oracle
import orjson
import pytest
import redis
import redis_servers
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from stream.errors import ServiceError, SettingsError
from stream.redisconn import check_redis
from stream.replay import cdnow_events, cdnow_path
from stream.settings import load_settings

pytestmark = [pytest.mark.integration]

PREFIX = f"sec-{uuid.uuid4().hex[:8]}:"
#: The first two weeks of CDNOW: a few thousand customers, enough to cross partitions.
UNTIL = "1997-01-15"


@pytest.fixture(scope="module")
def tls() -> Iterator[redis_servers.TlsRedis]:
    with redis_servers.tls_redis([PREFIX]) as server:
        yield server


def admin(tls: redis_servers.TlsRedis) -> redis.Redis:
    return redis.Redis(port=tls.port, ssl=True, ssl_ca_certs=str(tls.ca_file),
                       username=redis_servers.ADMIN_USER, password=redis_servers.ADMIN_PASSWORD)


def engine_user(tls: redis_servers.TlsRedis) -> redis.Redis:
    return redis.from_url(tls.url(), ssl_ca_certs=str(tls.ca_file))


def engine_env(tls: redis_servers.TlsRedis, url: str | None = None) -> dict[str, str]:
    return {"SEGSTREAM_REDIS_URL": url or tls.url(),
            "SEGSTREAM_REDIS_TLS_CA_FILE": str(tls.ca_file),
            "SEGSTREAM_REDIS_PREFIX": PREFIX}


@pytest.mark.slow
def test_a_worker_through_tls_and_the_acl_user_ends_as_the_batch_computation(
        tls, make_deployment, tmp_path: Path) -> None:
    dep = make_deployment(partitions=3, **engine_env(tls))
    worker = dep.start_worker(tmp_path)
    events = cdnow_events(cdnow_path(), UNTIL)
    dep.produce("transactions", [(e["customer_id"].encode(), orjson.dumps(e)) for e in events])
    dep.cli("wait", "--timeout", "600")
    assert worker.poll() is None, "the worker died"

    df = cdnow_oracle.load()
    df = df[df["date"] < UNTIL]
    assert len(df) == len(events) > 1000
    _, feats = dep.features()
    assert cdnow_oracle.mismatches(cdnow_oracle.expected_features(df), feats) == []

    # Behind the engine's back: every key it wrote carries its prefix, and the key
    # layout spans the partitions.
    a = admin(tls)
    try:
        keys = [k.decode() for k in a.scan_iter(match="*", count=1000)]
    finally:
        a.close()
    assert keys and all(k.startswith(PREFIX) for k in keys)
    assert {p for p in range(3) if any(k.startswith(f"{PREFIX}{{p{p}}}:c:") for k in keys)} \
        == {0, 1, 2}
    log = dep.logs[0].read_text()
    assert "NOPERM" not in log and "state store unavailable" not in log


def test_plaintext_to_the_tls_port_is_refused(tls) -> None:
    plain = redis.Redis(port=tls.port, socket_timeout=5, socket_connect_timeout=5)
    with pytest.raises(RedisConnectionError):
        plain.ping()
    plain.close()
    # The engine says which setting to fix.
    with pytest.raises(ServiceError, match=r"SEGSTREAM_REDIS_URL.*rediss://"):
        check_redis(load_settings(redis_url=tls.url().replace("rediss://", "redis://"),
                                  redis_prefix=PREFIX, redis_timeout_s=5))
    # TLS without the CA that signed the server certificate is refused as well.
    with pytest.raises(SettingsError, match="SEGSTREAM_REDIS_TLS_CA_FILE"):
        check_redis(load_settings(redis_url=tls.url(), redis_prefix=PREFIX))


def test_the_acl_user_cannot_leave_its_prefix_or_run_dangerous_commands(tls) -> None:
    a = admin(tls)
    a.set("other-app:secret", "s1")
    r = engine_user(tls)
    try:
        assert r.ping()
        r.set(f"{PREFIX}probe", "ok")
        assert r.get(f"{PREFIX}probe") == b"ok"
        with pytest.raises(NoPermissionError):
            r.get("other-app:secret")
        with pytest.raises(NoPermissionError):
            r.set("other-app:secret", "overwritten")
        with pytest.raises(NoPermissionError):
            r.set("other-app:new", "x")
        # A script is held to the same key rules, declared keys or not.
        with pytest.raises(NoPermissionError):
            r.eval("return redis.call('GET', KEYS[1])", 1, "other-app:secret")
        with pytest.raises(redis.exceptions.ResponseError, match="can't access"):
            r.eval("return redis.call('GET', 'other-app:secret')", 0)
        for command in (("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("CONFIG", "GET", "*"),
                        ("CONFIG", "SET", "appendonly", "no"), ("SAVE",), ("BGSAVE",),
                        ("INFO",), ("SHUTDOWN", "NOSAVE"), ("ACL", "LIST")):
            with pytest.raises(NoPermissionError):
                r.execute_command(*command)
        # What the engine does need is granted: SCAN sees only what the user may read,
        # scripts load and run on its own keys.
        sha = r.script_load("return redis.call('INCR', KEYS[1])")
        assert r.evalsha(sha, 1, f"{PREFIX}n") == 1
        assert r.unlink(f"{PREFIX}probe", f"{PREFIX}n") == 2
    finally:
        r.close()
    # Nothing changed behind the user's back; the server is still up.
    assert a.get("other-app:secret") == b"s1"
    assert a.exists("other-app:new") == 0
    a.delete("other-app:secret")
    a.close()


def test_a_wrong_password_stops_the_worker_at_start_naming_the_setting(
        tls, make_deployment) -> None:
    wrong = tls.url(password="not-the-password")
    dep = make_deployment(partitions=1, **engine_env(tls, wrong))
    proc = dep.cli("worker", check=False, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "SEGSTREAM_REDIS_URL" in out and "user name or password" in out, out[-2000:]
    assert "not-the-password" not in out  # the password is never echoed
    assert "Ready" not in out


def test_an_unknown_prefix_is_refused_at_start(tls) -> None:
    with pytest.raises(SettingsError, match="SEGSTREAM_REDIS_PREFIX"):
        check_redis(load_settings(redis_url=tls.url(), redis_tls_ca_file=tls.ca_file,
                                  redis_prefix="someone-else:"))


def test_openssl_sees_a_tls_only_server(tls) -> None:
    """The server's certificate chain verifies against the test CA (independent of redis-py)."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{tls.port}", "-CAfile",
         str(tls.ca_file), "-verify_return_error", "-brief"],
        input="", capture_output=True, text=True, timeout=30)
    assert "Verification: OK" in out.stderr + out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_a_password_rotated_under_a_running_worker_names_the_setting_and_loses_nothing(
        tls, make_deployment, tmp_path: Path) -> None:
    """The engine user's password changes while the worker runs: the worker keeps retrying,
    says which setting to fix, and once the password is back applies everything exactly."""
    prefix = f"{PREFIX}rot:"
    dep = make_deployment(partitions=3, **{**engine_env(tls), "SEGSTREAM_REDIS_PREFIX": prefix})
    worker = dep.start_worker(tmp_path)
    events = cdnow_events(cdnow_path(), UNTIL)
    half = len(events) // 2
    dep.produce("transactions", [(e["customer_id"].encode(), orjson.dumps(e))
                                 for e in events[:half]])
    dep.cli("wait", "--timeout", "600")

    a = admin(tls)
    user = redis_servers.ENGINE_USER
    try:
        a.execute_command("ACL", "SETUSER", user, "resetpass", ">rotated-elsewhere")
        a.execute_command("CLIENT", "KILL", "USER", user)
        dep.produce("transactions", [(e["customer_id"].encode(), orjson.dumps(e))
                                     for e in events[half:]])
        deadline = time.monotonic() + 120
        log = ""
        while time.monotonic() < deadline:
            log = dep.logs[0].read_text()
            if "state store unavailable" in log:
                break
            time.sleep(1)
        refused = [line for line in log.splitlines() if "state store unavailable" in line]
        assert refused, log[-3000:]
        assert all("SEGSTREAM_REDIS_URL" in line for line in refused), refused[:3]
        assert "rotated-elsewhere" not in log and redis_servers.ENGINE_PASSWORD not in log
        assert worker.poll() is None, "the worker died while Redis refused it"
    finally:
        a.execute_command("ACL", "SETUSER", user, "resetpass",
                          f">{redis_servers.ENGINE_PASSWORD}")
        a.close()
    dep.cli("wait", "--timeout", "600")
    assert worker.poll() is None, "the worker died"
    df = cdnow_oracle.load()
    df = df[df["date"] < UNTIL]
    _, feats = dep.features()
    assert cdnow_oracle.mismatches(cdnow_oracle.expected_features(df), feats) == []


def test_status_says_why_the_engine_cannot_use_redis(tls, make_deployment) -> None:
    """It said "down" for a refused password (the server was up) and "healthy" for a user
    that may not touch the deployment's keys; now it gives every command's reason."""
    for env, named in ((engine_env(tls, tls.url(password="not-the-password")),
                        "SEGSTREAM_REDIS_URL"),
                       ({**engine_env(tls), "SEGSTREAM_REDIS_PREFIX": "someone-else:"},
                        "SEGSTREAM_REDIS_PREFIX")):
        dep = make_deployment(partitions=1, **env)
        proc = dep.cli("status", "--json", check=False, timeout=120)
        assert proc.returncode == 1, proc.stderr
        doc = orjson.loads(proc.stdout)
        assert doc["redis"]["healthy"] is False and named in doc["redis"]["reason"], doc
        assert doc["kafka"]["healthy"] is True, doc
        assert "not-the-password" not in proc.stdout + proc.stderr
