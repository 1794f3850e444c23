"""One benchmark run: produce once, then L, F, E, latency and Redis costs, then clean up."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from kafka.errors import KafkaError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from bench import breakdown, latency, machine, profile, workload
from bench.deploy import BenchDeployment
from bench.engine import (
    BenchError,
    EngineResult,
    ProcessTree,
    Services,
    dead_letters,
    roles_cpu,
    run_engine,
)
from bench.limit import RateResult, run_limit
from bench.models import seed_serving_models
from stream.kafka import check_connection, end_offsets
from stream.redisconn import check_redis, redis_sync_client
from stream.settings import Settings, load_settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FLOOR_POLL_S = 0.2


@dataclass(frozen=True)
class Options:
    """What to run (the ``segstream bench`` options)."""

    events: int = 1_000_000
    customers: int = 100_000
    seed: int = 0
    skip_latency: bool = False
    workers: int = 1
    profile: bool = False
    latency_seconds: float = 15.0
    latency_eps: float = 5_000.0
    results_dir: Path = RESULTS_DIR
    #: "serving": seed the registry with trained models before each E run (bench.models)
    models: str = "serving"
    #: "wall": live event times advance with the wall clock (workload.at_wall_pace);
    #: "synthetic": they keep the generator's pace, days of event time per second
    live_event_time: str = "wall"


class Bars:
    """A rich progress display with one bar per step."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console,
            transient=False,
        )

    def add(self, label: str, total: int | None) -> TaskID:
        return self.progress.add_task(label, total=total, note="")

    def updater(self, task: TaskID) -> Any:
        start = time.monotonic()

        def update(done: int) -> None:
            el = time.monotonic() - start
            note = f"{done / el:,.0f}/s" if el > 0 else ""
            self.progress.update(task, completed=done, note=note)

        return update


def run_floor(dep: BenchDeployment, expect: int) -> tuple[RateResult, float | None]:
    """F: the trivial Faust agent in its own process until it counted ``expect`` records.

    Returns the rate and the floor's CPU seconds per million records (from its first
    batch to the last; None for a run over before the process was sampled twice).
    """
    s = dep.settings("floor")
    out = dep.workdir / "floor.json"
    proc = dep.spawn("bench.floor", s, "floor", BENCH_EXPECT=str(expect), BENCH_OUT=str(out))
    tree = ProcessTree([proc.pid])
    deadline = time.monotonic() + max(300.0, expect / 500)
    cpu0: float | None = None
    try:
        while True:
            if proc.poll() is not None:
                raise BenchError(f"Faust floor exited ({proc.returncode}):\n"
                                 f"{dep.log_tail('floor')}")
            if time.monotonic() > deadline:
                raise BenchError(f"Faust floor not done in time:\n{dep.log_tail('floor')}")
            time.sleep(FLOOR_POLL_S)
            cpu = tree.sample()
            if not out.exists():
                continue
            doc = orjson.loads(out.read_bytes())
            if cpu0 is None:
                cpu0 = cpu
            if doc["count"] >= expect:
                break
    finally:
        dep.stop(proc)
    res = RateResult(int(doc["count"]), int(doc["first_batch"]), float(doc["t_first"]),
                     float(doc["t_last"]))
    if cpu0 is None or cpu == cpu0:
        return res, None  # done before a second sample: no CPU interval was measured
    return res, (cpu - cpu0) / max(1, res.count - res.first_batch) * 1e6


def redis_memory(s: Settings, used_before: float) -> dict[str, Any]:
    """Memory of the engine's keys: ``used_memory`` delta and ``MEMORY USAGE`` of every key."""
    r = redis_sync_client(s)
    try:
        used_after = float(r.info("memory")["used_memory"])  # type: ignore[index]
        customers = 0
        scaled = 0  # keys of a partition ({pN}): state, profiles, sketches, outbox
        fixed = 0  # deployment-wide keys: the capped migrations log, models, CLV
        n_keys = 0
        batch: list[bytes] = []

        def flush() -> tuple[int, int]:
            pipe = r.pipeline(transaction=False)
            for k in batch:
                pipe.memory_usage(k, samples=0)
            sizes = [int(v or 0) for v in pipe.execute()]
            part = sum(n for k, n in zip(batch, sizes, strict=True) if b"}:" in k)
            return part, sum(sizes) - part

        for k in r.scan_iter(match=f"{s.redis_prefix}*", count=2000):
            n_keys += 1
            batch.append(k)
            if b"}:c:" in k:
                customers += 1
            if len(batch) >= 1000:
                a, b = flush()
                scaled, fixed = scaled + a, fixed + b
                batch = []
        if batch:
            a, b = flush()
            scaled, fixed = scaled + a, fixed + b
    finally:
        r.close()
    delta = used_after - used_before
    return {
        "customers_stored": customers,
        "keys": n_keys,
        "used_memory_delta_bytes": int(delta),
        "used_memory_bytes_per_customer": round(delta / max(1, customers), 1),
        "memory_usage_bytes_per_customer": round(scaled / max(1, customers), 1),
        "memory_usage_fixed_bytes": fixed,
        "method": "memory_usage_bytes_per_customer: the sum of MEMORY USAGE ... SAMPLES 0 "
                  "over every key of the run's partitions (they grow with customers) / "
                  "customers stored; memory_usage_fixed_bytes: the deployment-wide keys, "
                  "whose size does not grow with customers (the migrations log is capped); "
                  "used_memory_* is the server's INFO used_memory delta over the E run "
                  "(server-wide, so other clients add noise)",
    }


def _used_memory(s: Settings) -> float:
    r = redis_sync_client(s)
    try:
        return float(r.info("memory")["used_memory"])  # type: ignore[index]
    finally:
        r.close()


def _engine_json(e: EngineResult) -> dict[str, Any]:
    return {
        "workers": e.workers, "events_measured": e.events,
        "events_before_first_sample": e.events_before, "seconds": round(e.seconds, 2),
        "eps": round(e.eps, 1), "startup_s": round(e.startup_s, 2), "cpu_s": round(e.cpu_s, 2),
        "cpu_s_per_million_events": round(e.cpu_s_per_million_events, 1),
        # the worker processes alone (without the learners), and their CPU seconds per
        # second of the run per worker (every thread of the process counts)
        "worker_cpu_s": round(e.worker_cpu_s, 2),
        "worker_cpu_share": round(e.worker_cpu_s / max(1e-9, e.seconds * e.workers), 3),
        "rss_peak_mb": round(e.rss_peak_mb, 1),
        "redis_roundtrips": e.roundtrips, "redis_commands": e.commands,
        "models_serving_from_event": e.models_serving_from,
        "dead_letters": e.dead_letters,
        # CPU seconds per second of the run: the machine's cores, and who spent them
        "cpu_by_role": {k: round(v, 3) for k, v in e.cpu_by_role.items()},
        # each worker's own account of the run (batches, stages, sweeps) and its CPU per
        # record it processed, e.g. to see where a second worker's records cost more
        "per_worker": e.per_worker,
    }


def _run_more(dep: BenchDeployment, bars: Bars, opts: Options, role: str, workers: int,
              events: int, ends: dict[tuple[str, int], int], label: str) -> EngineResult:
    """Another E run on the same input (``role``: its own consumer group and keys)."""
    t = bars.add(label, events)
    s = dep.settings(role)
    if opts.models == "serving" and s.models_enabled:
        seed_serving_models(s)
    e = run_engine(dep, role, workers, events, progress=bars.updater(t), ends=ends)
    bars.progress.update(t, note=f"{e.eps:,.0f}/s")
    for p in e.procs:
        dep.stop(p)
    return e


def _forget_examples(dep: BenchDeployment) -> int | str:
    """:meth:`BenchDeployment.forget_examples`, or why it failed (a broker that refuses
    DeleteRecords: the next run's learners then also learn the examples before it)."""
    try:
        return dep.forget_examples()
    except KafkaError as exc:
        return f"not skipped: {exc!r}"


def scaling_json(e1: EngineResult, ek: EngineResult, again: EngineResult | str | None,
                 skipped: Sequence[int | str] = ()) -> dict[str, Any]:
    """The several-worker run against one worker: before it (E) and, when measured, right
    after it (``one_worker_again``; the error when that run failed), and against the mean
    of both; ``skipped``: the learner examples of the runs before each of the two, which
    its learners skipped (:func:`_forget_examples`)."""
    doc = {**_engine_json(ek), "ratio_vs_1": round(ek.eps / e1.eps, 3)}
    if skipped:
        doc["examples_skipped"] = skipped[0]
    if isinstance(again, str):
        doc["one_worker_again"] = {"error": again[-4000:]}
    elif again is not None:
        doc["one_worker_again"] = _engine_json(again)
        doc["ratio_vs_1_again"] = round(ek.eps / again.eps, 3)
        doc["ratio_vs_1_bracketed"] = round(ek.eps / ((e1.eps + again.eps) / 2), 3)
    if again is not None and len(skipped) > 1:
        doc["one_worker_again"]["examples_skipped"] = skipped[1]
    return doc


def _terminated(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(opts: Options, console: Console | None = None) -> dict[str, Any]:
    """Run the whole benchmark once; returns the JSON document (also written to a file)."""
    console = console or Console(stderr=True)
    # Retries while fresh topics elect leaders are expected; keep the bars readable.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = load_settings()
    # Both services answer before anything is built: a clean error at once, and no clean-up
    # of a run that never started waiting for an unreachable broker a second time.
    check_connection(base)
    check_redis(base)
    dep = BenchDeployment(base)
    bars = Bars(console)
    doc: dict[str, Any] = {}
    failed = True
    # A SIGTERM (a CI timeout, kill) ends the run through the clean-up below, as Ctrl-C
    # does: the run's topics, groups, keys and children are not left behind.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with bars.progress:
            t = bars.add("generate", opts.events)
            w = workload.build(opts.events, opts.customers, opts.seed, base.partitions,
                               bars.updater(t))
            bars.progress.update(t, completed=w.events)
            dep.create_topics()
            topics = dep.settings("engine")
            t = bars.add("produce", w.events)
            produce_eps = asyncio.run(workload.produce(topics, w, bars.updater(t)))

            t = bars.add("L limit", w.events)
            lim = asyncio.run(run_limit(dep.settings("limit"), w.events,
                                        progress=bars.updater(t)))
            bars.progress.update(t, note=f"{lim.eps:,.0f}/s")

            t = bars.add("F floor", None)
            flo, floor_cpu = run_floor(dep, w.events)
            bars.progress.update(t, total=flo.count, completed=flo.count,
                                 note=f"{flo.eps:,.0f}/s")

            es = dep.settings("engine")
            mem_before = _used_memory(es)
            t = bars.add("E engine", w.events)
            prof = opts.results_dir / f"{stamp}-engine.speedscope.json" if opts.profile else None
            if prof is not None:
                prof.parent.mkdir(parents=True, exist_ok=True)
            if opts.models == "serving" and es.models_enabled:
                seed_serving_models(es)
            ends = end_offsets(es, es.input_topics)
            e1 = run_engine(dep, "engine", 1, w.events, profile=prof, progress=bars.updater(t),
                            ends=ends)
            bars.progress.update(t, note=f"{e1.eps:,.0f}/s")
            mem = redis_memory(es, mem_before)

            lat: dict[str, latency.LatencyResult] = {}
            if not opts.skip_latency:
                loads = {"at_80pct_engine": max(1.0, 0.8 * e1.eps), "at_fixed": opts.latency_eps}
                need = {k: math.ceil(v * opts.latency_seconds) for k, v in loads.items()}
                live = workload.live_records(sum(need.values()), opts.customers,
                                             opts.seed + 7919, w.last_ts + 1, base.partitions)
                i, event_ms = 0, w.last_ts + 1
                for name, rate in loads.items():
                    t = bars.add(f"latency {rate:,.0f}/s", None)
                    # An overload's backlog drains at E's rate; give it time to.
                    drain = max(120.0, 2 * need[name] / max(1.0, e1.eps))
                    offered = live[i:i + need[name]]
                    if opts.live_event_time == "wall":
                        offered, event_ms = workload.at_wall_pace(offered, event_ms, rate)
                    url = dep.metrics_url(e1.procs[0])
                    token = es.api_token.get_secret_value() if es.api_token else None
                    before = breakdown.scrape(url, token)
                    dead0 = dead_letters(dep, es, e1.procs[:1])
                    tree, services = ProcessTree([e1.procs[0].pid]), Services(es)
                    cpu0, svc0 = tree.sample(), services.sample()
                    roots0, t0 = tree.roots_cpu(), time.monotonic()
                    lat[name] = asyncio.run(latency.measure(
                        es, offered, rate, opts.latency_seconds, drain))
                    # Where the machine's CPU went over the phase (its drain included):
                    # how close to a full core the worker ran at this load.
                    span = max(1e-9, time.monotonic() - t0)
                    cpu1, svc1 = tree.sample(), services.sample()
                    worker_s = tree.roots_cpu() - roots0
                    lat[name].extra["cpu_by_role"] = {
                        k: round(v / span, 3)
                        for k, v in roles_cpu(worker_s, cpu1 - cpu0 - worker_s, svc0,
                                              svc1).items()}
                    # The worker's own account of the phase: waiting before batches and
                    # processing them (its histograms, scraped before and after).
                    lat[name].extra["worker"] = breakdown.summary(
                        before, breakdown.scrape(url, token))
                    dead1 = dead_letters(dep, es, e1.procs[:1])
                    lat[name].extra["dead_letters"] = (
                        None if dead0 is None or dead1 is None else
                        {k: n - dead0.get(k, 0) for k, n in dead1.items() if n > dead0.get(k, 0)})
                    lat[name].extra["saturated"] = rate > e1.eps
                    i += need[name]
                    p = lat[name].latency_ms or {}
                    bars.progress.update(t, total=1, completed=1,
                                         note=f"p99 {p.get('p99', float('nan')):,.0f} ms "
                                              f"({lat[name].method})")
            for p in e1.procs:
                dep.stop(p)

            ek: EngineResult | None = None
            again: EngineResult | str | None = None
            skipped: list[int | str] = []
            if opts.workers > 1:
                # Every E run starts from an empty keyspace, as the first one did (a run's
                # keys make the next one's Redis rewrites larger).
                dep.forget_keys("engine")
                skipped = [_forget_examples(dep)]
                ek = _run_more(dep, bars, opts, f"engine{opts.workers}", opts.workers, w.events,
                               ends, f"E x{opts.workers}")
                # One worker again, right after: on a shared machine the speed drifts over
                # minutes, and E ran before the latency phases. The ratio against the mean
                # of both one-worker runs brackets the several-worker run in time. It only
                # adds to the result: a failure is reported in it, not raised.
                dep.forget_keys(f"engine{opts.workers}")
                skipped.append(_forget_examples(dep))
                try:
                    again = _run_more(dep, bars, opts, "engine-again", 1, w.events, ends,
                                      "E again")
                except BenchError as exc:
                    again = f"{exc}"
                    console.print(f"[yellow]E again failed: {exc}")

        doc = assemble(opts, w, produce_eps, lim, (flo, floor_cpu), e1, ek, lat, mem, base,
                       again, skipped)
        if e1.profile_path is not None and e1.profile_path.exists():
            # The speedscope file sits beside the result: its name, not this machine's path.
            doc["profile"] = {"path": e1.profile_path.name,
                              **profile.summarise(e1.profile_path),
                              "note": "py-spy --nonblocking at 100 Hz attached to the E "
                                      "worker; E figures of a profiled run are slightly low"}
        failed = False
    finally:
        signal.signal(signal.SIGTERM, previous)
        dep.cleanup(keep_logs=failed)
        if failed:
            console.print(f"[red]benchmark failed; child logs kept in {dep.workdir}")
    doc["run"] = dep.name
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["started_at"] = stamp
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    path = opts.results_dir / f"{stamp}.json"
    # Inside the repository the path is stored relative to it (results are committed).
    root = Path(__file__).resolve().parent.parent
    try:
        doc["results_file"] = str(path.resolve().relative_to(root))
    except ValueError:
        doc["results_file"] = str(path)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return doc


def assemble(opts: Options, w: workload.Workload, produce_eps: float, lim: RateResult,
             floor: tuple[RateResult, float | None], e1: EngineResult, ek: EngineResult | None,
             lat: dict[str, latency.LatencyResult], mem: dict[str, Any],
             base: Settings, again: EngineResult | str | None = None,
             skipped: Sequence[int | str] = ()) -> dict[str, Any]:
    """The result document: DESIGN's keys first, then the details."""
    flo, floor_cpu = floor
    fixed = lat.get("at_fixed")
    pct = ("p50", "p95", "p99")
    per_event = max(1, e1.events)
    doc: dict[str, Any] = {
        "limit_eps": round(lim.eps, 1),
        "faust_floor_eps": round(flo.eps, 1),
        "engine_eps": round(e1.eps, 1),
        "latency_ms": {k: (fixed.latency_ms or {}).get(k) if fixed else None for k in pct},
        "redis_roundtrips_per_event": round(e1.roundtrips / per_event, 4),
        "redis_bytes_per_customer": mem["memory_usage_bytes_per_customer"],
        "worker_rss_mb": round(e1.rss_peak_mb, 1),
        "machine": machine.describe(base),
        "events": w.events,
        "customers": opts.customers,
        "customers_seen": w.customers_seen,
        "events_by_topic": w.by_kind,
        "partitions": base.partitions,
        "batch_max": base.batch_max,
        "kafka_fetch_coalesce_ms": base.kafka_fetch_coalesce_ms,
        "seed": opts.seed,
        "models": opts.models,
        "produce_eps": round(produce_eps, 1),
        "cpu_s_per_million_events": round(e1.cpu_s_per_million_events, 1),
        "ratios": {
            "engine_over_limit": round(e1.eps / lim.eps, 4) if lim.eps else None,
            "engine_over_floor": round(e1.eps / flo.eps, 4) if flo.eps else None,
            "floor_over_limit": round(flo.eps / lim.eps, 4) if lim.eps else None,
        },
        "latency_method": fixed.method if fixed else None,
        "latency_event_time": opts.live_event_time if lat else None,
        "latency_offered_eps": opts.latency_eps if fixed else None,
        "latency_80pct_engine_ms": (
            {k: (lat["at_80pct_engine"].latency_ms or {}).get(k) for k in pct}
            if "at_80pct_engine" in lat else None),
        "latency": {k: v.to_json() for k, v in lat.items()},
        "redis_commands_per_event": round(e1.commands / per_event, 4),
        "redis": {
            **mem,
            "roundtrips_method": "client side: redis-py send_packed_command calls in the "
                                 "worker (one per command or per pipeline); commands: "
                                 "pack_command calls (a pipeline of n counts n)",
            "server_commands_per_event": round(
                e1.server["total_commands_processed"] / per_event, 4),
            "server_reads_per_event": round(e1.server["total_reads_processed"] / per_event, 4),
            "aof_rewrites_during_e": (int(e1.server["aof_rewrites"])
                                      if "aof_rewrites" in e1.server else None),
            "server_note": "server_* are INFO stats deltas of the whole Redis during E: they "
                           "include Lua-internal calls and every other client",
        },
        "engine": _engine_json(e1),
        "limit": {"events": lim.count, "seconds": round(lim.t_last - lim.t_first, 2)},
        "floor": {"events": flo.count, "seconds": round(flo.t_last - flo.t_first, 2),
                  "cpu_s_per_million_events": (
                      round(floor_cpu, 1) if floor_cpu is not None else None)},
    }
    if ek is not None:
        doc["scaling"] = scaling_json(e1, ek, again, skipped)
    return doc
