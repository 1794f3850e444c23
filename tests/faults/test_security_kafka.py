"""The engine on a broker that only speaks SASL_SSL (SCRAM-SHA-512), and the API token.

A private broker (``tests/secure_kafka.py``) with its own CA and SCRAM users; Redis is the
shared test server. The worker, the replay and ``segstream wait`` all go through SASL_SSL,
and the end state must equal the batch computation of the same events.
"""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import cdnow_oracle
import orjson
import pandas as pd
import pytest
from conftest import ROOT, SEGSTREAM, Deployment, jsonl
from secure_kafka import SecureKafka

pytestmark = pytest.mark.integration

DAY = 86_400_000
T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z
PROTECTED = ["/segments", "/migrations", "/migrations?limit=5", "/actions", "/metrics",
             "/openapi.json", "/api/stats"]
#: Left open on purpose: liveness and readiness probes, and the dashboard's page shell.
OPEN = ["/healthz", "/readyz", "/", "/dashboard"]
FAUST = ["/stats/", "/assignment/", "/graph/", "/router/", "/table/", "/performance/"]


@pytest.fixture(scope="module")
def secure_kafka() -> Any:
    broker = SecureKafka().start()
    yield broker
    broker.stop()


def _transactions(n: int = 240, customers: int = 24) -> list[dict[str, Any]]:
    rng = random.Random(11)
    out = []
    for i in range(n):
        ts = T0 + i * (45 * DAY // n) + rng.randrange(3_600_000)
        out.append({"event_id": f"sec-{i}", "customer_id": f"sc{rng.randrange(customers)}",
                    "ts": ts, "amount": round(rng.uniform(3, 120), 2), "kind": "purchase"})
    return out


def _batch_features(events: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame({
        "customer_id": [e["customer_id"] for e in events],
        "date": pd.to_datetime([e["ts"] for e in events], unit="ms").floor("D"),
        "amount": [e["amount"] for e in events],
    })
    return cdnow_oracle.expected_features(df)


def _get(url: str, token: str | None = None, scheme: str = "Bearer") -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"{scheme} {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _run_cli(env: dict[str, str], *args: str, timeout: float = 90
             ) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run([*SEGSTREAM, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - t0


def test_worker_over_sasl_ssl_equals_batch_and_api_needs_the_token(
        secure_kafka: SecureKafka, services: dict[str, str], tmp_path: Path) -> None:
    token = secrets.token_urlsafe(24)
    d = Deployment({"kafka": secure_kafka.bootstrap, "redis": services["redis"]},
                   **secure_kafka.env, SEGSTREAM_API_TOKEN=token)
    try:
        worker = d.start_worker(tmp_path)
        events = _transactions()
        path = tmp_path / "transactions.jsonl"
        path.write_bytes(jsonl(events))
        d.cli("replay", "jsonl", str(path), "--topic", "transactions")
        d.cli("wait", "--timeout", "300")

        _, feats = d.features()
        assert len(feats) == len({e["customer_id"] for e in events})
        assert cdnow_oracle.mismatches(_batch_features(events), feats) == []

        # Migrations were published by the worker and read back, both over SASL_SSL.
        migrations = d.consume_all("segment-migrations", timeout_s=60)
        moved = {orjson.loads(m.value)["customer_id"] for m in migrations if m.value}
        assert moved == set(feats)

        base = d.web_url(worker)
        cid = sorted(feats)[0]
        for route in [*PROTECTED, f"/customers/{cid}"]:
            assert _get(base + route) == 401, route
            assert _get(base + route, "not-" + token) == 401, route
            assert _get(base + route, token, scheme="Basic") == 401, route
            assert _get(base + route, token) == 200, route
        # An unknown customer is 404 only for a caller with the token.
        assert _get(base + "/customers/nobody-here") == 401
        assert _get(base + "/customers/nobody-here", token) == 404
        for route in OPEN:
            assert _get(base + route) == 200, route
        # Faust's own endpoints (statistics, assignment, graph, router, tables) are not served.
        for route in FAUST:
            assert _get(base + route) in (401, 404), route

        log = d.logs[0].read_text(errors="replace")
        assert secure_kafka.password not in log
        assert token not in log
    finally:
        d.cleanup()


def test_clients_without_tls_and_scram_are_refused(secure_kafka: SecureKafka) -> None:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    fast = {"request_timeout_ms": 4000, "bootstrap_timeout_ms": 8000}
    # The same broker answers a SASL_SSL client configured by hand ...
    a = KafkaAdminClient(**secure_kafka.client_config(**fast))
    try:
        a.list_topics()
    finally:
        a.close()
    # ... and refuses plaintext, TLS without SCRAM, and SCRAM without TLS.
    bootstrap = [secure_kafka.bootstrap]
    refused = {
        "PLAINTEXT": {"bootstrap_servers": bootstrap, **fast},
        "SSL": {"bootstrap_servers": bootstrap, "security_protocol": "SSL",
                "ssl_cafile": str(secure_kafka.cafile), **fast},
        "SASL_PLAINTEXT": secure_kafka.client_config(security_protocol="SASL_PLAINTEXT",
                                                     ssl_cafile=None, **fast),
    }
    for name, cfg in refused.items():
        with pytest.raises(KafkaError):
            client = KafkaAdminClient(**cfg)
            try:
                client.list_topics()
            finally:
                client.close()
            pytest.fail(f"a {name} client was served")

    # The engine's own check says which setting is wrong.
    from stream.errors import ServiceError
    from stream.kafka import check_connection
    from stream.settings import load_settings

    with pytest.raises(ServiceError, match="SEGSTREAM_KAFKA_SECURITY_PROTOCOL is PLAINTEXT"):
        check_connection(load_settings(kafka_bootstrap=secure_kafka.bootstrap))


def test_wrong_password_fails_at_start_naming_the_setting(
        secure_kafka: SecureKafka, services: dict[str, str], tmp_path: Path) -> None:
    wrong = "wrong-" + secrets.token_hex(6)
    d = Deployment({"kafka": secure_kafka.bootstrap, "redis": services["redis"]},
                   **secure_kafka.env)
    env = dict(d.env, SEGSTREAM_KAFKA_SASL_PASSWORD=wrong)
    path = tmp_path / "t.jsonl"
    path.write_bytes(jsonl(_transactions(5, 2)))
    for args in (("worker",), ("replay", "jsonl", str(path), "--topic", "transactions")):
        proc, took = _run_cli(env, *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out
        assert "SEGSTREAM_KAFKA_SASL_PASSWORD" in out, out
        assert "rejected" in out, out
        assert wrong not in out
        assert took < 30, f"{args[0]} took {took:.0f}s to fail"
    # Nothing was created with the rejected credentials.
    from kafka import KafkaAdminClient

    a = KafkaAdminClient(**secure_kafka.client_config())
    try:
        assert not [t for t in a.list_topics() if t.startswith(d.env["SEGSTREAM_TOPIC_PREFIX"])]
    finally:
        a.close()


@pytest.mark.parametrize(("drop", "named"), [
    ("SEGSTREAM_KAFKA_SASL_PASSWORD", "SEGSTREAM_KAFKA_SASL_PASSWORD"),
    ("SEGSTREAM_KAFKA_SASL_USERNAME", "SEGSTREAM_KAFKA_SASL_USERNAME"),
    ("SEGSTREAM_KAFKA_SASL_MECHANISM", "SEGSTREAM_KAFKA_SASL_MECHANISM"),
])
def test_incomplete_sasl_settings_fail_at_start_naming_the_setting(
        tmp_path: Path, drop: str, named: str) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not used: the settings are rejected before any connection\n")
    password = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGSTREAM_")}
    env.update({
        "SEGSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:9",
        "SEGSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "SEGSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "SEGSTREAM_KAFKA_SASL_USERNAME": "segstream",
        "SEGSTREAM_KAFKA_SASL_PASSWORD": password,
        "SEGSTREAM_KAFKA_SSL_CAFILE": str(ca),
    })
    del env[drop]
    proc, _ = _run_cli(env, "worker", timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert f"invalid setting: {named}" in out, out
    assert password not in out
