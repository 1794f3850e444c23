"""The ``segstream`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from stream import queries, redact
from stream.cli_bench import bench
from stream.cli_rules import rules_app
from stream.cli_triggers import triggers
from stream.errors import SegstreamError
from stream.redisconn import redacted_url, redis_failed
from stream.settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="segstream: real-time streaming customer segmentation.")
replay_app = typer.Typer(no_args_is_help=True, help="Produce events into the input topics.")
app.add_typer(replay_app, name="replay")
clv_app = typer.Typer(no_args_is_help=True, help="Customer lifetime value models.")
app.add_typer(clv_app, name="clv")
app.add_typer(rules_app, name="rules")
app.command("triggers")(triggers)
app.command("bench")(bench)
err = Console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def _until_day(value: str | None) -> str | None:
    """An ``--until`` date as YYYY-MM-DD (CDNOW's own YYYYMMDD is accepted too)."""
    if value is None:
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}|\d{8}", value):
            return date.fromisoformat(value).isoformat()
    except ValueError:
        pass
    raise typer.BadParameter(f"{value!r} is not a date: expected YYYY-MM-DD, e.g. 1997-10-01")


def _finite_rate(value: float | None) -> float | None:
    """A ``--rate`` that is a number of events per second (``inf`` would mean unthrottled)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number of events per second (got {value})")
    return value


def _settings() -> Settings:
    return load_settings()


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")


@app.command()
def up(json_: JsonOpt = False) -> None:
    """Start (or reuse) local Kafka and Redis and wait until both answer."""
    from stream import services

    s = _settings()
    done = services.up(s)
    if json_:
        _print_json({"kafka": {"bootstrap": s.kafka_bootstrap, "action": done["kafka"]},
                     "redis": {"url": redacted_url(s.redis_url), "action": done["redis"]}})
        return
    err.print(escape(f"kafka  {s.kafka_bootstrap}  ({done['kafka']})"))
    err.print(escape(f"redis  {redacted_url(s.redis_url)}  ({done['redis']})"))


@app.command()
def down() -> None:
    """Stop the local services that `up` started (never ones it reused)."""
    from stream import services

    stopped = services.down(_settings())
    for name, was in stopped.items():
        err.print(f"{name}: {'stopped' if was else 'not started by segstream'}")


@app.command()
def status(json_: JsonOpt = False) -> None:
    """Health of Kafka and Redis, and the worker API address."""
    from stream import services

    s = _settings()
    h = services.diagnose(s)
    doc: dict[str, Any] = {
        "kafka": {"bootstrap": s.kafka_bootstrap, "healthy": h.kafka},
        "redis": {"url": redacted_url(s.redis_url), "healthy": h.redis},
        "api": s.api_url}
    for name, why in (("kafka", h.kafka_reason), ("redis", h.redis_reason)):
        if why:
            doc[name]["reason"] = why
    if json_:
        _print_json(doc)
    else:
        out = Console()  # the report is the command's output: stdout, as segments' table
        for name in ("kafka", "redis"):
            ok, why = doc[name]["healthy"], doc[name].get("reason")
            out.print(f"{name}: {'[green]healthy' if ok else '[red]down'}"
                      + (f" ({escape(why)})" if why else ""))
        out.print(f"api: {escape(str(doc['api']))}")
    if not (h.kafka and h.redis):
        raise typer.Exit(1)


@app.command()
def worker() -> None:
    """Run a Faust worker of the engine in this process (signals reach it)."""
    from faust.worker import Worker

    from stream.app import (
        check_worker_host,
        create_engine,
        tune_gc,
        use_event_loop,
        watch_gc,
    )
    from stream.kafka import check_codecs, ensure_topics
    from stream.redisconn import (
        check_currency,
        check_eviction,
        check_lateness,
        check_partition_count,
        check_redis,
    )

    s = _settings()
    check_codecs()  # a compressed batch it cannot read would crash the worker for good
    check_worker_host(s)  # its web server's address and its data directory
    use_event_loop(s)
    redact.install_from_settings(s)
    check_redis(s)  # a wrong password or TLS setting fails here, naming the setting
    check_eviction(s)  # a Redis that evicts keys when full would lose state silently
    check_lateness(s)
    check_currency(s)  # amounts of another currency would be summed with the state's
    check_partition_count(s)  # customers would get a second state in another partition
    ensure_topics(s)
    engine = create_engine(s)
    w = Worker(engine.app, loglevel=s.log_level, quiet=True, redirect_stdouts=False)
    learner = None
    if s.models_enabled and s.learner == "process":
        import atexit

        from stream.learner_service import LearnerChild

        learner = LearnerChild(s)  # started again if it exits on its own
        atexit.register(learner.stop)
    tune_gc(s)
    watch_gc(engine.metrics.observe_gc)
    try:
        w.execute_from_commandline()
    finally:
        if learner is not None:
            learner.stop()


@app.command()
def learner() -> None:
    """Train the online models from the examples topic (``segstream worker`` starts one)."""
    import logging
    import os

    from stream.errors import ServiceError
    from stream.kafka import check_connection
    from stream.learner_service import run
    from stream.redisconn import check_redis

    s = _settings()
    redact.install_from_settings(s)
    # A wrong password, TLS setting or prefix stops it, named as a setting; a Redis that
    # does not answer yet is waited for (the learner retries, and loses nothing fetched).
    with contextlib.suppress(ServiceError):
        check_redis(s)
    check_connection(s)  # an unreachable broker or a refused login, named as a setting
    logging.basicConfig(level=s.log_level,
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    parent = os.environ.get("SEGSTREAM_LEARNER_PARENT_PID")
    run(s, int(parent) if parent else None)


@replay_app.command("cdnow")
def replay_cdnow(
    path: Annotated[Path | None, typer.Option(
        help="CDNOW_master.txt (default: lifetimes')",
        exists=True, dir_okay=False, readable=True)] = None,
    until: Annotated[str | None, typer.Option(
        help="Only purchases before this YYYY-MM-DD", callback=_until_day)] = None,
    rate: Annotated[float | None, typer.Option(
        help="Events per second (default: unthrottled)", min=0.001, callback=_finite_rate)]
    = None,
) -> None:
    """Replay the CDNOW transaction log as purchase events, in time order."""
    from stream.kafka import ensure_topics
    from stream.replay import cdnow_events, cdnow_path, produce, to_records

    # Every input is checked before the topics are created (click checked --path already).
    if path is None:
        try:
            path = cdnow_path()
        except FileNotFoundError as exc:
            raise typer.BadParameter(str(exc), param_hint="--path") from None
        if not path.is_file():
            raise typer.BadParameter(f"{path} does not exist", param_hint="--path")
    try:
        events = cdnow_events(path, until)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--path") from None
    s = _settings()
    ensure_topics(s)
    n = produce(s, to_records(s.transactions_topic, events), total=len(events), rate=rate,
                label="cdnow")
    err.print(f"produced {n} transactions to {s.transactions_topic}")


@replay_app.command("jsonl")
def replay_jsonl(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    topic: Annotated[str, typer.Option(help="clickstream or transactions")],
    rate: Annotated[float | None, typer.Option(
        help="Events per second", min=0.001, callback=_finite_rate)] = None,
) -> None:
    """Replay a JSON-lines file into an input topic (bad lines go through to the DLQ)."""
    from stream.kafka import ensure_topics
    from stream.replay import jsonl_records, produce

    if topic not in ("clickstream", "transactions"):
        raise typer.BadParameter("--topic must be clickstream or transactions")
    s = _settings()
    ensure_topics(s)
    n = produce(s, jsonl_records(path, s.topic(topic), s.max_event_bytes), rate=rate,
                label=path.name)
    err.print(f"produced {n} records to {s.topic(topic)}")


@replay_app.command("synthetic")
def replay_synthetic(
    customers: Annotated[int, typer.Option(min=1)] = 1000,
    days: Annotated[int, typer.Option(min=1, max=3650)] = 60,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    rate: Annotated[float | None, typer.Option(
        help="Events per second", min=0.001, callback=_finite_rate)] = None,
    truth: Annotated[Path | None, typer.Option(help="Write each customer's persona here")]
    = None,
) -> None:
    """Generate clickstream and transactions from latent personas and replay them."""
    from stream import synthetic
    from stream.kafka import ensure_topics
    from stream.replay import OutRecord, produce

    if truth is not None and (truth.is_dir() or not truth.parent.is_dir()):
        raise typer.BadParameter(f"{truth} is not a file in an existing directory",
                                 param_hint="--truth")
    s = _settings()
    # The period starts on 2025-01-01, or earlier when it would otherwise reach past today:
    # events ahead of the wall clock are dead-lettered as from_future.
    day_ms = 86_400_000
    start_ms = min(synthetic.DEFAULT_START_MS, (int(time.time() * 1000) // day_ms - days) * day_ms)
    if truth is not None:  # written first: an unwritable path fails before any topic exists
        _, _, truths = synthetic.generate(customers, days, seed, start_ms)
        try:
            synthetic.write_truth(truth, truths)
        except OSError as exc:
            raise typer.BadParameter(f"cannot write {truth}: {exc.strerror or exc}",
                                     param_hint="--truth") from None
    ensure_topics(s)

    def records() -> Any:
        import orjson

        for kind, event in synthetic.iter_events(customers, days, seed, start_ms):
            yield OutRecord(s.topic(kind), str(event["customer_id"]).encode(),
                            orjson.dumps(event))

    n = produce(s, records(), rate=rate, label="synthetic")
    err.print(f"produced {n} events")


@app.command()
def wait(
    timeout: Annotated[float, typer.Option(help="Seconds before giving up", min=0)] = 600.0,
    settled: Annotated[bool, typer.Option(
        help="Also wait until every partition was swept with the current scoring inputs "
             "(time, population, models, rules), so segments are final")] = True,
    quiet_s: Annotated[float, typer.Option(
        help="How long everything must stay caught up before returning (at most half "
             "the timeout)", min=0)] = 8.0,
) -> None:
    """Return once every event now in the input topics is processed and published."""
    from redis.exceptions import RedisError

    from features.store import StoreUnavailable
    from stream import kafka
    from stream.kafka import check_connection, end_offsets
    from stream.redisconn import check_redis

    for name, value in (("--timeout", timeout), ("--quiet-s", quiet_s)):
        if not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number of seconds (got {value})",
                                     param_hint=name)
    s = _settings()
    check_redis(s)
    # A broker down is reported within the timeout, not after the clients' own wait.
    check_connection(s, wait_s=min(timeout, kafka.UNREACHABLE_WAIT_S))
    ends = end_offsets(s, s.input_topics)
    quiet = min(quiet_s, timeout / 2)  # a short timeout must still be able to succeed

    async def run() -> bool:
        from features.store import RedisFeatureStore
        from stream.app import redis_client

        r = redis_client(s)
        store = RedisFeatureStore(r, s.redis_prefix)
        deadline = time.monotonic() + timeout
        since: float | None = None
        try:
            while True:
                wms = await store.watermarks(s.partitions, list(s.input_topics))
                behind = sum(1 for tp, end in ends.items() if end > 0 and wms.get(tp, -1) < end - 1)
                ok = behind == 0 and not await store.outbox_pending(range(s.partitions))
                if ok and settled:
                    ok = await _all_swept(s, r, store) and await _learner_done(s, r)
                if not ok:
                    since = None
                elif not settled:
                    return True
                elif since is None:
                    since = time.monotonic()
                if ok and since is not None and time.monotonic() - since >= quiet:
                    return True
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        finally:
            await r.aclose()

    try:
        caught_up = asyncio.run(run())
    except (StoreUnavailable, RedisError) as exc:
        raise redis_failed(s, exc) from None
    if not caught_up:
        err.print(f"[red]not caught up after {timeout:.0f}s")
        raise typer.Exit(1)


async def _learner_done(s: Settings, r: Any) -> bool:
    """The learner has learned every example in its topic and promoted what it learned."""
    if not s.models_enabled:
        return True
    from stream.kafka import end_offsets
    from stream.runtime import registry_keys

    end = sum(end_offsets(s, [s.examples_topic]).values())
    if end == 0:
        return True
    group = s.learner_group if s.learner == "process" else s.app_id
    if _committed(s, s.examples_topic, group) < end:
        return False
    row = await r.hgetall(registry_keys(s.redis_prefix)["learner"])
    unpromoted = int(row.get(b"unpromoted", row.get("unpromoted", 0))) if row else 0
    return unpromoted == 0


def _committed(s: Settings, topic: str, group: str | None = None) -> int:
    """A consumer group's committed offsets of a topic, summed (default: the workers')."""
    from kafka import KafkaConsumer, TopicPartition

    from stream.kafka import client_config

    c = KafkaConsumer(**client_config(s), group_id=group or s.app_id, enable_auto_commit=False)
    try:
        parts = c.partitions_for_topic(topic) or set()
        return sum(c.committed(TopicPartition(topic, p)) or 0 for p in parts)
    finally:
        c.close()


async def _all_swept(s: Settings, r: Any, store: Any) -> bool:
    from features.store import SWEPT_FIELD
    from stream.runtime import registry_keys

    context = await r.get(registry_keys(s.redis_prefix)["context"])
    now = await store.now()
    if context is None:
        return bool(now < 0)  # nothing accepted yet: nothing to sweep
    async with r.pipeline(transaction=False) as pipe:
        for p in range(s.partitions):
            pipe.hget(store.keys.meta(p), SWEPT_FIELD)
        swept = await pipe.execute()
    if not all(v == context for v in swept):
        return False
    # The context is what the workers last swept with; only a live worker renews it. A
    # batch that moved engine time into a new day, or the population's RFM thresholds,
    # just before its worker died left it as it was: the day and the thresholds it names
    # must be the store's own.
    from features.events import MS_PER_DAY
    from stream.sweep import Sweeper

    text = context.decode(errors="replace") if isinstance(context, bytes) else str(context)
    parts = Sweeper.key_parts(text)
    if parts is None:
        return True  # written by an older worker: as before
    day, thresholds = parts
    if day != now // MS_PER_DAY:
        return False
    if thresholds:
        from scorers import rfm
        from scorers.scoring import RFM_HASH

        tables = await store.read_tables(RFM_HASH, range(s.partitions))
        return bool(rfm.Population.from_hashes(tables.values()).digest == thresholds)
    return True


def customer_doc(s: Settings, customer_id: str) -> dict[str, Any] | None:
    """The customer document shared by the CLI and the API."""
    return asyncio.run(_with_store(s, lambda r, store: queries.customer_doc(
        s, r, store, None, customer_id)))


async def _with_store(s: Settings, fn: Any) -> Any:
    from redis.exceptions import RedisError

    from features.store import RedisFeatureStore, StoreUnavailable
    from stream.app import redis_client
    from stream.redisconn import check_redis

    # Names the setting to fix (URL, password, TLS, cluster) when Redis cannot be used.
    await asyncio.to_thread(check_redis, s)
    r = redis_client(s)
    try:
        return await fn(r, RedisFeatureStore(r, s.redis_prefix))
    except (StoreUnavailable, RedisError) as exc:
        raise redis_failed(s, exc) from None
    finally:
        await r.aclose()


def _stored_id(customer_id: str) -> None:
    """Refuse, as a bad argument, an id the input schema refuses (no such id is stored)."""
    from stream.schemas import MAX_ID_CHARS, _id_ok

    if not _id_ok(customer_id):
        raise typer.BadParameter(
            f"the customer id must have 1 to {MAX_ID_CHARS} characters, not only whitespace "
            "and no control character", param_hint="CUSTOMER_ID")


@app.command()
def customer(customer_id: str, json_: JsonOpt = False) -> None:
    """A customer's features, scores, segments and migration history."""
    _stored_id(customer_id)
    s = _settings()
    doc = customer_doc(s, customer_id)
    if doc is None:
        if json_:  # one JSON document, as on success (and as the HTTP API's 404)
            _print_json({"error": f"unknown customer {customer_id!r}"})
        err.print(f"[red]unknown customer {escape(repr(customer_id))}")
        raise typer.Exit(2)
    if json_:
        _print_json(doc)
    else:
        from rich.table import Table

        t = Table("name", "value", title=f"customer {escape(customer_id)}")
        for k, v in doc["segments"].items():
            t.add_row(escape(f"segment {k}"), escape(str(v)))
        for k, v in {**doc["scores"], **doc["features"]}.items():
            t.add_row(escape(k), escape(str(v)))
        Console().print(t)
        for h in doc["history"]:
            err.print(escape(f"{h['at']}  {h['scheme']}: {h['from_segment']} -> "
                             f"{h['to_segment']}"))


@app.command()
def segments(json_: JsonOpt = False) -> None:
    """Segment sizes per scheme."""
    from stream.runtime import load_segment_catalogue

    s = _settings()
    # The catalogue's schemes (one taken out keeps its counts, in case it comes back).
    schemes = load_segment_catalogue(s).schemes
    doc = asyncio.run(_with_store(s, lambda r, store: queries.segments_doc(s, r, store,
                                                                           schemes)))
    if json_:
        _print_json(doc)
        return
    from rich.table import Table

    for scheme, sizes in doc["schemes"].items():
        t = Table("segment", "customers", title=f"{scheme} (as of {doc['as_of']})")
        for name, n in sizes.items():
            t.add_row(name, str(n))
        Console().print(t)


@app.command()
def actions(json_: JsonOpt = False) -> None:
    """Conversion and lift per next-best action and segment (treated vs hold-out)."""
    s = _settings()
    doc = asyncio.run(_with_store(s, lambda r, store: queries.actions_doc(s, store)))
    if json_:
        _print_json(doc)
        return
    from rich.table import Table

    t = Table("action", "segment", "treated", "hold-out", "uplift", "p", title="actions")
    for row in doc["actions"]:
        def rate(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"
        t.add_row(row["action_id"], row["segment"],
                  f"{row['treated_converted']}/{row['treated_exposed']}",
                  f"{row['holdout_converted']}/{row['holdout_exposed']}",
                  rate(row["uplift"]),
                  "-" if row["p_value"] is None else f"{row['p_value']:.3f}")
    Console().print(t)


@app.command()
def models(json_: JsonOpt = False) -> None:
    """Serving model versions and quality, CLV parameters, and the personas' centroids."""
    s = _settings()
    doc = asyncio.run(_with_store(s, lambda r, store: queries.models_doc(s, r)))
    if json_:
        _print_json(doc)
        return
    from rich.table import Table

    t = Table("model", "version", "examples", "AUC", "log loss", "drift alarms", title="models")
    for name, q in doc["models"].items():
        t.add_row(name, str(q.get("version")), str(q.get("examples", "")), str(q.get("auc", "")),
                  str(q.get("log_loss", "")), str(q.get("drift_alarms", "")))
    Console().print(t)
    p = Table("persona", "share", "description", title="personas")
    for row in doc["personas"]:
        p.add_row(row["label"], f"{100 * row['size']:.1f}%", row["description"])
    Console().print(p)


@app.command()
def forget(customer_id: str, json_: JsonOpt = False) -> None:
    """Erase a customer everywhere the engine keeps data and publish a tombstone."""
    from stream import forget as erase

    # Ids the input schema refuses were never stored: erasing one would only publish a
    # tombstone for a key no migration has.
    _stored_id(customer_id)
    from stream.kafka import check_partitions
    from stream.redisconn import check_redis

    s = _settings()
    check_redis(s)
    # The customer's partition follows from SEGSTREAM_PARTITIONS: a wrong count would look
    # in the wrong place, find nothing and publish a tombstone for a customer still stored.
    check_partitions(s)
    doc = asyncio.run(_with_store(s, lambda r, store: erase.forget(s, r, store, customer_id)))
    erase.publish_tombstone(s, customer_id)
    doc["tombstone"] = True
    if json_:
        _print_json(doc)
    else:
        err.print(escape(f"forgot {customer_id}: {doc}"))


@app.command()
def reset(yes: Annotated[bool, typer.Option("--yes", help="Really delete")] = False) -> None:
    """Delete this deployment's topics, consumer group and Redis keys (development)."""
    if not yes:
        err.print("refusing without --yes")
        raise typer.Exit(2)
    from redis.exceptions import RedisError

    from features.store import Keys
    from stream.kafka import check_connection, delete_groups, delete_topics, group_members
    from stream.redisconn import check_redis, delete_matching, redis_failed, redis_sync_client

    s = _settings()
    # Both services first: topics deleted while Redis keeps the partitions' watermarks would
    # make the recreated topics' records, which start at offset 0 again, look processed.
    check_redis(s)
    check_connection(s)
    # The workers', the learner's and the reference trigger consumer's default groups.
    groups = [s.app_id, s.learner_group, s.triggers_group]
    # A worker still running would go on with its state deleted under it (it stops, the
    # store having lost its writes) and recreate the topics it publishes to.
    running = group_members(s, groups)
    if running:
        shown = ", ".join(f"{g} ({n} member{'s' if n > 1 else ''})"
                          for g, n in running.items())
        err.print(f"[red]refusing: consumers of this deployment are running: {escape(shown)}; "
                  "stop its workers, learners and trigger consumers first (nothing was "
                  "deleted)")
        raise typer.Exit(1)
    names = delete_topics(s)
    try:
        kept = {g: e for g, e in delete_groups(s, groups).items() if e is not None}
    except Exception as exc:
        kept = dict.fromkeys(groups, repr(exc))
    for g, e in kept.items():
        err.print(f"[yellow]consumer group {g} not deleted: {e}")
    r = redis_sync_client(s)
    try:
        # Only keys of the engine's own families: a deployment whose prefix starts with
        # this one's (``segstream:`` and ``segstream:eu:``) keeps its keys.
        keys = Keys(s.redis_prefix)
        n = delete_matching(r, keys.all_pattern(), only=keys.owns)
    except RedisError as exc:
        raise SegstreamError(f"{redis_failed(s, exc)}; the topics are deleted: run "
                             "`segstream reset --yes` again before starting a worker") from None
    finally:
        r.close()
    _wait_topics_gone(s, names)
    err.print(f"deleted topics {names} and {n} Redis keys")


def _wait_topics_gone(s: Settings, names: list[str], timeout: float = 30.0) -> None:
    from stream.kafka import admin

    deadline = time.monotonic() + timeout
    while names and time.monotonic() < deadline:
        a = admin(s)
        try:
            if not set(names) & set(a.list_topics()):
                return
        finally:
            a.close()
        time.sleep(0.5)


@clv_app.command("fit")
def clv_fit(json_: JsonOpt = False) -> None:
    """Fit BG/NBD and Gamma-Gamma population parameters from the current customer state."""
    from stream.clvfit import refit_clv

    s = _settings()
    doc = asyncio.run(_with_store(s, lambda r, store: refit_clv(s, r, store)))
    if json_:
        _print_json(doc)
    else:
        err.print(doc)


@app.command()
def demo(
    rate: Annotated[float, typer.Option(help="Events per second (0: unthrottled)", min=0,
                                        callback=_finite_rate)] = 3000.0,
    duration: Annotated[float | None, typer.Option(
        help="Seconds to keep running after the replay, then stop (default: until Ctrl-C)",
        min=0)] = None,
    customers: Annotated[int, typer.Option(help="Synthetic customers", min=0)] = 2000,
    days: Annotated[int, typer.Option(
        help="Synthetic period in days before today, without CDNOW (with CDNOW the "
             "synthetic customers live through the CDNOW period)", min=1, max=3650)] = 60,
    until: Annotated[str | None, typer.Option(
        help="Only CDNOW purchases before YYYY-MM-DD", callback=_until_day)] = None,
    cdnow: Annotated[bool, typer.Option("--cdnow/--no-cdnow", help="Replay CDNOW")] = True,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic/--no-synthetic", help="Replay synthetic clickstream and transactions")]
    = True,
) -> None:
    """Services up, a worker, a replay and a live feed of segment migrations."""
    from stream.demo import DemoOptions, run_demo

    code = run_demo(_settings(), DemoOptions(
        rate=rate, duration=duration, customers=customers, days=days, until=until,
        cdnow=cdnow, synthetic=synthetic))
    if code:
        raise typer.Exit(code)


@app.command()
def native(
    action: Annotated[str, typer.Argument(help="status, build or clean")] = "status",
    jobs: Annotated[int | None, typer.Option(help="compilers run at once", min=1)] = None,
) -> None:
    """Compiled builds of the hot-path modules: their state, build them, or remove them."""
    from stream import native as nat

    directory = nat.native_dir()
    # (a bad SEGSTREAM_NATIVE already ended the process when ``stream`` was imported)
    if directory.exists() and not directory.is_dir():
        raise SegstreamError(f"{nat.ENV_DIR}: {directory} exists and is not a directory")
    if action == "clean":
        try:
            removed = nat.clean(directory)
        except ValueError as exc:
            raise SegstreamError(str(exc)) from None
        err.print(f"removed {removed} files of {directory}")
        return
    if action not in ("status", "build"):
        raise typer.BadParameter(f"{action!r}: expected status, build or clean")
    states = nat.build(directory, jobs=jobs) if action == "build" else nat.status(directory)
    for st in states:
        sys.stdout.write(f"{st.module:22} {st.reason}\n")
    compiled = sum(st.compiled is not None for st in states)
    note = "" if nat.enabled() else f" ({nat.ENV_SWITCH}=0: not loaded)"
    sys.stdout.write(f"{compiled} of {len(states)} modules compiled in {directory}{note}\n")
    if action == "build" and compiled < len(states):
        raise typer.Exit(1)


def _kafka_failed(exc: Exception) -> SegstreamError:
    """A Kafka client's error after the start-up check passed: the bootstrap broker
    answered, another did not (often a broker's advertised address, or a certificate
    that does not name it)."""
    try:
        bootstrap = load_settings().kafka_bootstrap
    except Exception:  # the settings were read before: this is only for the message
        bootstrap = "the bootstrap brokers"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SegstreamError(
        f"Kafka at {bootstrap} (SEGSTREAM_KAFKA_BOOTSTRAP) failed: {type(exc).__name__}: "
        f"{text}; if the bootstrap broker answers, check the brokers' advertised.listeners "
        "(each must be reachable from here and, with TLS, named in its certificate)")


def main() -> None:
    from aiokafka.errors import KafkaError as AioKafkaError
    from kafka.errors import KafkaError

    try:
        try:
            app()
        except (KafkaError, AioKafkaError) as exc:
            raise _kafka_failed(exc) from None
    except SegstreamError as exc:
        # Messages quote setting values and user input: never read them as markup.
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        if "--json" in sys.argv[1:]:
            # "--json prints one JSON document" (DESIGN §6): on failure too, on stdout
            _print_json({"error": str(exc)})
        sys.exit(2)


if __name__ == "__main__":
    main()
