"""``segstream bench`` end to end at a small size on the real broker and Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from stream.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DESIGN_KEYS = ("limit_eps", "faust_floor_eps", "engine_eps", "redis_roundtrips_per_event",
               "redis_bytes_per_customer", "worker_rss_mb")


def _bench_cmd() -> list[str]:
    """``segstream bench`` once the main CLI registers it, else the same command alone."""
    from stream.cli import app

    names = {c.name or (c.callback.__name__ if c.callback else "")
             for c in app.registered_commands}
    if "bench" in names:
        return [sys.executable, "-m", "stream.cli", "bench"]
    return [sys.executable, "-m", "bench"]


def test_small_bench_reports_every_figure(services: dict[str, str], tmp_path: Path) -> None:
    env = dict(os.environ, SEGSTREAM_KAFKA_BOOTSTRAP=services["kafka"],
               SEGSTREAM_REDIS_URL=services["redis"], PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [*_bench_cmd(), "--events", "20000", "--customers", "2000", "--latency-seconds", "3",
         "--latency-eps", "1000", "--json", "--results-dir", str(tmp_path)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)

    for key in DESIGN_KEYS:
        assert isinstance(doc[key], int | float) and doc[key] > 0, (key, doc[key])
    for p in ("p50", "p95", "p99"):
        assert doc["latency_ms"][p] > 0, doc["latency_ms"]
    assert doc["latency_ms"]["p50"] <= doc["latency_ms"]["p95"] <= doc["latency_ms"]["p99"]
    assert doc["latency_method"] in ("migration_trigger", "watermark")
    assert doc["latency"]["at_fixed"]["unprocessed"] == 0
    assert doc["latency_event_time"] == "wall"
    # The worker's own histograms account for exactly the records offered in each phase.
    for name, lat in doc["latency"].items():
        w = lat["worker"]
        assert w["records"] == lat["produced"] and w["batches"] > 0, (name, w, lat)
        assert lat["dead_letters"] == {}, (name, lat["dead_letters"])
        for part in ("batch_wait_ms", "batch_processing_ms"):
            q = w[part]
            assert 0 <= q["p50"] <= q["p95"] <= q["p99"], (name, part, q)
            # the bucket of the longest lies at or past the p99's
            lo, hi = w["longest_ms"][part.removesuffix("_ms")]
            assert hi is None or (lo < hi and hi >= q["p99"]), (name, part, w["longest_ms"], q)
        assert w["longest_ms"]["event_loop_lag"] is not None, (name, w["longest_ms"])
        # Every processed record falls in one second of the phase; the load generator's
        # collector stayed paused while it offered (its pauses stalled the producer).
        seconds = lat["watermark_by_second"]
        assert sum(r["n"] for r in seconds) == lat["produced"] - lat["unprocessed"], name
        assert max(r["max"] for r in seconds) == lat["watermark_ms"]["max"], name
        assert lat["load_generator_gc"]["collections"] == 0, (name, lat["load_generator_gc"])
        # The phase's CPU by role: the worker ran, and no role used more than the machine.
        roles = lat["cpu_by_role"]
        assert roles["worker"] > 0 and roles["machine"] > 0, (name, roles)
        assert all(v <= roles["machine"] + 0.05 for k, v in roles.items()
                   if k not in ("machine", "rest")), (name, roles)
        # Every record batch sent was acknowledged, in the seconds the records were sent in.
        acks = lat["ack_by_second"]
        assert acks and all(r["p50"] >= 0 for r in acks), (name, acks)
        assert {r["second"] for r in acks} <= {r["second"] for r in seconds}, (name, acks)
    for key in ("cpu", "cores_logical", "ram_gb", "python", "kafka", "redis", "git_commit"):
        assert doc["machine"][key], key
    assert doc["events"] == 20000 and doc["customers"] == 2000
    assert sum(doc["events_by_topic"].values()) == 20000
    assert 0.7 < doc["events_by_topic"]["clickstream"] / 20000 < 0.9
    assert doc["cpu_s_per_million_events"] > 0
    assert doc["ratios"]["engine_over_limit"] > 0 and doc["ratios"]["engine_over_floor"] > 0
    assert doc["engine"]["events_measured"] > 0
    assert doc["engine"]["dead_letters"] == {}, "the benchmark's own input is all valid"
    # The worker's own account of E: the records of its batches cover what E measured (its
    # metrics are read before the watermarks E starts from; a record fetched again after
    # the consumer group's first rebalance counts twice), but for one batch: a batch is
    # counted once evaluated, and its commit may still be under way in the background
    # when the watermarks are read. Its CPU per record is the worker's CPU over them.
    (own,) = doc["engine"]["per_worker"]
    assert own["records"] >= doc["engine"]["events_measured"] - load_settings().batch_max, own
    assert own["batches"] > 0 and own["stages"]["evaluate"]["mean_ms"] > 0, own
    assert 0 < own["cpu_us_per_record"] <= doc["engine"]["worker_cpu_s"] / own["records"] \
        * 1e6 * 1.5, own
    # The worker alone (its learner child excluded) is part of the engine's CPU.
    assert 0 < doc["engine"]["worker_cpu_s"] <= doc["engine"]["cpu_s"]
    assert doc["engine"]["worker_cpu_share"] > 0
    # Where the machine's CPU went during E: the broker and Redis the project started run
    # here, and what the processes spent fits in what the cores spent (sampled a moment
    # apart, hence the slack) and in the cores there are.
    roles = doc["engine"]["cpu_by_role"]
    assert {"machine", "worker", "learner", "broker", "redis", "steal", "rest"} <= set(roles), \
        roles
    assert roles["worker"] > 0 and roles["broker"] > 0 and roles["redis"] > 0, roles
    assert all(v >= 0 for v in roles.values()), roles
    spent = sum(v for k, v in roles.items() if k not in ("machine", "rest"))
    assert spent <= roles["machine"] * 1.1 + 0.05, roles
    assert roles["machine"] <= doc["machine"]["cores_logical"] * 1.05, roles
    assert doc["machine"]["native_modules"]
    # Redis' forks (AOF rewrites) are counted apart; the project's Redis rewrites rarely.
    assert roles.get("redis_forks", -1) >= 0, roles
    assert doc["machine"]["redis_persistence"] == {
        "appendonly": "yes", "auto_aof_rewrite_percentage": "800"}
    assert isinstance(doc["redis"]["aof_rewrites_during_e"], int)
    assert doc["redis"]["aof_rewrites_during_e"] >= 0
    # Trained models were in the registry before the E worker committed anything.
    assert doc["models"] == "serving" and doc["engine"]["models_serving_from_event"] == 0
    # Every round trip carries at least one command (both counters see the engine's client).
    assert doc["redis_commands_per_event"] >= doc["redis_roundtrips_per_event"] > 0
    # The capped migrations log and the models are reported apart from per-customer bytes.
    assert doc["redis"]["memory_usage_fixed_bytes"] > 0

    written = list(tmp_path.glob("*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["engine_eps"] == \
        doc["engine_eps"]

    # Everything the run created is gone again.
    import redis
    from kafka import KafkaAdminClient

    name = doc["run"]
    r = redis.from_url(services["redis"])
    try:
        assert not list(r.scan_iter(match=f"{name}*", count=1000))
    finally:
        r.close()
    admin = KafkaAdminClient(bootstrap_servers=services["kafka"])
    try:
        assert not [t for t in admin.list_topics() if t.startswith(name)]
    finally:
        admin.close()


def test_a_small_run_of_many_events_per_customer_measures_the_engine(
        services: dict[str, str], tmp_path: Path) -> None:
    # 667 events per customer take eleven years of synthetic time: from the generator's
    # default start they reached past the wall clock, and E dead-lettered most of them.
    # (E is timed between progress samples 0.1 s apart: 3,000 events, two batches, are
    # too few to time, and the benchmark says so.)
    env = dict(os.environ, SEGSTREAM_KAFKA_BOOTSTRAP=services["kafka"],
               SEGSTREAM_REDIS_URL=services["redis"], PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [*_bench_cmd(), "--events", "20000", "--customers", "30", "--skip-latency", "--json",
         "--results-dir", str(tmp_path)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    assert doc["limit"]["events"] == 20000
    assert doc["limit_eps"] > 0 and doc["ratios"]["engine_over_limit"] > 0, doc["limit"]
    cpu = doc["floor"]["cpu_s_per_million_events"]
    assert cpu is None or cpu > 0, doc["floor"]
    assert doc["engine"]["dead_letters"] == {}, doc["engine"]


def test_two_workers_are_measured_between_two_runs_of_one(
        services: dict[str, str], tmp_path: Path) -> None:
    env = dict(os.environ, SEGSTREAM_KAFKA_BOOTSTRAP=services["kafka"],
               SEGSTREAM_REDIS_URL=services["redis"], PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [*_bench_cmd(), "--events", "30000", "--customers", "3000", "--skip-latency",
         "--workers", "2", "--json", "--results-dir", str(tmp_path)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    sc, e1 = doc["scaling"], doc["engine"]
    again = sc["one_worker_again"]
    assert (sc["workers"], e1["workers"], again["workers"]) == (2, 1, 1)
    for run in (e1, sc, again):
        # each run measured the same input, all of it but what came before its first
        # progress sample (two workers on two cores may commit a third of this small
        # input before it), and rejected none of it
        assert 0 < run["events_measured"] <= doc["events"], run
        assert run["events_measured"] + run["events_before_first_sample"] >= doc["events"], run
        assert run["eps"] > 0 and run["dead_letters"] == {}, run
    # A worker that got no batch has no account (at this size the first worker to join
    # may take every partition's records before the second one has any).
    accounts = [w for w in sc["per_worker"] if w is not None]
    assert len(sc["per_worker"]) == 2 and accounts, sc["per_worker"]
    assert sum(w["records"] for w in accounts) >= sc["events_measured"], accounts
    assert sc["ratio_vs_1"] == round(sc["eps"] / e1["eps"], 3)
    assert sc["ratio_vs_1_again"] == round(sc["eps"] / again["eps"], 3)
    mean = (e1["eps"] + again["eps"]) / 2
    assert abs(sc["ratio_vs_1_bracketed"] - sc["eps"] / mean) < 0.002, sc
    # the later runs' learners were moved past the examples of the runs before them (at
    # this size E may have published next to none)
    skipped = (sc["examples_skipped"], again["examples_skipped"])
    assert all(isinstance(n, int) for n in skipped) and sum(skipped) > 0, skipped


def test_the_limit_times_a_run_that_fits_in_one_fetch(services: dict[str, str]) -> None:
    # L is timed from its first fetch to its last: 3,000 records fit in one fetch of
    # 10,000, which left nothing timed and reported 0 events/s.
    import asyncio

    from bench import workload
    from bench.deploy import BenchDeployment
    from bench.limit import run_limit
    from stream.settings import load_settings

    base = load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"])
    dep = BenchDeployment(base)
    try:
        dep.create_topics()
        w = workload.build(3000, 500, 0, base.partitions)
        asyncio.run(workload.produce(dep.settings("engine"), w))
        res = asyncio.run(run_limit(dep.settings("limit"), w.events, timeout=120))
    finally:
        dep.cleanup()
    assert res.count == 3000
    assert res.first_batch < res.count and res.eps > 0, res


def test_seeded_serving_models_are_what_the_engine_scores_with(services: dict[str, str]
                                                               ) -> None:
    import asyncio
    import uuid

    import redis

    from bench.models import seed_serving_models
    from features.store import RedisFeatureStore
    from stream.redisconn import redis_client
    from stream.runtime import ScoringRuntime
    from stream.settings import load_settings

    s = load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                      redis_prefix=f"seed-{uuid.uuid4().hex[:8]}:")
    try:
        assert seed_serving_models(s) == {"churn": 1, "purchase_7d": 1, "cluster": 1, "clv": 1}

        async def load() -> ScoringRuntime:
            r = redis_client(s)
            try:
                rt = ScoringRuntime(s, r, RedisFeatureStore(r, s.redis_prefix))
                await rt.refresh(force=True)
                return rt
            finally:
                await r.aclose()

        rt = asyncio.run(load())
        assert set(rt.models) == {"churn", "purchase_7d"}
        assert rt.personas is not None and rt.clv is not None and rt.clv.version == 1
        x = {"events_30d": 3.0}
        for model in rt.models.values():
            assert 0.0 <= model.predict_many([x])[0] <= 1.0  # trained: a probability
    finally:
        r = redis.from_url(s.redis_url)
        keys = list(r.scan_iter(match=f"{s.redis_prefix}*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()


def test_a_later_run_s_learners_skip_the_examples_of_the_runs_before(
        services: dict[str, str]) -> None:
    from kafka.structs import TopicPartition

    from bench.deploy import BenchDeployment
    from stream.kafka import consumer, producer
    from stream.settings import load_settings

    dep = BenchDeployment(load_settings(kafka_bootstrap=services["kafka"],
                                        redis_url=services["redis"]))
    try:
        dep.create_topics()
        s = dep.settings("engine")
        assert dep.forget_examples() == 0  # nothing to skip yet
        p = producer(s)
        try:
            for i in range(37):
                p.send(s.examples_topic, key=f"c{i}".encode(), value=b"{}")
            p.flush()
        finally:
            p.close()
        assert dep.forget_examples() == 37
        assert dep.forget_examples() == 0  # already past them
        # A new consumer group from the earliest offset (as a later run's learner) reads none
        # of them, and does read what comes after.
        p = producer(s)
        try:
            p.send(s.examples_topic, key=b"late", value=b"{}")
            p.flush()
        finally:
            p.close()
        c = consumer(s, group_id=f"{dep.name}-check", auto_offset_reset="earliest",
                     enable_auto_commit=False)
        try:
            parts = c.partitions_for_topic(s.examples_topic) or set()
            c.assign([TopicPartition(s.examples_topic, q) for q in parts])
            got: list[bytes] = []
            for _ in range(20):
                for recs in c.poll(timeout_ms=500).values():
                    got += [r.key for r in recs]
                if got:
                    break
        finally:
            c.close()
        assert got == [b"late"]
    finally:
        dep.cleanup()
