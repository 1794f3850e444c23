"""The benchmark's per-phase account of the worker's batches, from its real /metrics text."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from hypothesis import given, settings
from hypothesis import strategies as st

from bench import breakdown, report
from stream.metrics import LATENCY_BUCKETS, EngineMetrics


def _scraped(m: EngineMetrics) -> dict:
    return breakdown.parse(m.render()[0].decode())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 12.0), min_size=1, max_size=200),
       st.sampled_from([0.5, 0.95, 0.99]))
def test_quantile_lies_in_the_bucket_of_the_true_quantile(waits: list[float], q: float) -> None:
    m = EngineMetrics()
    for w in waits:
        m.observe_batch(10, 0.01, wait_s=w)
    h = _scraped(m)["batch_wait_seconds"]
    assert h["count"] == len(waits)
    est = breakdown.histogram_quantile(q, h["buckets"])
    # The observation of rank ceil(q n) is the q quantile; the estimate must lie in the
    # bucket (lower, upper] holding it (Prometheus' bucket semantics: value <= le).
    true = sorted(waits)[max(0, math.ceil(q * len(waits)) - 1)]
    bounds = (0.0, *LATENCY_BUCKETS)
    upper = next((b for b in LATENCY_BUCKETS if true <= b), math.inf)
    lower = max(b for b in bounds if b < upper) if true > 0 else 0.0
    assert est is not None
    if math.isinf(upper):
        assert est == LATENCY_BUCKETS[-1]
    else:
        assert lower - 1e-12 <= est <= upper + 1e-12


def test_summary_is_the_difference_of_two_scrapes() -> None:
    m = EngineMetrics()
    for _ in range(3):
        m.observe_batch(1000, 2.0, wait_s=5.0)
    before = _scraped(m)
    for n in (10, 20, 30, 40):
        m.observe_batch(n, 0.004, wait_s=0.012)
    s = breakdown.summary(before, _scraped(m))
    assert s is not None
    assert s["batches"] == 4 and s["records"] == 100 and s["mean_batch_records"] == 25.0
    assert s["mean_batch_processing_ms"] == 4.0
    # Only the later batches: every quantile inside (10, 15] ms and (2.5, 5] ms.
    assert all(10.0 <= v <= 15.0 for v in s["batch_wait_ms"].values())
    assert all(2.5 <= v <= 5.0 for v in s["batch_processing_ms"].values())
    # Linear within the bucket, as Prometheus' histogram_quantile: rank 2 of 4 in (10, 15].
    assert s["batch_wait_ms"]["p50"] == 12.5
    assert breakdown.histogram_quantile(0.5, [(0.01, 2.0), (0.02, 6.0), (math.inf, 8.0)]
                                        ) == 0.015
    assert breakdown.histogram_quantile(0.99, [(0.01, 2.0), (math.inf, 8.0)]) == 0.01
    assert breakdown.summary(before, before) is None  # no batch in between
    assert breakdown.summary(before, None) is None


def test_summary_counts_the_garbage_collections_between_two_scrapes() -> None:
    m = EngineMetrics()
    m.observe_batch(10, 0.01, wait_s=0.01)
    m.observe_gc(2, 0.4)  # before the phase: not counted
    before = _scraped(m)
    m.observe_batch(10, 0.01, wait_s=0.01)
    for _ in range(98):
        m.observe_gc(0, 0.0008)
    m.observe_gc(1, 0.004)
    m.observe_gc(2, 0.03)
    s = breakdown.summary(before, _scraped(m))
    assert s is not None and s["gc"]["collections"] == 100
    assert s["gc"]["full_collections"] == 1
    assert s["gc"]["pause_ms_total"] == round(98 * 0.8 + 4 + 30, 1)
    # The 99th of 100 pauses is the 4 ms one: in the bucket (2.5, 5] ms.
    assert 2.5 <= s["gc"]["pause_p99_ms"] <= 5.0


def test_summary_counts_the_sweep_steps_between_two_scrapes() -> None:
    m = EngineMetrics()
    m.observe_batch(10, 0.01, wait_s=0.01)
    m.observe_sweep_step(200, 0.5)  # before the phase: not counted
    before = _scraped(m)
    m.observe_batch(10, 0.01, wait_s=0.01)
    for _ in range(9):
        m.observe_sweep_step(40, 0.004)
    m.observe_sweep_step(0, 0.03)  # an attempt refused by the fence: no customers
    s = breakdown.summary(before, _scraped(m))
    assert s is not None
    assert s["sweeps"]["steps"] == 10 and s["sweeps"]["customers"] == 360
    assert s["sweeps"]["held_ms_total"] == 66.0
    assert 25.0 <= s["sweeps"]["step_p99_ms"] <= 50.0  # the slow step's bucket
    # a worker that swept nothing in the phase reports zero steps, not the earlier ones
    before = _scraped(m)
    m.observe_batch(10, 0.01, wait_s=0.01)
    s = breakdown.summary(before, _scraped(m))
    assert s is not None and s["sweeps"] == {"steps": 0, "customers": 0, "held_ms_total": 0.0,
                                            "step_p99_ms": None}


def test_summary_gives_each_stage_of_the_batches_between_two_scrapes() -> None:
    m = EngineMetrics()
    m.observe_batch(10, 1.0, wait_s=0.01)
    m.observe_stage("evaluate", 0.9)  # before the phase: not counted
    before = _scraped(m)
    for i in range(4):
        m.observe_batch(10, 0.05, wait_s=0.01)
        m.observe_stage("load", 0.002)
        m.observe_stage("evaluate", 0.03 if i < 3 else 0.2)
        m.observe_stage("commit", 0.01)
    s = breakdown.summary(before, _scraped(m))
    assert s is not None and set(s["stages"]) == {"load", "evaluate", "commit"}
    assert list(s["stages"]) == ["load", "evaluate", "commit"]  # in the batch's order
    assert s["stages"]["evaluate"]["mean_ms"] == round((3 * 30 + 200) / 4, 2)
    assert s["stages"]["load"]["mean_ms"] == 2.0
    assert 100.0 < s["stages"]["evaluate"]["p99_ms"] <= 250.0  # the slow batch's bucket
    assert 1.0 < s["stages"]["load"]["p99_ms"] <= 2.5


def test_scrape_reads_a_served_page_and_gives_none_when_unreachable() -> None:
    m = EngineMetrics()
    m.observe_batch(7, 0.02, wait_s=0.03)
    body, content_type = m.render()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == "Bearer t0k"
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", content_type)
            self.end_headers()
            self.wfile.write(body if ok else b"")

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        got = breakdown.scrape(url, "t0k")
        assert got is not None and got["batch_size"]["sum"] == 7.0
        assert got["batch_wait_seconds"]["count"] == 1.0
        assert breakdown.scrape(url, "wrong") is None  # 401 is an error, not a page
    finally:
        server.shutdown()
        server.server_close()
    assert breakdown.scrape(url, "t0k", timeout=0.5) is None


def test_summary_of_a_worker_without_the_stage_and_gc_families() -> None:
    """An older worker exposes neither: the summary leaves them out, the rest unchanged."""
    m = EngineMetrics()
    m.observe_batch(10, 0.01, wait_s=0.01)
    m.observe_stage("load", 0.002)
    old = {k: v for k, v in _scraped(m).items()
           if not k.startswith(("batch_stage_seconds", "gc_pause_seconds", "sweep_"))}
    s = breakdown.summary(None, old)
    assert s is not None and s["batches"] == 1 and s["records"] == 10
    assert "stages" not in s and "gc" not in s and "sweeps" not in s


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 12.0), min_size=1, max_size=200),
       st.lists(st.floats(0.0, 12.0), max_size=50))
def test_longest_is_the_bucket_of_the_largest_observation_of_the_phase(
        earlier: list[float], waits: list[float]) -> None:
    """Only what happened between the two scrapes counts: a longer wait before the first
    scrape does not show."""
    m = EngineMetrics()
    for w in earlier:
        m.observe_batch(10, 0.01, wait_s=w)
    before = _scraped(m)
    for w in waits:
        m.observe_batch(10, 0.01, wait_s=w)
        m.observe_loop_lag(w)
    s = breakdown.summary(before, _scraped(m))
    if not waits:
        assert s is None
        return
    assert s is not None
    top = max(waits)
    upper = next((b for b in LATENCY_BUCKETS if top <= b), math.inf)
    lower = max((b for b in (0.0, *LATENCY_BUCKETS) if b < upper), default=0.0)
    lo, hi = s["longest_ms"]["batch_wait"]
    assert lo == round(lower * 1000, 2) and hi == round(upper * 1000, 2)
    lag_lo, lag_hi = s["longest_ms"]["event_loop_lag"]
    assert lag_lo * 1e-3 - 1e-9 <= top <= lag_hi * 1e-3 + 1e-9
    # every batch took 10 ms: the longest lies in (5, 10] ms
    assert s["longest_ms"]["batch_processing"] == [5.0, 10.0]


def test_a_longest_past_the_last_bucket_has_no_upper_bound_and_stays_valid_json() -> None:
    m = EngineMetrics()
    m.observe_batch(10, 0.01, wait_s=0.01)
    before = _scraped(m)
    m.observe_batch(10, 60.0, wait_s=0.01)  # past the last batch_seconds bucket (10 s)
    s = breakdown.summary(before, _scraped(m))
    assert s is not None
    assert s["longest_ms"]["batch_processing"] == [10000.0, None]
    json.loads(json.dumps(s, allow_nan=False))  # no Infinity in the document
    assert report._bucket(s["longest_ms"]["batch_processing"]) == "over 10,000"
    assert report._bucket(s["longest_ms"]["batch_wait"]) == "(5, 10]"
