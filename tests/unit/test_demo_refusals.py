"""`segstream demo` refuses what it cannot replay before it starts anything."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from stream import demo, services
from stream.settings import load_settings


def _run(opts: demo.DemoOptions) -> tuple[int, str]:
    con = Console(record=True, width=200)
    rc = demo.run_demo(load_settings(), opts, con)
    return rc, con.export_text()


@pytest.fixture
def no_services(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any) -> Any:
        raise AssertionError("services were started")

    monkeypatch.setattr(services, "up", refuse)


def test_without_lifetimes_it_says_what_to_do_instead_of_a_traceback(
        monkeypatch: pytest.MonkeyPatch, no_services: None) -> None:
    import stream.replay

    def missing() -> Any:
        raise FileNotFoundError("the lifetimes package is not installed; pass --path")

    monkeypatch.setattr(stream.replay, "cdnow_path", missing)
    rc, out = _run(demo.DemoOptions())
    assert rc == 2
    assert "pip install lifetimes" in out and "--no-cdnow" in out and "--path" not in out


def test_nothing_to_replay_names_the_flags_that_were_given(no_services: None) -> None:
    rc, out = _run(demo.DemoOptions(cdnow=False, customers=0))
    assert rc == 2 and "--no-synthetic" not in out and "--customers" in out
    rc, out = _run(demo.DemoOptions(cdnow=False, synthetic=False))
    assert rc == 2 and "--no-cdnow or --no-synthetic" in out


def test_an_empty_period_is_refused_and_rate_0_reads_unthrottled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "up", lambda s: {"kafka": "reused", "redis": "reused"})
    import stream.kafka

    monkeypatch.setattr(stream.kafka, "ensure_topics", lambda s: None)

    async def now(*_: Any) -> int:
        return -1

    monkeypatch.setattr(demo, "_read", now)
    rc, out = _run(demo.DemoOptions(synthetic=False, until="1996-01-01"))
    assert rc == 2 and "nothing to replay" in out

    started: list[Any] = []
    monkeypatch.setattr(demo, "_run", lambda *a: started.append(a) or 0)
    rc, out = _run(demo.DemoOptions(cdnow=False, customers=5, days=2, rate=0))
    assert rc == 0 and started
    assert "unthrottled" in out and "at 0 events/s" not in out
