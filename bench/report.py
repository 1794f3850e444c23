"""The benchmark result as a rich table."""

from __future__ import annotations

import statistics
from typing import Any

from rich.table import Table


def _n(v: Any, fmt: str = ",.0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, int | float):
        return format(v, fmt)
    return str(v)


def _dead_note(dead: dict[str, int] | None) -> str:
    """The dead letters of a latency phase, when it had any."""
    if not dead:
        return ""
    return "; dead-lettered " + ", ".join(f"{n:,} {r}" for r, n in sorted(dead.items()))


def _cpu_roles(by_role: dict[str, float]) -> str:
    if not by_role:
        return "n/a"
    parts = ", ".join(_n(by_role.get(k), ".2f") if k in by_role else "n/a"
                      for k in ("worker", "learner", "broker", "redis", "redis_forks",
                                "steal", "rest"))
    return f"{_n(by_role.get('machine'), '.2f')}: {parts}"


def _worst_second(by_second: list[dict[str, float]]) -> str:
    """The median and the worst of the seconds' p99s (``bench.latency.by_second``)."""
    worst = max(by_second, key=lambda r: r["p99"])
    return (f"median {statistics.median(r['p99'] for r in by_second):,.0f} ms, "
            f"worst {worst['p99']:,.0f} ms (second {worst['second']:.0f})")


def _bucket(r: list[float | None] | None) -> str:
    """A histogram bucket (lower, upper] in ms, as ``breakdown.summary``'s ``longest_ms``."""
    if not r:
        return "-"
    lo, hi = r
    return f"over {lo:,g}" if hi is None else f"({lo:,g}, {hi:,g}]"


def _lat(d: dict[str, Any] | None) -> str:
    if not d or d.get("p50") is None:
        return "-"
    return f"{d['p50']:,.0f} / {d['p95']:,.0f} / {d['p99']:,.0f}"


def table(doc: dict[str, Any]) -> Table:
    """Every figure of a result document, with the E/L and E/F ratios."""
    t = Table("figure", "value", title=f"segstream bench: {doc['events']:,} events, "
              f"{doc['customers']:,} customers", title_justify="left")
    r = doc["ratios"]
    eng = doc["engine"]
    rows: list[tuple[str, str]] = [
        ("L limit (aiokafka getmany + orjson)", f"{_n(doc['limit_eps'])} ev/s"),
        ("F Faust floor (counting agent)", f"{_n(doc['faust_floor_eps'])} ev/s"),
        ("E engine (1 worker)", f"{_n(doc['engine_eps'])} ev/s"),
        ("E / L", _n(r["engine_over_limit"], ".1%")),
        ("E / F", _n(r["engine_over_floor"], ".1%")),
        ("F / L", _n(r["floor_over_limit"], ".1%")),
    ]
    served = eng.get("models_serving_from_event")
    if "models_serving_from_event" in eng:
        rows.append(("E: online models serving",
                     "not during E (churn and propensity scores null)" if served is None
                     else f"from input record {served:,} of {doc['events']:,}"))
    if "dead_letters" in eng:
        dead = eng["dead_letters"]
        rows.append(("E: input records dead-lettered",
                     "- (worker metrics not read)" if dead is None else
                     ", ".join(f"{n:,} {reason}" for reason, n in sorted(dead.items()))
                     or "none"))
    if "scaling" in doc:
        sc = doc["scaling"]
        rows.append((f"E with {sc['workers']} workers",
                     f"{_n(sc['eps'])} ev/s (x{sc['ratio_vs_1']:.2f} vs 1)"))
        if "error" in sc.get("one_worker_again", {}):
            rows.append(("E with 1 worker again, after it",
                         f"failed: {sc['one_worker_again']['error'][-200:]}"))
        elif "one_worker_again" in sc:
            rows.append(("E with 1 worker again, after it",
                         f"{_n(sc['one_worker_again']['eps'])} ev/s: "
                         f"x{sc['ratio_vs_1_again']:.2f} vs it, "
                         f"x{sc['ratio_vs_1_bracketed']:.2f} vs the mean of both"))
    method = doc.get("latency_method") or "skipped"
    if doc.get("latency_event_time"):
        method += f"; live event time: {doc['latency_event_time']}"
    rows += [
        (f"latency p50/p95/p99 at {_n(doc.get('latency_offered_eps'))} ev/s",
         f"{_lat(doc['latency_ms'])} ms ({method})"),
        ("latency p50/p95/p99 at 80% of E", f"{_lat(doc.get('latency_80pct_engine_ms'))} ms"),
    ]
    for name, lat in doc.get("latency", {}).items():
        rows.append((f"  {name}: offered/achieved, unprocessed",
                     f"{_n(lat['offered_eps'])}/{_n(lat['achieved_eps'])} ev/s, "
                     f"{lat['unprocessed']}; watermark {_lat(lat['watermark_ms'])} ms; "
                     f"migrations {lat['migrations']} ({lat['migrations_with_trigger']} "
                     "with trigger)" + _dead_note(lat.get("dead_letters"))))
        for key, what in (("watermark_by_second", "watermark p99 by second of the phase"),
                          ("ack_by_second", "broker acknowledgement p99 by second")):
            by_second = lat.get(key)
            if by_second:
                rows.append((f"  {name}: {what}", _worst_second(by_second)))
        roles = lat.get("cpu_by_role")
        if roles:
            rows.append((f"  {name}: CPU s per second (machine: worker, learner, broker, "
                         "Redis, Redis's forks, steal, rest)", _cpu_roles(roles)))
        own = lat.get("load_generator_gc")
        if own:
            rows.append((f"  {name}: load generator's garbage collections",
                         f"{own['collections']:,}, longest {own['pause_ms_max']:,.1f} ms"))
        w = lat.get("worker")
        if w:
            rows.append((f"  {name}: worker batches (p50/p95/p99)",
                         f"{w['batches']:,} of {w['mean_batch_records']:,.0f} records on "
                         f"average; waited {_lat(w['batch_wait_ms'])} ms before starting, "
                         f"processed in {_lat(w['batch_processing_ms'])} ms"))
            stages = w.get("stages")
            if stages:
                rows.append((f"  {name}: batch stages, mean per batch (p99) ms",
                             "; ".join(f"{k} {v['mean_ms']:,.1f} ({_n(v['p99_ms'], ',.1f')})"
                                       for k, v in stages.items())))
            gc = w.get("gc")
            if gc:
                rows.append((f"  {name}: garbage collections (full)",
                             f"{gc['collections']:,} ({gc['full_collections']:,}), "
                             f"{gc['pause_ms_total']:,.1f} ms in all, p99 "
                             f"{_n(gc['pause_p99_ms'], '.2f')} ms"))
            top = w.get("longest_ms")
            if top:
                rows.append((f"  {name}: the longest of each, in the bucket (ms)",
                             "; ".join(f"{k} {_bucket(v)}" for k, v in top.items())))
            sw = w.get("sweeps")
            if sw:
                rows.append((f"  {name}: timer sweeps (steps; customers)",
                             f"{sw['steps']:,}; {sw['customers']:,}; held the worker "
                             f"{sw['held_ms_total']:,.1f} ms in all, step p99 "
                             f"{_n(sw['step_p99_ms'], '.1f')} ms"))
    red = doc["redis"]
    rows += [
        ("Redis round trips / event (client side)", _n(doc["redis_roundtrips_per_event"], ".4f")),
        ("Redis commands / event (client side)", _n(doc["redis_commands_per_event"], ".4f")),
        ("Redis commands / event (server, shared)", _n(red["server_commands_per_event"], ".4f")),
        ("Redis bytes / customer (used_memory delta)",
         _n(red["used_memory_bytes_per_customer"])),
        ("Redis bytes / customer (MEMORY USAGE of partition keys)",
         _n(red["memory_usage_bytes_per_customer"])),
        ("Redis fixed bytes (log, models; not per customer)",
         _n(red.get("memory_usage_fixed_bytes", 0))),
        ("Redis AOF rewrites during E (server, shared)", _n(red.get("aof_rewrites_during_e"))),
        ("worker peak RSS", f"{_n(doc['worker_rss_mb'], ',.1f')} MB"),
        ("worker CPU s / million events (E; F)",
         f"{_n(doc['cpu_s_per_million_events'], ',.1f')}; "
         f"{_n(doc['floor'].get('cpu_s_per_million_events'), ',.1f')}"),
        ("E worker alone: CPU s / million events; CPU s per second",
         f"{_n(eng.get('worker_cpu_s', 0) / max(1, eng['events_measured']) * 1e6, ',.1f')}; "
         f"{_n(eng.get('worker_cpu_share', 0), '.2f')}"),
        ("E: CPU s per second (machine: worker, learner, broker, Redis, Redis's forks, "
         "steal, rest)",
         _cpu_roles(eng.get("cpu_by_role") or {})),
        ("worker start-up to first commit", f"{_n(eng['startup_s'], '.1f')} s"),
        ("producer", f"{_n(doc['produce_eps'])} ev/s"),
    ]
    m = doc["machine"]
    rows.append(("machine", f"{m['cpu']}, {m['cores_available']} cores, {m['ram_gb']} GB, "
                            f"load {m['load_avg_1m']}, Python {m['python']}, Kafka {m['kafka']},"
                            f" Redis {m['redis']}, git {m['git_commit']}, hot-path modules "
                            f"{m.get('native_modules', 'from source')}"))
    for row in rows:
        t.add_row(*row)
    for f in doc.get("profile", {}).get("top_self", []):
        t.add_row(f"  profile: self {f['self_pct']:.1f}%", f"{f['function']}  {f['file']}")
    for f in doc.get("profile", {}).get("project_top_total", []):
        t.add_row(f"  profile: total {f['total_pct']:.1f}%", f"{f['function']}  {f['file']}")
    t.caption = f"results: {doc.get('results_file', '-')}"
    return t
