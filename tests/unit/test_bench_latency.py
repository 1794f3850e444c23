"""The latency phase's diagnostics: latencies by second, and the load generator's pauses."""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.latency import _GcPauses, by_second
from stream.app import watch_gc

samples = st.lists(
    st.tuples(st.floats(1.7e12, 1.7e12 + 20_000, allow_nan=False),
              st.floats(0, 5_000, allow_nan=False)),
    min_size=1, max_size=200,
)


@settings(max_examples=60, deadline=None)
@given(samples)
def test_by_second_matches_a_pandas_groupby(rows: list[tuple[float, float]]) -> None:
    df = pd.DataFrame(rows, columns=["sent", "lat"])
    df["second"] = ((df["sent"] - df["sent"].min()) // 1000).astype(int)
    want = df.groupby("second")["lat"].agg(
        n="size", p50=lambda s: s.quantile(0.5), p99=lambda s: s.quantile(0.99),
        max="max")
    got = by_second(rows)
    assert [r["second"] for r in got] == list(want.index)
    for r in got:
        w = want.loc[r["second"]]
        assert r["n"] == w["n"]
        # rounded to 0.1 ms as the other percentiles of the result
        assert np.isclose(r["p50"], w["p50"], atol=0.051)
        assert np.isclose(r["p99"], w["p99"], atol=0.051)
        assert np.isclose(r["max"], w["max"], atol=0.051)


@settings(max_examples=40, deadline=None)
@given(samples, st.floats(0, 3_000, allow_nan=False))
def test_by_second_counts_from_a_given_start(rows: list[tuple[float, float]],
                                             before: float) -> None:
    # Two series of one phase (watermark latencies, broker acknowledgements) share the
    # phase's start: second k of one is second k of the other.
    start = min(ts for ts, _ in rows) - before
    df = pd.DataFrame(rows, columns=["sent", "lat"])
    want = df.groupby(((df["sent"] - start) // 1000).astype(int))["lat"].size()
    got = by_second(rows, start=start)
    assert [(r["second"], r["n"]) for r in got] == list(want.items())


def test_by_second_of_nothing_is_empty() -> None:
    assert by_second([]) == []


def test_collector_pauses_are_recorded_with_their_second() -> None:
    pauses = _GcPauses()
    hook = watch_gc(pauses.observe)
    try:
        junk = [[i] for i in range(300_000)]  # something to traverse
        gc.collect()
        del junk
    finally:
        gc.callbacks.remove(hook)
    assert pauses.pauses and pauses.pauses[-1][2] == 2
    # a long one, as the collector reports it
    hook("start", {"generation": 2})
    time.sleep(0.03)
    hook("stop", {"generation": 2})
    start = pauses.pauses[-1][0] - 3_500
    out = pauses.summary(start)
    assert out["collections"] == len(pauses.pauses)
    assert out["pause_ms_max"] >= 30.0
    assert out["pause_ms_max"] == round(max(p for _, p, _ in pauses.pauses), 1)
    assert out["long"] and all(row["ms"] >= 20.0 for row in out["long"])
    assert out["long"][-1]["second"] == 3 and out["long"][-1]["generation"] == 2


def test_the_table_shows_each_phase_by_second_and_its_cpu() -> None:
    from pathlib import Path

    import orjson
    from rich.console import Console

    from bench import report

    path = Path(__file__).resolve().parents[2] / "bench/results/20261205T135320Z.json"
    doc = orjson.loads(path.read_bytes())
    console = Console(width=400, record=True)
    console.print(report.table(doc))
    text = console.export_text()
    for name, lat in doc["latency"].items():
        for key, what in (("watermark_by_second", "watermark p99 by second of the phase"),
                          ("ack_by_second", "broker acknowledgement p99 by second")):
            p99s = [r["p99"] for r in lat[key]]
            worst = lat[key][int(np.argmax(p99s))]
            line = next(ln for ln in text.splitlines() if f"{name}: {what}" in ln)
            assert f"median {np.median(p99s):,.0f} ms" in line, line
            assert f"worst {worst['p99']:,.0f} ms (second {worst['second']})" in line, line
        line = next(ln for ln in text.splitlines() if f"{name}: CPU s per second" in ln)
        roles = lat["cpu_by_role"]
        assert f"{roles['machine']:.2f}: {roles['worker']:.2f}, {roles['learner']:.2f}" in line


def _engine(workers: int, eps: float) -> Any:
    from bench.engine import EngineResult

    return EngineResult(workers=workers, events=100_000, seconds=100_000 / eps, eps=eps,
                        startup_s=1.0, cpu_s=9.0, cpu_s_per_million_events=90.0,
                        worker_cpu_s=8.0, rss_peak_mb=500.0, roundtrips=200, commands=600,
                        server={})


def test_scaling_is_reported_against_one_worker_before_and_after() -> None:
    from pathlib import Path

    import orjson
    from rich.console import Console

    from bench import report
    from bench.run import scaling_json

    before, two, after = _engine(1, 10_000.0), _engine(2, 15_000.0), _engine(1, 8_000.0)
    doc = scaling_json(before, two, after)
    assert doc["workers"] == 2 and doc["eps"] == 15_000.0
    assert doc["ratio_vs_1"] == 1.5
    assert doc["one_worker_again"]["eps"] == 8_000.0
    assert doc["one_worker_again"]["workers"] == 1
    assert doc["ratio_vs_1_again"] == round(15_000 / 8_000, 3)
    assert doc["ratio_vs_1_bracketed"] == round(15_000 / 9_000, 3)
    # the examples each later run's learners skipped go with that run
    with_skips = scaling_json(before, two, after, [12, 345])
    assert with_skips["examples_skipped"] == 12
    assert with_skips["one_worker_again"]["examples_skipped"] == 345
    # a run after it that failed is reported, not raised
    failed = scaling_json(before, two, "engine made no progress")
    assert failed["one_worker_again"] == {"error": "engine made no progress"}
    assert "ratio_vs_1_bracketed" not in failed and failed["ratio_vs_1"] == 1.5
    # without the run after it, only the ratio against E
    assert set(scaling_json(before, two, None)) == set(doc) - {
        "one_worker_again", "ratio_vs_1_again", "ratio_vs_1_bracketed"}

    path = Path(__file__).resolve().parents[2] / "bench/results/20261206T175254Z.json"
    result = {**orjson.loads(path.read_bytes()), "scaling": doc}
    console = Console(width=400, record=True)
    console.print(report.table(result))
    text = console.export_text()
    line = next(ln for ln in text.splitlines() if "E with 1 worker again" in ln)
    assert "8,000 ev/s: x1.88 vs it, x1.67 vs the mean of both" in line, line

    console = Console(width=400, record=True)
    console.print(report.table({**result, "scaling": failed}))
    line = next(ln for ln in console.export_text().splitlines()
                if "E with 1 worker again" in ln)
    assert "failed: engine made no progress" in line, line
