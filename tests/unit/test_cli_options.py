"""A wrong CLI option fails at once, naming it, before anything connects or is created."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stream import cli
from stream.errors import ServiceError

CDNOW = """ customer_id  date number_of_cds  dollar_value
 00001 19970101  1   11.77
 00002 19970112  1   12.00
 00003 19970302  2   20.76
"""


def _text(result: Any) -> str:
    """The output with rich's wrapping and panel borders undone."""
    return " ".join(w for w in result.output.split() if w not in ("│", "|"))


@pytest.fixture
def no_services(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record what would have touched Kafka; producing or connecting fails the test."""
    calls: list[str] = []

    def ensure_topics(_s: Any) -> None:
        calls.append("ensure_topics")

    def produce(_s: Any, records: Any, **_kw: Any) -> int:
        calls.append("produce")
        return sum(1 for _ in records)

    def connect(*_a: Any, **_kw: Any) -> None:
        raise AssertionError("connected to a service")

    monkeypatch.setattr("stream.kafka.ensure_topics", ensure_topics)
    monkeypatch.setattr("stream.replay.produce", produce)
    monkeypatch.setattr("stream.triggers.AIOKafkaConsumer", connect)
    monkeypatch.setattr("stream.triggers.redis_client", connect)
    monkeypatch.setattr("stream.triggers.check_redis", connect)
    return calls


def run(*args: str) -> Any:
    return CliRunner().invoke(cli.app, list(args))


def test_native_build_rejects_jobs_below_one(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSTREAM_NATIVE_DIR", str(tmp_path / "native"))
    result = run("native", "build", "--jobs", "-3")
    assert result.exit_code == 2, result.output
    assert "--jobs" in _text(result)
    assert not (tmp_path / "native").exists()


@pytest.mark.parametrize("missing", ["missing.jsonl", "."])
def test_replay_jsonl_checks_the_file_before_creating_topics(
        tmp_path: Path, no_services: list[str], missing: str) -> None:
    result = run("replay", "jsonl", str(tmp_path / missing), "--topic", "clickstream")
    assert result.exit_code == 2, result.output
    assert "Invalid value for 'path'" in _text(result)
    assert no_services == []


def test_replay_cdnow_checks_the_path_before_creating_topics(
        tmp_path: Path, no_services: list[str]) -> None:
    result = run("replay", "cdnow", "--path", str(tmp_path / "missing.txt"))
    assert result.exit_code == 2, result.output
    assert "--path" in _text(result)
    assert no_services == []


@pytest.mark.parametrize("until", ["garbage", "1997-02-30", "1997-3-1", "19970301x", ""])
def test_replay_cdnow_rejects_an_unparsable_until(
        tmp_path: Path, no_services: list[str], until: str) -> None:
    (tmp_path / "cdnow.txt").write_text(CDNOW)
    result = run("replay", "cdnow", "--path", str(tmp_path / "cdnow.txt"), "--until", until)
    assert result.exit_code == 2, result.output
    assert "--until" in _text(result) and "YYYY-MM-DD" in _text(result)
    assert no_services == []


@pytest.mark.parametrize("until", ["1997-03-01", "19970301"])
def test_replay_cdnow_replays_purchases_before_until(
        tmp_path: Path, no_services: list[str], until: str) -> None:
    (tmp_path / "cdnow.txt").write_text(CDNOW)
    result = run("replay", "cdnow", "--path", str(tmp_path / "cdnow.txt"), "--until", until)
    assert result.exit_code == 0, result.output
    assert no_services == ["ensure_topics", "produce"]
    assert "produced 2 transactions" in _text(result)


def test_demo_rejects_an_unparsable_until(monkeypatch: pytest.MonkeyPatch) -> None:
    def run_demo(*_a: Any) -> int:
        raise AssertionError("the demo started")

    monkeypatch.setattr("stream.demo.run_demo", run_demo)
    result = run("demo", "--until", "garbage")
    assert result.exit_code == 2, result.output
    assert "--until" in _text(result)


@pytest.mark.parametrize("webhook", ["notaurl", "ftp://hooks.example.com/x", "http://",
                                     "http:///path", "http://example.com:99999/"])
def test_triggers_rejects_a_webhook_that_is_not_an_http_url(
        no_services: list[str], webhook: str) -> None:
    result = run("triggers", "--webhook", webhook)
    assert result.exit_code == 2  # a usage error, not "delivery gave up" (1)
    assert not isinstance(result.exception, AssertionError), result.exception
    assert "--webhook" in _text(result), result.output


@pytest.mark.parametrize("timeout", ["inf", "nan", "1e9"])
def test_triggers_rejects_an_unbounded_timeout(no_services: list[str], timeout: str) -> None:
    result = run("triggers", "--webhook", "http://127.0.0.1:9/hook", "--timeout", timeout)
    assert result.exit_code == 2
    assert not isinstance(result.exception, AssertionError), result.exception
    assert "--timeout" in _text(result), result.output


def test_triggers_names_the_redis_setting_when_redis_cannot_be_reached(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSTREAM_REDIS_URL", "redis://127.0.0.1:1/0")
    result = run("triggers", "--webhook", "http://127.0.0.1:9/hook")
    assert result.exit_code == 1, result.output  # a service failed (options exit 2)
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert "SEGSTREAM_REDIS_URL" in _text(result), result.output


@pytest.mark.parametrize("value", ["[/x]", "[bold]x"])
def test_main_prints_a_settings_error_without_reading_it_as_markup(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str) -> None:
    monkeypatch.setenv("SEGSTREAM_APP_ID", value)
    monkeypatch.setattr(sys, "argv", ["segstream", "status"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "SEGSTREAM_APP_ID" in err and repr(value) in err, err


@pytest.mark.parametrize("row", [" 00004 19970101  1   abc", " 00004 1997-01-01  1   1.0",
                                 " 00004 199701012  1   1.0", " X0004 19970101  1   1.0",
                                 " 00004 19970101  1", " 00004 19970101  1   $12.00",
                                 " 00004 19970101  1   nan", " 00004 19970101  1   -3.00",
                                 " 00004 19970101  1   2e12"])
def test_replay_cdnow_names_the_file_and_line_of_a_malformed_row(
        no_services: list[str], tmp_path: Path, row: str) -> None:
    path = tmp_path / "cdnow.txt"
    path.write_text(CDNOW + "\n" + row + "\n")
    result = run("replay", "cdnow", "--path", str(path))
    assert result.exit_code == 2, result.output
    assert f"{path.name}:6" in _text(result).replace(" ", "") or ":6:" in result.output
    assert no_services == []  # nothing created or produced


def test_replay_cdnow_reads_a_header_blank_lines_and_crlf(tmp_path: Path) -> None:
    from stream.replay import read_cdnow

    path = tmp_path / "cdnow.txt"
    path.write_bytes(b"\r\n  \r\n" + CDNOW.replace("\n", "\r\n").encode() + b"\r\n   \r\n")
    rows = read_cdnow(path)
    assert [(r.customer_id, r.day, r.quantity, r.amount) for r in rows] == [
        ("00001", "19970101", 1, 11.77), ("00002", "19970112", 1, 12.0),
        ("00003", "19970302", 2, 20.76)]


def test_replay_jsonl_skips_a_bom_and_blank_lines_and_cuts_oversized_lines(
        tmp_path: Path) -> None:
    import orjson

    from stream.replay import jsonl_records

    first = orjson.dumps({"event_id": "e1", "customer_id": "bom-first"})
    big = orjson.dumps({"event_id": "e2", "customer_id": "big", "pad": "x" * 5000})
    last = orjson.dumps({"event_id": "e3", "customer_id": "after"})
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + first + b"\r\n   \n\t\n\n" + big + b"\n" + last)
    out = list(jsonl_records(path, "t", max_bytes=1000))
    assert [(r.key, r.value) for r in out] == [
        (b"bom-first", first), (None, big[:1001]), (b"after", last)]


def test_replay_synthetic_checks_seed_and_truth_before_creating_topics(
        no_services: list[str], tmp_path: Path) -> None:
    result = run("replay", "synthetic", "--customers", "2", "--days", "1", "--seed", "-1")
    assert result.exit_code == 2 and "--seed" in _text(result)
    result = run("replay", "synthetic", "--customers", "2", "--days", "1",
                 "--truth", str(tmp_path / "missing" / "t.jsonl"))
    assert result.exit_code == 2 and "--truth" in _text(result)
    assert no_services == []


def test_replay_synthetic_never_generates_events_after_today(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import orjson

    sent: list[Any] = []
    monkeypatch.setattr("stream.kafka.ensure_topics", lambda _s: None)
    monkeypatch.setattr("stream.replay.produce",
                        lambda _s, records, **_kw: len(sent.extend(records) or sent))
    result = run("replay", "synthetic", "--customers", "5", "--days", "3650")
    assert result.exit_code == 0, result.output
    ts = [orjson.loads(r.value)["ts"] for r in sent]
    assert ts and all(isinstance(t, int) for t in ts)
    assert max(ts) < time.time() * 1000 and min(ts) > 0


def test_customer_and_forget_print_ids_as_text_not_markup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {"customer_id": "vip[/x]", "segments": {"rfm": "[bold]Loyal"}, "scores": {},
           "features": {}, "history": []}
    monkeypatch.setattr(cli, "customer_doc", lambda _s, _cid: doc)
    result = run("customer", "vip[/x]")
    assert result.exit_code == 0, result.output
    assert "vip[/x]" in result.output and "[bold]Loyal" in result.output

    async def erased(_s: Any, _fn: Any) -> dict[str, Any]:
        return {"customer_id": "vip[/x]", "state": True}

    monkeypatch.setattr(cli, "_with_store", erased)
    monkeypatch.setattr("stream.forget.publish_tombstone", lambda _s, _cid: None)
    monkeypatch.setattr("stream.redisconn.check_redis", lambda _s: None)
    monkeypatch.setattr("stream.kafka.check_partitions", lambda _s: None)
    result = run("forget", "vip[/x]")
    assert result.exit_code == 0, result.output
    assert "forgot vip[/x]" in result.output


@pytest.mark.parametrize("command", [["customer", "c1"], ["segments"], ["actions"], ["models"],
                                     ["forget", "c1"], ["clv", "fit"], ["wait"]])
def test_a_redis_that_cannot_be_reached_is_named_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    from stream.errors import SegstreamError

    monkeypatch.setenv("SEGSTREAM_REDIS_URL", "redis://127.0.0.1:1/0")
    result = run(*command)
    # main() prints a SegstreamError as one line naming the setting and exits 2.
    assert isinstance(result.exception, SegstreamError), result.exception
    assert "SEGSTREAM_REDIS_URL" in str(result.exception)


@pytest.mark.parametrize(("option", "value"), [("--timeout", "nan"), ("--timeout", "inf"),
                                               ("--quiet-s", "nan"), ("--timeout", "-1")])
def test_wait_refuses_a_timeout_that_is_not_a_finite_number(
        no_services: list[str], option: str, value: str) -> None:
    result = run("wait", option, value)
    assert result.exit_code == 2, result.output
    assert option in _text(result)


def test_a_store_failure_after_the_check_still_names_the_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis answered the start-up check, then failed mid-command."""
    from features.store import StoreUnavailable
    from stream.errors import ServiceError

    monkeypatch.setattr("stream.redisconn.check_redis", lambda _s: None)

    async def failing(_s: Any, _r: Any, _store: Any, _only: Any = None) -> Any:
        raise StoreUnavailable("redis read failed: Connection reset by peer")

    monkeypatch.setattr("stream.queries.segments_doc", failing)
    result = run("segments")
    assert isinstance(result.exception, ServiceError), result.exception
    assert "SEGSTREAM_REDIS_URL" in str(result.exception)
    assert "Connection reset by peer" in str(result.exception)


@pytest.mark.parametrize("url", ["redis://app:TOPSECRET@127.0.0.1:1/0",
                                 "redis://app:TOP@SECRET@127.0.0.1:1/0",
                                 "redis://127.0.0.1:1/0?password=TOPSECRET"])
@pytest.mark.parametrize("command", [["status", "--json"], ["status"], ["up", "--json"], ["up"]])
def test_status_and_up_never_print_the_redis_password(
        monkeypatch: pytest.MonkeyPatch, command: list[str], url: str) -> None:
    from stream import services

    monkeypatch.setenv("SEGSTREAM_REDIS_URL", url)
    monkeypatch.setattr(services, "health", lambda _s: services.Health(True, True))
    monkeypatch.setattr(services, "diagnose", lambda _s: services.Health(True, True))
    monkeypatch.setattr(services, "up", lambda _s: {"kafka": "reused", "redis": "reused"})
    result = run(*command)
    assert result.exit_code == 0, result.output
    assert "SECRET" not in result.output, result.output
    if command[0] == "up" or "--json" in command:
        assert "127.0.0.1:1/0" in result.output and "***" in result.output, result.output


@pytest.mark.parametrize("host, api", [("0.0.0.0", "http://127.0.0.1:7001"),
                                       ("::", "http://[::1]:7001"),
                                       ("10.1.2.3", "http://10.1.2.3:7001"),
                                       ("fd00::5", "http://[fd00::5]:7001"),
                                       ("worker-0.svc", "http://worker-0.svc:7001")])
def test_status_json_gives_an_api_url_a_client_can_open(
        monkeypatch: pytest.MonkeyPatch, host: str, api: str) -> None:
    """A wildcard bind address is no address to connect to, and an IPv6 one needs
    brackets in a URL."""
    import json
    import urllib.parse

    from stream import services

    monkeypatch.setenv("SEGSTREAM_WEB_HOST", host)
    monkeypatch.setenv("SEGSTREAM_WEB_PORT", "7001")
    monkeypatch.setattr(services, "diagnose", lambda _s: services.Health(True, True))
    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)["api"]
    assert got == api
    assert urllib.parse.urlsplit(got).port == 7001


def test_bench_checks_the_results_dir_before_anything_runs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ran: list[Any] = []
    monkeypatch.setattr("bench.run.run", lambda opts, console=None: ran.append(opts) or {})
    monkeypatch.setattr("bench.report.table", lambda _doc: "")
    taken = tmp_path / "results.json"
    taken.write_text("{}")
    for bad in (taken, taken / "sub"):
        result = run("bench", "--results-dir", str(bad))
        assert result.exit_code == 2, result.output
        assert "--results-dir" in _text(result), result.output
        assert not isinstance(result.exception, FileExistsError | NotADirectoryError)
    assert ran == []
    fresh = tmp_path / "new" / "results"
    result = run("bench", "--results-dir", str(fresh))
    assert result.exit_code == 0, result.output
    assert fresh.is_dir() and [o.results_dir for o in ran] == [fresh]


@pytest.mark.parametrize("value", ["inf", "+inf", "Infinity", "-inf", "nan", "0", "-1"])
@pytest.mark.parametrize("command", [["jsonl", "{path}", "--topic", "clickstream"],
                                     ["cdnow", "--path", "{path}"],
                                     ["synthetic", "--customers", "1", "--days", "1"]])
def test_replay_refuses_a_rate_that_is_not_a_positive_finite_number(
        no_services: list[str], tmp_path: Path, command: list[str], value: str) -> None:
    path = tmp_path / "in.txt"
    path.write_text(CDNOW)
    args = [a.replace("{path}", str(path)) for a in command]
    result = run("replay", *args, "--rate", value)
    assert result.exit_code == 2, result.output
    assert "--rate" in _text(result), result.output
    assert no_services == []


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_demo_refuses_a_rate_that_is_not_finite(monkeypatch: pytest.MonkeyPatch,
                                                value: str) -> None:
    ran: list[Any] = []
    monkeypatch.setattr("stream.demo.run_demo", lambda *a, **kw: ran.append(a) or 0)
    result = run("demo", "--rate", value)
    assert result.exit_code == 2, result.output
    assert "--rate" in _text(result), result.output
    assert ran == []


@pytest.mark.parametrize("text", ["", "customer date quantity amount\n", "hello\n\n"])
def test_replay_cdnow_refuses_a_file_without_rows(no_services: list[str], tmp_path: Path,
                                                  text: str) -> None:
    path = tmp_path / "cdnow.txt"
    path.write_text(text)
    result = run("replay", "cdnow", "--path", str(path))
    assert result.exit_code == 2, result.output
    assert "no '<customer id>" in _text(result), result.output
    assert no_services == []


@pytest.mark.parametrize("env,why", [
    ({"SEGSTREAM_NATIVE_DIR": "{file}"}, "SEGSTREAM_NATIVE_DIR: "),
    ({"SEGSTREAM_NATIVE": "maybe"}, "SEGSTREAM_NATIVE='maybe'")])
def test_native_names_a_bad_setting_without_a_traceback(tmp_path: Path, env: dict[str, str],
                                                        why: str) -> None:
    import os
    import subprocess
    import sys

    afile = tmp_path / "f"
    afile.write_text("x")
    full = {**os.environ, **{k: v.replace("{file}", str(afile)) for k, v in env.items()}}
    for action in ("status", "build"):
        proc = subprocess.run([sys.executable, "-m", "stream.cli", "native", action],
                              env=full, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", ["forget", "customer"])
@pytest.mark.parametrize("cid", ["", "   ", "a\x01b", "x" * 257, "a\u2028b"])
def test_forget_and_customer_refuse_an_id_the_input_schema_refuses(
        monkeypatch: pytest.MonkeyPatch, cid: str, command: str) -> None:
    """Such an id was never stored: erasing it only published a tombstone keyed by it, and
    looking it up echoed all of it back (100 KB) as unknown."""
    def touched(*_a: Any, **_kw: Any) -> Any:
        raise AssertionError("reached Redis or Kafka")

    monkeypatch.setattr("stream.forget.publish_tombstone", touched)
    monkeypatch.setattr(cli, "_with_store", touched)
    result = run(command, cid)
    assert result.exit_code == 2, result.output
    assert "CUSTOMER_ID" in _text(result)


@pytest.mark.parametrize("args", [["demo", "--days", "3651"],
                                  ["bench", "--latency-seconds", "inf"],
                                  ["bench", "--latency-eps", "inf"]])
def test_unbounded_sizes_are_refused_before_anything_runs(
        monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    """--days 100000000 built its whole input before it ran out of memory; an infinite
    latency phase failed minutes into the benchmark."""
    def started(*_a: Any, **_kw: Any) -> Any:
        raise AssertionError("it started")

    monkeypatch.setattr("stream.demo.run_demo", started)
    monkeypatch.setattr("bench.run.run", started, raising=False)
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert args[1] in _text(result)


@pytest.fixture
def kafka_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens at the bootstrap address, and the check does not wait for it."""
    monkeypatch.setenv("SEGSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setattr("stream.kafka.UNREACHABLE_WAIT_S", 0.0)


def test_learner_names_the_bootstrap_setting_when_kafka_is_unreachable(
        kafka_down: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def learn(*_a: Any) -> None:
        raise AssertionError("the learner started without a broker")

    monkeypatch.setattr("stream.learner_service.run", learn)
    monkeypatch.setattr("stream.redisconn.check_redis", lambda _s: None)
    result = run("learner")
    # segstream's main() prints a ServiceError as one line and exits 2
    assert isinstance(result.exception, ServiceError), result.output
    assert "SEGSTREAM_KAFKA_BOOTSTRAP" in str(result.exception)


def test_learner_names_the_redis_setting_when_redis_refuses_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused password or prefix: it used to start, log a warning per assignment and run
    on without its store. A Redis that does not answer yet is waited for instead
    (tests/integration/test_learner_service.py)."""
    from stream.errors import SettingsError

    started: list[Any] = []

    def refused(_s: Any) -> None:
        raise SettingsError("SEGSTREAM_REDIS_URL: Redis refused the user name or password")

    monkeypatch.setattr("stream.learner_service.run", lambda *a: started.append(a))
    monkeypatch.setattr("stream.kafka.check_connection", lambda *_a, **_kw: None)
    monkeypatch.setattr("stream.redisconn.check_redis", refused)
    result = run("learner")
    assert isinstance(result.exception, SettingsError), result.output
    assert "SEGSTREAM_REDIS_URL" in str(result.exception) and not started

    def down(_s: Any) -> None:
        raise ServiceError("SEGSTREAM_REDIS_URL: cannot use Redis: Connection refused")

    monkeypatch.setattr("stream.redisconn.check_redis", down)
    result = run("learner")
    assert result.exception is None, result.output
    assert len(started) == 1


def test_bench_checks_the_services_before_it_builds_or_cleans_anything(
        kafka_down: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A benchmark that cannot reach Kafka fails at once, naming the setting: its clean-up
    used to wait for the unreachable broker a second time."""
    def built(*_a: Any, **_kw: Any) -> None:
        raise AssertionError("the benchmark deployment was built")

    monkeypatch.setattr("bench.run.BenchDeployment", built)
    result = run("bench", "--events", "10", "--customers", "2", "--skip-latency",
                 "--results-dir", str(tmp_path), "--json")
    assert isinstance(result.exception, ServiceError), result.output
    assert "SEGSTREAM_KAFKA_BOOTSTRAP" in str(result.exception)


def test_status_reports_an_unreachable_redis_cluster_as_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py's cluster errors are not RedisErrors: status printed a traceback."""
    from stream import services
    from stream.settings import load_settings

    monkeypatch.setenv("SEGSTREAM_REDIS_URL", "redis://127.0.0.1:2/0")
    monkeypatch.setenv("SEGSTREAM_REDIS_CLUSTER", "true")
    assert services.redis_healthy(load_settings()) is False


def test_status_prints_its_report_on_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report is the command's output (as segments' and customer's), for pipes."""
    from stream import services

    monkeypatch.setattr(services, "diagnose", lambda _s: services.Health(
        True, False, redis_reason="SEGSTREAM_REDIS_URL: refused"))
    result = CliRunner().invoke(cli.app, ["status"])
    assert result.exit_code == 1
    assert "kafka: healthy" in result.stdout and "redis: down" in result.stdout, result.stdout
    assert "SEGSTREAM_REDIS_URL: refused" in result.stdout


def test_a_failing_json_command_prints_one_json_document(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """DESIGN §6: --json prints one JSON document, also when the command fails."""
    import json

    monkeypatch.setenv("SEGSTREAM_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(sys, "argv", ["segstream", "segments", "--json"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert "SEGSTREAM_REDIS_URL" in doc["error"] and "SEGSTREAM_REDIS_URL" in out.err

    monkeypatch.setattr(cli, "customer_doc", lambda _s, _cid: None)
    result = CliRunner().invoke(cli.app, ["customer", "nosuch", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": "unknown customer 'nosuch'"}


def test_wait_with_kafka_down_gives_up_within_its_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``wait --timeout`` bounds the wait for a broker nobody answers for (it used to wait
    the clients' own 30 s whatever the timeout)."""
    monkeypatch.setenv("SEGSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setattr("stream.redisconn.check_redis", lambda _s: None)
    waited: list[float] = []

    def probe(_settings: Any, timeout_s: float) -> Any:
        async def refused() -> Exception:
            return ConnectionRefusedError(111, "Connect call failed")
        waited.append(timeout_s)
        return refused()

    monkeypatch.setattr("stream.kafka._probe", probe)
    # The clock only moves when the check sleeps (negative entries).
    monkeypatch.setattr("stream.kafka.time.sleep", lambda s: waited.append(-s))
    monkeypatch.setattr("stream.kafka.time.monotonic",
                        lambda: sum(-w for w in waited if w < 0))
    result = run("wait", "--timeout", "3")
    assert isinstance(result.exception, ServiceError), result.output
    assert "SEGSTREAM_KAFKA_BOOTSTRAP" in str(result.exception)
    slept = sum(-w for w in waited if w < 0)
    assert 2 <= slept <= 4, waited  # about the timeout, not UNREACHABLE_WAIT_S
    # Each attempt still gives a remote TLS broker its few seconds to answer.
    assert max(w for w in waited if w > 0) <= 5, waited


@pytest.mark.parametrize("error", ["kafka", "aiokafka"])
def test_a_kafka_failure_after_the_check_is_one_line_naming_the_setting(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        error: str) -> None:
    """The bootstrap broker passed the check, another broker (its advertised address)
    failed the TLS handshake: a raw traceback named no setting."""
    if error == "kafka":
        from kafka.errors import KafkaConnectionError
    else:
        from aiokafka.errors import KafkaConnectionError  # type: ignore[assignment]

    def handshake(*_a: Any, **_kw: Any) -> Any:
        raise KafkaConnectionError("Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] "
                                   "IP address mismatch")

    monkeypatch.setenv("SEGSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9093")
    monkeypatch.setattr("stream.redisconn.check_redis", lambda _s: None)
    monkeypatch.setattr("stream.kafka.check_connection", lambda *_a, **_kw: None)
    monkeypatch.setattr("stream.kafka.end_offsets", handshake)
    monkeypatch.setattr(sys, "argv", ["segstream", "wait", "--timeout", "1"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "SEGSTREAM_KAFKA_BOOTSTRAP" in err and "advertised.listeners" in err, err
    assert "Traceback" not in err
