"""Where a latency phase's time went inside the worker, from its own ``/metrics``.

The end-to-end latency of ``segstream bench`` runs from an input record's Kafka timestamp
to the migration's. Inside it, the worker's histograms tell apart what happened before
processing started (``segstream_batch_wait_seconds``: from the batch's oldest record's
timestamp to the start of the batch, so the produce, the fetch, the wait behind the
previous batch and the gathering) from the processing itself (``segstream_batch_seconds``:
load, evaluate, commit, publish). The worker is scraped before and after a phase; the
difference of the cumulative buckets is that phase's distribution, and its quantiles are
estimated as Prometheus' ``histogram_quantile`` does (linear within the bucket).

>>> histogram_quantile(0.5, [(0.01, 2.0), (0.02, 6.0), (float("inf"), 8.0)])
0.015
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: histogram families read, without the ``segstream_`` prefix
FAMILIES = ("batch_wait_seconds", "batch_seconds", "batch_size")
#: read when the worker has them: garbage-collection pauses (summed over generations),
#: the stages of a batch (one histogram per stage, as ``batch_stage_seconds:<stage>``), the
#: timer-sweep steps, the customers they re-evaluated (a counter: its value in ``sum``), and
#: the event loop's lag behind its timer
OPTIONAL = ("gc_pause_seconds", "batch_stage_seconds", "sweep_step_seconds", "sweep_customers",
            "event_loop_lag_seconds")
STAGES = ("decode", "refresh", "load", "evaluate", "publish_wait", "commit", "publish")

def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` ((upper bound, cumulative count),
    ascending), interpolated linearly within the
    bucket that holds it (the lowest bucket from 0); None without observations. A
    quantile in the ``+Inf`` bucket is the largest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def longest(buckets: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """The bucket (lower bound, upper bound] holding the largest observation of cumulative
    ``buckets``, None without observations: a p99 over many batches does not show one
    stall that only one or two batches met, this does.

    >>> longest([(0.01, 2.0), (0.02, 2.0), (0.05, 3.0), (float("inf"), 3.0)])
    (0.02, 0.05)
    >>> longest([(0.01, 0.0), (float("inf"), 0.0)]) is None
    True
    """
    lower, below, found = 0.0, 0.0, None
    for bound, count in buckets:
        if count > below:
            found = (lower, bound)
        lower, below = bound, count
    return found


def _range_ms(buckets: Sequence[tuple[float, float]]) -> list[float | None] | None:
    """:func:`longest` in ms; an upper bound past the last bucket is None, as JSON has no
    infinity (``[10000.0, None]``: over 10 s)."""
    top = longest(buckets)
    if top is None:
        return None
    lo, hi = top
    return [round(lo * 1000, 2), None if math.isinf(hi) else round(hi * 1000, 2)]


def parse(text: str, prefix: str = "segstream_") -> dict[str, dict[str, Any]]:
    """The :data:`FAMILIES` and :data:`OPTIONAL` histograms of a scrape: buckets, sum and
    count of each, summed over their labels (as ``sum by (le)``); ``full`` counts the
    observations labelled ``generation="2"``.

    >>> h = parse("# TYPE segstream_gc_pause_seconds histogram\\n"
    ...           'segstream_gc_pause_seconds_bucket{generation="0",le="0.01"} 3.0\\n'
    ...           'segstream_gc_pause_seconds_bucket{generation="2",le="0.01"} 1.0\\n'
    ...           'segstream_gc_pause_seconds_count{generation="2"} 1.0\\n')
    >>> h["gc_pause_seconds"]["buckets"], h["gc_pause_seconds"]["full"]
    ([(0.01, 4.0)], 1.0)
    """
    out: dict[str, dict[str, Any]] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name.removeprefix(prefix)
        if name not in FAMILIES and name not in OPTIONAL:
            continue
        found: dict[str, tuple[dict[float, float], dict[str, Any]]] = {}
        for s in fam.samples:
            key = f"{name}:{s.labels.get('stage')}" if name == "batch_stage_seconds" else name
            buckets, h = found.setdefault(
                key, ({}, {"buckets": [], "sum": 0.0, "count": 0.0, "full": 0.0}))
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + float(s.value)
            elif s.name.endswith(("_sum", "_total")):
                h["sum"] += float(s.value)
            elif s.name.endswith("_count"):
                h["count"] += float(s.value)
                if s.labels.get("generation") == "2":
                    h["full"] += float(s.value)
        if not found and name in FAMILIES:
            found[name] = ({}, {"buckets": [], "sum": 0.0, "count": 0.0, "full": 0.0})
        for key, (buckets, h) in found.items():
            h["buckets"] = sorted(buckets.items())
            out[key] = h
        if name == "gc_pause_seconds" and not found:
            out[name] = {"buckets": [], "sum": 0.0, "count": 0.0, "full": 0.0}
    return out


def _sweeps(before: dict[str, dict[str, Any]] | None, after: dict[str, dict[str, Any]]
            ) -> dict[str, Any] | None:
    """The timer-sweep steps between two scrapes: how many, the customers they
    re-evaluated, and how long they held the worker (total and p99 of a step, in ms)."""
    if "sweep_step_seconds" not in after:
        return None
    h = _delta((before or {}).get("sweep_step_seconds"), after["sweep_step_seconds"])
    customers = after.get("sweep_customers", {}).get("sum", 0.0) - (
        (before or {}).get("sweep_customers", {}).get("sum", 0.0))
    top = histogram_quantile(0.99, h["buckets"])
    return {"steps": round(h["count"]), "customers": round(customers),
            "held_ms_total": round(h["sum"] * 1000, 1),
            "step_p99_ms": None if top is None else round(top * 1000, 1)}


def _metrics_text(url: str, token: str | None, timeout: float) -> str | None:
    """The worker's ``/metrics`` at ``url``; None if it cannot be read."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def scrape(url: str, token: str | None = None, timeout: float = 5.0
           ) -> dict[str, dict[str, Any]] | None:
    """:func:`parse` of the worker's ``/metrics`` at ``url``; None if it cannot be read."""
    text = _metrics_text(url, token, timeout)
    return parse(text) if text is not None else None


def counter_by_label(url: str, name: str, label: str, token: str | None = None,
                     timeout: float = 5.0) -> dict[str, float] | None:
    """A counter of the worker's ``/metrics`` at ``url`` by one label (``name`` without the
    ``segstream_`` prefix and the ``_total`` suffix); None if it cannot be read.

    >>> counter_by_label("http://127.0.0.1:9/metrics", "dlq_records", "reason") is None
    True
    """
    text = _metrics_text(url, token, timeout)
    if text is None:
        return None
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != f"segstream_{name}":
            continue
        for smp in fam.samples:
            if smp.name.endswith("_total"):
                key = smp.labels.get(label, "")
                out[key] = out.get(key, 0.0) + float(smp.value)
    return out


def _delta(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    if before is None:
        return after
    old = dict(before["buckets"])
    return {"buckets": [(b, c - old.get(b, 0.0)) for b, c in after["buckets"]],
            "sum": after["sum"] - before["sum"], "count": after["count"] - before["count"],
            "full": after.get("full", 0.0) - before.get("full", 0.0)}


def summary(before: dict[str, dict[str, Any]] | None, after: dict[str, dict[str, Any]] | None
            ) -> dict[str, Any] | None:
    """What the worker did between two scrapes: batches, mean records per batch, and
    p50/p95/p99 of the wait before a batch and of its processing, in ms."""
    if after is None or any(f not in after for f in FAMILIES):
        return None
    d = {f: _delta((before or {}).get(f), after[f]) for f in FAMILIES}
    batches = round(d["batch_seconds"]["count"])
    if batches <= 0:
        return None

    def ms(name: str) -> dict[str, float | None]:
        qs = {f"p{int(q * 100)}": histogram_quantile(q, d[name]["buckets"])
              for q in (0.5, 0.95, 0.99)}
        return {k: None if v is None else round(v * 1000, 1) for k, v in qs.items()}

    out: dict[str, Any] = {
        "batches": batches,
        "records": round(d["batch_size"]["sum"]),
        "mean_batch_records": round(d["batch_size"]["sum"] / batches, 1),
        "batch_wait_ms": ms("batch_wait_seconds"),
        "batch_processing_ms": ms("batch_seconds"),
        "mean_batch_processing_ms": round(d["batch_seconds"]["sum"] / batches * 1000, 1),
    }
    # The bucket of the longest of each, in ms ((lower, upper]; upper None past the last).
    longest_ms: dict[str, list[float | None] | None] = {
        "batch_wait": _range_ms(d["batch_wait_seconds"]["buckets"]),
        "batch_processing": _range_ms(d["batch_seconds"]["buckets"]),
    }
    if "event_loop_lag_seconds" in after:
        lag = _delta((before or {}).get("event_loop_lag_seconds"),
                     after["event_loop_lag_seconds"])
        longest_ms["event_loop_lag"] = _range_ms(lag["buckets"])
    stages = {}
    for name in STAGES:
        key = f"batch_stage_seconds:{name}"
        if key not in after:
            continue
        h = _delta((before or {}).get(key), after[key])
        if h["count"] <= 0:
            continue
        top = histogram_quantile(0.99, h["buckets"])
        stages[name] = {"mean_ms": round(h["sum"] / batches * 1000, 2),
                        "p99_ms": None if top is None else round(top * 1000, 1)}
        longest_ms[name] = _range_ms(h["buckets"])
    if stages:
        out["stages"] = stages
    if "gc_pause_seconds" in after:
        gc = _delta((before or {}).get("gc_pause_seconds"), after["gc_pause_seconds"])
        top = histogram_quantile(0.99, gc["buckets"])
        out["gc"] = {"collections": round(gc["count"]), "full_collections": round(gc["full"]),
                     "pause_ms_total": round(gc["sum"] * 1000, 1),
                     "pause_p99_ms": None if top is None else round(top * 1000, 2)}
    sweeps = _sweeps(before, after)
    if sweeps is not None:
        out["sweeps"] = sweeps
    out["longest_ms"] = longest_ms
    return out
