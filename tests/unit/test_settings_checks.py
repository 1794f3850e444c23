"""Wrong settings fail at start naming the variable, and never print a secret."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stream.errors import SettingsError
from stream.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("var,value,why", [
    # accepted before, then failed on the first batch (int(inf * 1000))
    ("SEGSTREAM_MAX_FUTURE_SKEW_S", "inf", "less than or equal"),
    # ':' is valid in Redis keys, not in Kafka topic names
    ("SEGSTREAM_TOPIC_PREFIX", "team:a.", "topic names"),
    ("SEGSTREAM_APP_ID", "team:a", "topic names"),
    ("SEGSTREAM_REDIS_URL", "redis://127.0.0.1:abc/0", "port"),
    ("SEGSTREAM_REDIS_URL", "redis://127.0.0.1:99999/0", "port"),
    ("SEGSTREAM_REDIS_URL", "redis://:6379/0", "no host"),
    ("SEGSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092,127.0.0.1:99999", "port 99999"),
    # empty values that used to turn something off silently, or widen a deletion
    ("SEGSTREAM_API_TOKEN", "", "unset SEGSTREAM_API_TOKEN"),
    ("SEGSTREAM_LOG_HASH_KEY", " ", "unset SEGSTREAM_LOG_HASH_KEY"),
    ("SEGSTREAM_REDIS_PREFIX", "", "at least 1"),
    ("SEGSTREAM_WEB_HOST", "", "at least 1"),
    # credentials a PLAINTEXT connection would ignore
    ("SEGSTREAM_KAFKA_SASL_USERNAME", "bob", "would be ignored"),
])
def test_wrong_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, var: str,
                                          value: str, why: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var) as info:
        load_settings()
    assert why in str(info.value)


def test_secrets_and_passwords_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSTREAM_KAFKA_SASL_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("SEGSTREAM_REDIS_URL", "redis://bob:s3cret-pw@127.0.0.1:99999/0")
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = str(info.value)
    assert "SEGSTREAM_KAFKA_SASL_PASSWORD" in text and "SEGSTREAM_REDIS_URL" in text
    assert "hunter2" not in text and "s3cret" not in text
    assert "redis://bob:***@127.0.0.1:99999/0" in text


def test_ca_files_must_hold_certificates(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    monkeypatch.setenv("SEGSTREAM_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("SEGSTREAM_KAFKA_SSL_CAFILE", str(junk))
    with pytest.raises(SettingsError, match=r"SEGSTREAM_KAFKA_SSL_CAFILE.*PEM"):
        load_settings()
    monkeypatch.delenv("SEGSTREAM_KAFKA_SECURITY_PROTOCOL")
    monkeypatch.delenv("SEGSTREAM_KAFKA_SSL_CAFILE")
    monkeypatch.setenv("SEGSTREAM_REDIS_URL", "rediss://127.0.0.1:6380/0")
    monkeypatch.setenv("SEGSTREAM_REDIS_TLS_CA_FILE", str(junk))
    with pytest.raises(SettingsError, match=r"SEGSTREAM_REDIS_TLS_CA_FILE.*PEM"):
        load_settings()


def test_valid_values_still_load() -> None:
    s = load_settings(topic_prefix="team-a.", app_id="team_a", redis_prefix="team:a:",
                      kafka_bootstrap="10.0.0.1:9092,10.0.0.2:65535",
                      redis_url="redis://bob:pw@10.0.0.3:6379/2", max_future_skew_s=3600)
    assert s.topic("clickstream").startswith("team-a.")


def test_native_switch_fails_without_a_traceback() -> None:
    env = {"SEGSTREAM_NATIVE": "maybe", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", "import stream"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "SEGSTREAM_NATIVE" in res.stderr and "Traceback" not in res.stderr
