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
    ("SEGSTREAM_MAX_FUTURE_SKEW_S", "inf", "finite number"),
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
    # a float setting that is not a number: the message says so
    ("SEGSTREAM_ALLOWED_LATENESS_DAYS", "nan", "finite number"),
    ("SEGSTREAM_SWEEP_INTERVAL_S", "nan", "finite number"),
    ("SEGSTREAM_CURRENCY", "US", "pattern"),
    ("SEGSTREAM_DATA_DIR", "~no-such-user-here/x", "home directory"),
    # durations too short to work (a timeout under a round trip, a busy sweep loop)
    ("SEGSTREAM_REDIS_TIMEOUT_S", "1e-9", "greater than or equal to 0.05"),
    ("SEGSTREAM_SWEEP_INTERVAL_S", "1e-9", "greater than or equal to 0.1"),
    ("SEGSTREAM_POPULATION_REFRESH_S", "1e-300", "greater than or equal to 0.05"),
    ("SEGSTREAM_WEB_HOST", "", "at least 1"),
    # credentials a PLAINTEXT connection would ignore
    ("SEGSTREAM_KAFKA_SASL_USERNAME", "bob", "would be ignored"),
    # '$' of re.match matched before a final newline: names with one passed the check
    ("SEGSTREAM_APP_ID", "seg\n", "topic names"),
    ("SEGSTREAM_TOPIC_PREFIX", "team-a.\n", "topic names"),
    ("SEGSTREAM_REDIS_PREFIX", "segstream:\n", "letters, digits"),
    # the worker's HTTP server would fail to bind only once it started
    ("SEGSTREAM_WEB_HOST", " ", "host name or IP address"),
    ("SEGSTREAM_WEB_HOST", "a b", "host name or IP address"),
    ("SEGSTREAM_WEB_HOST", "http://h", "host name or IP address"),
    ("SEGSTREAM_WEB_HOST", "h/x", "host name or IP address"),
    ("SEGSTREAM_WEB_HOST", "0.0.0.0\n", "host name or IP address"),
    # every broker of the list is host:port, without a scheme or spaces
    ("SEGSTREAM_KAFKA_BOOTSTRAP", "kafka://h:9092", "'kafka://h:9092' is not host:port"),
    ("SEGSTREAM_KAFKA_BOOTSTRAP", "h:9092 b:9093", "'h:9092 b:9093' is not host:port"),
    ("SEGSTREAM_KAFKA_BOOTSTRAP", "h :9092", "'h :9092' is not host:port"),
    ("SEGSTREAM_KAFKA_BOOTSTRAP", "a:1,[h]:9092", "'[h]:9092' is not host:port"),
    # redis-py passes an option it does not know to the connection: every command failed
    ("SEGSTREAM_REDIS_URL", "redis://127.0.0.1:6379/0?socket_timout=5",
     "takes no option 'socket_timout' in the URL's query (did you mean 'socket_timeout'?)"),
    ("SEGSTREAM_REDIS_URL", "redis://127.0.0.1:6379/0?foo=1", "takes no option 'foo'"),
    # one redis-py reads from the URL but no connection takes
    ("SEGSTREAM_REDIS_URL", "redis://127.0.0.1:6379/0?timeout=5", "takes no option 'timeout'"),
    # a TLS option on a connection without TLS
    ("SEGSTREAM_REDIS_URL", "redis://127.0.0.1:6379/0?ssl_cert_reqs=none",
     "takes no option 'ssl_cert_reqs'"),
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




@pytest.mark.parametrize("field,value", [
    ("web_host", "0.0.0.0"), ("web_host", "::"), ("web_host", "worker-0.segstream.svc"),
    ("web_host", "localhost"), ("web_host", "fe80::1%eth0"),
    ("kafka_bootstrap", "kafka-bootstrap.kafka.svc:9093"),
    ("kafka_bootstrap", "[::1]:9092, 10.0.0.1:9092 ,kafka_0:9092"),
    ("kafka_bootstrap", "[fe80::1%eth0]:9092"),
])
def test_host_names_and_addresses_are_accepted(field: str, value: str) -> None:
    assert getattr(load_settings(**{field: value}), field) == value


@pytest.mark.parametrize("var", ["SEGSTREAM_KAFKA_SASL_USERNAME",
                                 "SEGSTREAM_KAFKA_SASL_PASSWORD"])
@pytest.mark.parametrize("blank", [" ", "\t\n"])
def test_blank_sasl_credentials_are_refused(monkeypatch: pytest.MonkeyPatch, var: str,
                                            blank: str) -> None:
    monkeypatch.setenv("SEGSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SEGSTREAM_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SEGSTREAM_KAFKA_SASL_USERNAME", "bob")
    monkeypatch.setenv("SEGSTREAM_KAFKA_SASL_PASSWORD", "pw")
    monkeypatch.setenv(var, blank)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert f"{var}: Value error, only whitespace" in str(info.value), info.value


@pytest.mark.parametrize("url", [
    "redis://u:qx1@qx2@127.0.0.1:99999/0",
    "redis://:qx1/qx2@h:1/0",
    "redis://h:99999/0?password=qx1",
    "unix:///tmp/r.sock?password=qx1&db=x",
    "redis://u:qx1?qx2@h:99999/0",
    "redis://h:99999/0?password=qx1@qx2",
])
def test_no_form_of_redis_password_is_echoed(monkeypatch: pytest.MonkeyPatch,
                                             url: str) -> None:
    from stream.redisconn import redacted_url

    monkeypatch.setenv("SEGSTREAM_REDIS_URL", url)
    with pytest.raises(SettingsError, match="SEGSTREAM_REDIS_URL") as info:
        load_settings()
    for text in (str(info.value), redacted_url(url)):
        assert "qx" not in text and "***" in text, text


def test_redacted_url_keeps_everything_but_the_password() -> None:
    from stream.redisconn import redacted_url

    assert redacted_url("redis://u:sec@ret@h:1/0") == "redis://u:***@h:1/0"
    assert redacted_url("redis://:a/b@h:1/0") == "redis://:***@h:1/0"
    assert redacted_url("redis://h:1/0?password=secret") == "redis://h:1/0?password=***"
    assert redacted_url("redis://bob@h:1/0?db=2") == "redis://bob@h:1/0?db=2"
    assert redacted_url("redis://[::1]:6379/0") == "redis://[::1]:6379/0"


@pytest.fixture
def unknown_env(monkeypatch: pytest.MonkeyPatch,
                caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Warnings of a fresh process: none given yet, and no SEGSTREAM_* variable but the test's."""
    import os

    from stream import settings

    monkeypatch.setattr(settings, "_warned_unknown", set())
    for name in list(os.environ):
        if name.upper().startswith("SEGSTREAM_"):
            monkeypatch.delenv(name)
    caplog.set_level("WARNING", logger="stream.settings")
    return caplog


def test_an_unknown_variable_is_warned_about_once_with_the_likely_setting(
        monkeypatch: pytest.MonkeyPatch, unknown_env: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SEGSTREAM_REDIS_UR", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("SEGSTREAM_PARTITION", "3")
    monkeypatch.setenv("SEGSTREAM_ZZZZZZZZZZZZZZZZ", "1")
    s = load_settings()
    load_settings()
    assert s.partitions == 6  # a warning, not a failure, and the typo is not read
    messages = [r.getMessage() for r in unknown_env.records]
    assert sorted(messages) == [
        "ignoring unknown setting SEGSTREAM_PARTITION; did you mean SEGSTREAM_PARTITIONS?",
        "ignoring unknown setting SEGSTREAM_REDIS_UR; did you mean SEGSTREAM_REDIS_URL?",
        "ignoring unknown setting SEGSTREAM_ZZZZZZZZZZZZZZZZ",
    ], messages


def test_variables_read_outside_the_settings_are_not_warned_about(
        monkeypatch: pytest.MonkeyPatch, unknown_env: pytest.LogCaptureFixture) -> None:
    for name, value in [("SEGSTREAM_NATIVE", "1"), ("SEGSTREAM_NATIVE_DIR", "/tmp/n"),
                        ("SEGSTREAM_USE_DOCKER", "0"), ("SEGSTREAM_LEARNER_PARENT_PID", "1"),
                        ("SEGSTREAM_FAULT_SEED", "7"), ("SEGSTREAM_UPDATE_SCREENSHOT", "0"),
                        ("SEGSTREAM_TEST_KAFKA", "127.0.0.1:19092"),
                        ("SEGSTREAM_TEST_REDIS", "redis://127.0.0.1:16379/0"),
                        ("SEGSTREAM_TEST_ROOT", "/"), ("SEGSTREAM_TEST_POISON", "x"),
                        ("SEGSTREAM_PARTITIONS", "3")]:
        monkeypatch.setenv(name, value)
    assert load_settings().partitions == 3
    assert unknown_env.records == []


def test_every_segstream_variable_the_repository_names_is_known() -> None:
    """A variable the code, tests or deployment files read must not be warned about."""
    import re

    from stream.settings import OTHER_ENV_VARS, Settings, env_name

    known = {env_name(f) for f in Settings.model_fields} | OTHER_ENV_VARS
    found: dict[str, str] = {}
    skip = {".venv", ".git", "build", ".mypy_cache", ".ruff_cache", ".pytest_cache",
            ".hypothesis", "segstream.egg-info", "node_modules", "results"}
    for path in ROOT.rglob("*"):
        if skip & set(path.relative_to(ROOT).parts) or not path.is_file() \
                or path == Path(__file__).resolve():  # this file names typos on purpose
            continue
        if path.suffix not in (".py", ".md", ".yml", ".yaml", ".toml", ".cfg", ".sh", ".env",
                               "") and path.name not in ("Makefile", "Dockerfile"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for name in re.findall(r"\bSEGSTREAM_[A-Z0-9_]*[A-Z0-9]\b", text):
            found.setdefault(name, str(path.relative_to(ROOT)))
    unknown = {n: p for n, p in found.items()
               if n not in known and not n.startswith("SEGSTREAM_TEST") and n != "SEGSTREAM_X"}
    assert unknown == {}


def test_a_data_dir_that_is_empty_or_a_file_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    afile = tmp_path / "f"
    afile.write_text("x")
    for value, why in (("", "empty"), ("  ", "empty"), (str(afile), "not a directory")):
        monkeypatch.setenv("SEGSTREAM_DATA_DIR", value)
        with pytest.raises(SettingsError, match="SEGSTREAM_DATA_DIR") as info:
            load_settings()
        assert why in str(info.value)
    monkeypatch.setenv("SEGSTREAM_DATA_DIR", str(tmp_path / "new" / "dir"))
    assert load_settings().data_dir == tmp_path / "new" / "dir"


def test_up_names_the_data_dir_it_cannot_create(tmp_path: Path) -> None:
    from stream import services

    afile = tmp_path / "f"
    afile.write_text("x")
    s = load_settings(data_dir=tmp_path / "ok")
    object.__setattr__(s, "data_dir", afile / "below-a-file")
    with pytest.raises(SettingsError, match="SEGSTREAM_DATA_DIR: cannot create"):
        services.up(s)


@pytest.mark.parametrize("url,ok", [("redis://h:1/0", True), ("redis://h:1", True),
                                    ("redis://h:1/0?db=0", True), ("redis://h:1/3", False),
                                    ("redis://h:1/0?db=3", False), ("redis://h:1?db=2", False)])
def test_a_redis_cluster_is_refused_any_database_but_0(url: str, ok: bool) -> None:
    if ok:
        assert load_settings(redis_url=url, redis_cluster=True).redis_cluster
    else:
        with pytest.raises(SettingsError, match=r"SEGSTREAM_REDIS_CLUSTER.*only database 0"):
            load_settings(redis_url=url, redis_cluster=True)


@pytest.mark.parametrize("value", ["::1:9092", "kafka:9092,fe80::1:9093"])
def test_an_ipv6_broker_without_brackets_is_refused(value: str) -> None:
    """The Kafka clients read "::1:9092" as the address ::1:9092 on the default port, while
    host:port splitting reads ::1 port 9092: one setting, two brokers."""
    with pytest.raises(SettingsError, match=r"SEGSTREAM_KAFKA_BOOTSTRAP.*brackets"):
        load_settings(kafka_bootstrap=value)


def test_the_start_up_check_reaches_a_bracketed_ipv6_broker() -> None:
    """The check connects where the clients would: to ::1 for "[::1]:port" (with the
    brackets kept it resolved nothing and reported every such broker as down)."""
    import socket
    import threading

    from stream.kafka import _probe, _run

    server = socket.socket(socket.AF_INET6)
    server.bind(("::1", 0))
    server.listen(1)
    server.settimeout(10)
    seen: list[object] = []

    def accept() -> None:
        try:
            conn, addr = server.accept()
            seen.append(addr)
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    port = server.getsockname()[1]
    failure = _run(_probe(load_settings(kafka_bootstrap=f"[::1]:{port}"), 2.0))
    t.join(10)
    server.close()
    assert seen, f"nothing connected; the probe failed with {failure!r}"


@pytest.mark.parametrize("option", ["socket_timeout=abc", "health_check_interval=x",
                                    "socket_connect_timeout=1s"])
def test_a_redis_url_option_the_client_cannot_read_names_the_setting(option: str) -> None:
    """It ended in a traceback at the first connection (exit 1), naming no setting."""
    url = f"redis://user:hunter2@127.0.0.1:1/0?{option}"
    with pytest.raises(SettingsError, match=r"SEGSTREAM_REDIS_URL") as info:
        load_settings(redis_url=url)
    assert option.split("=")[0] in str(info.value)
    assert "hunter2" not in str(info.value)


def test_the_lateness_check_names_the_setting_when_redis_does_not_answer() -> None:
    from stream.errors import ServiceError
    from stream.redisconn import check_lateness

    with pytest.raises(ServiceError, match="SEGSTREAM_REDIS_URL") as info:
        check_lateness(load_settings(redis_url="redis://user:pw9x@127.0.0.1:1/0",
                                     redis_timeout_s=1))
    assert "pw9x" not in str(info.value)


def test_a_data_directory_is_read_as_a_shell_reads_it(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """``~`` is the home directory and a relative path is made absolute at start, so the
    PID files ``segstream down`` reads are the ones ``up`` wrote from any directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings(data_dir="~/state").data_dir == tmp_path / "state"
    monkeypatch.chdir(tmp_path)
    assert load_settings(data_dir="rel/x").data_dir == tmp_path / "rel" / "x"


def test_a_redis_that_does_not_answer_names_the_timeout_setting() -> None:
    """A server that accepts connections and never answers: the error names the timeout
    setting, not only the URL."""
    import socket

    from stream.errors import ServiceError
    from stream.redisconn import check_redis

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        s = load_settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.3)
        with pytest.raises(ServiceError, match=r"SEGSTREAM_REDIS_TIMEOUT_S = 0\.3 s"):
            check_redis(s)


@pytest.mark.parametrize("url,cluster", [
    ("redis://127.0.0.1:6379/0?socket_timeout=5&max_connections=4", "false"),
    ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=none", "false"),
    ("unix:///tmp/redis.sock?db=1&health_check_interval=10", "false"),
    ("redis://127.0.0.1:6379/0?password=p", "false"),
    ("redis://127.0.0.1:6379/0?foo=", "false"),  # redis-py drops a blank option
    ("redis://127.0.0.1:6379/0?read_from_replicas=true", "true"),
])
def test_redis_url_options_the_client_takes_are_accepted(monkeypatch: pytest.MonkeyPatch,
                                                         url: str, cluster: str) -> None:
    monkeypatch.setenv("SEGSTREAM_REDIS_URL", url)
    monkeypatch.setenv("SEGSTREAM_REDIS_CLUSTER", cluster)
    assert load_settings().redis_url == url


@pytest.mark.parametrize("option", ["retry_on_timeout=true", "timeout=5"])
def test_a_redis_url_option_a_cluster_client_refuses_names_the_url(
        monkeypatch: pytest.MonkeyPatch, option: str) -> None:
    """A Redis Cluster client takes other options than a single server's connections."""
    monkeypatch.setenv("SEGSTREAM_REDIS_URL", f"redis://127.0.0.1:6379/0?{option}")
    monkeypatch.setenv("SEGSTREAM_REDIS_CLUSTER", "true")
    with pytest.raises(SettingsError, match="SEGSTREAM_REDIS_URL: a Redis Cluster client "
                                            "takes no option"):
        load_settings()


def test_a_worker_refuses_a_listen_address_or_data_dir_it_cannot_use(tmp_path) -> None:
    """Each names its setting before anything starts (they used to end in tracebacks)."""
    import socket

    from stream.app import check_worker_host
    from stream.errors import SettingsError
    from stream.settings import load_settings

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        with pytest.raises(SettingsError, match=r"SEGSTREAM_WEB_PORT.*in use"):
            check_worker_host(load_settings(web_port=port, data_dir=tmp_path))
    finally:
        held.close()
    check_worker_host(load_settings(web_port=port, data_dir=tmp_path))  # free again
    for host in ("nosuch.invalid", "999.1.1.1"):
        with pytest.raises(SettingsError, match="SEGSTREAM_WEB_HOST"):
            check_worker_host(load_settings(web_host=host, data_dir=tmp_path))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SettingsError, match="SEGSTREAM_DATA_DIR"):
        check_worker_host(load_settings(data_dir=blocker / "below"))
    check_worker_host(load_settings(data_dir=tmp_path / "new" / "dir"))
    assert (tmp_path / "new" / "dir").is_dir()
