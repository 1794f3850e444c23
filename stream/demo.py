"""``segstream demo``: the engine end to end in one terminal.

Services up (reused when running), topics ensured, one ``segstream worker`` in its own
session, a replay of CDNOW transactions and synthetic clickstream and transactions at a
watchable rate, and a live feed of the segment migrations the worker publishes. After the
replay the worker and the feed keep running until Ctrl-C (or ``duration`` seconds); then a
short summary of segment sizes and actions, and everything stops.

Event time
----------
The engine's clock is the largest event time it has accepted, global and monotone, and an
event more than the allowed lateness behind the newest event of its topic-partition is
dead-lettered. So the two sources are replayed on one timeline:

* CDNOW and synthetic: the synthetic customers live through the CDNOW period (its first
  day to its last, or to ``until``) and both streams are merged by timestamp. Every
  topic-partition then receives its events in time order, nothing is late, and neither
  population is aged by a jump of the clock (replaying a 2025 population after 1998 would
  move every CDNOW customer to Lost at once).
* Synthetic only: the ``days`` days before today (UTC midnight), so nothing is from the
  future and the dashboard shows recent dates.
* CDNOW only: the CDNOW log as is.

A deployment whose clock is already past that timeline (an earlier demo) would dead-letter
the replay as too late; the demo says so and names the fix (``segstream reset --yes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from rich import get_console
from rich.console import Console
from rich.table import Table
from rich.text import Text

from stream.replay import OutRecord
from stream.schemas import parse_ts
from stream.settings import Settings, redacted_url

_DAY_MS = 86_400_000
#: What the worker logs once it runs (the tests wait for the same line).
READY_MARK = b"Worker]: Ready"


@dataclass(frozen=True)
class DemoOptions:
    """What ``segstream demo`` replays and for how long."""

    rate: float = 3000.0
    duration: float | None = None
    customers: int = 2000
    days: int = 60
    until: str | None = None
    cdnow: bool = True
    synthetic: bool = True
    seed: int = 0
    lines_per_second: int = 15
    worker_start_timeout_s: float = 180.0


# -- the replay ---------------------------------------------------------------------

@dataclass(frozen=True)
class ReplayPlan:
    """Where the replay's events come from, how many there are and where they start."""

    cdnow: list[dict[str, Any]]
    synthetic_customers: int
    synthetic_days: int
    synthetic_start_ms: int
    seed: int
    total: int
    start_ms: int

    def describe(self) -> str:
        parts = []
        if self.cdnow:
            parts.append(f"{len(self.cdnow):,} CDNOW transactions")
        if self.synthetic_customers:
            day = datetime.fromtimestamp(self.synthetic_start_ms / 1000, UTC).date()
            parts.append(f"{self.synthetic_customers:,} synthetic customers over "
                         f"{self.synthetic_days} days from {day}")
        return " and ".join(parts) + f": {self.total:,} events"

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(topic, event)`` in time order, the two sources merged by timestamp."""
        from stream import synthetic

        streams: list[Iterable[tuple[int, str, dict[str, Any]]]] = []
        if self.cdnow:
            streams.append((ts_ms(e["ts"]), "transactions", e) for e in self.cdnow)
        if self.synthetic_customers:
            streams.append((int(e["ts"]), kind, e) for kind, e in synthetic.iter_events(
                self.synthetic_customers, self.synthetic_days, self.seed,
                start_ms=self.synthetic_start_ms))
        for _, kind, event in heapq.merge(*streams, key=lambda x: x[0]):
            yield kind, event


def ts_ms(ts: str) -> int:
    """Epoch milliseconds of an RFC 3339 timestamp.

    >>> ts_ms("1997-01-01T00:00:00Z")
    852076800000
    """
    return parse_ts(ts)


def plan_replay(opts: DemoOptions, today_ms: int | None = None) -> ReplayPlan:
    """Choose the sources and the synthetic period (see the module docstring)."""
    from stream import synthetic
    from stream.replay import cdnow_events, cdnow_path

    cdnow = cdnow_events(cdnow_path(), opts.until) if opts.cdnow else []
    customers = opts.customers if opts.synthetic else 0
    if cdnow:
        first, last = ts_ms(str(cdnow[0]["ts"])), ts_ms(str(cdnow[-1]["ts"]))
        start, days = first, (last - first) // _DAY_MS + 1
    else:
        today = today_ms if today_ms is not None else int(time.time() * 1000)
        start, days = today - today % _DAY_MS - opts.days * _DAY_MS, opts.days
    n_synth = sum(1 for _ in synthetic.iter_events(customers, days, opts.seed, start_ms=start)
                  ) if customers else 0
    return ReplayPlan(cdnow, customers, days, start, opts.seed, len(cdnow) + n_synth, start)


class Replay(threading.Thread):
    """Produces the plan's events at ``rate`` with a progress bar; stops early on ``stop``."""

    def __init__(self, s: Settings, plan: ReplayPlan, rate: float | None,
                 stop: threading.Event) -> None:
        super().__init__(name="demo-replay", daemon=True)
        self.s, self.plan, self.rate, self.stop = s, plan, rate, stop
        self.sent = 0
        self.error: BaseException | None = None

    def records(self) -> Iterator[OutRecord]:
        for kind, event in self.plan.events():
            if self.stop.is_set():
                return
            yield OutRecord(self.s.topic(kind), str(event["customer_id"]).encode(),
                            orjson.dumps(event))

    def run(self) -> None:
        from stream.replay import produce

        try:
            self.sent = produce(self.s, self.records(), total=self.plan.total, rate=self.rate,
                                label="replay")
        except Exception as exc:  # reported by the demo, which then stops cleanly
            self.error = exc


# -- the live feed ------------------------------------------------------------------

_BAD = ("risk", "lose", "lost", "hibernat", "sleep", "dormant", "churn", "attention")
_GOOD = ("champion", "loyal", "power", "potential")
_NEW = ("new", "promising", "activator", "newbie")


def segment_style(name: str | None) -> str:
    """A colour that says whether moving into this segment is good news.

    >>> segment_style("At Risk"), segment_style("Champions"), segment_style("New Customers")
    ('bold red', 'bold green', 'bold cyan')
    """
    low = (name or "").lower()
    if any(w in low for w in _BAD):
        return "bold red"
    if any(w in low for w in _GOOD):
        return "bold green"
    if any(w in low for w in _NEW):
        return "bold cyan"
    return "bold yellow"


def migration_text(m: dict[str, Any], reason_chars: int = 90) -> Text:
    """One coloured line: time, customer, scheme, from → to, action or hold-out, reason.

    >>> m = {"at": "1997-03-01T00:00:00Z", "customer_id": "00042", "scheme": "rfm",
    ...      "from_segment": "Loyal", "to_segment": "At Risk", "reason": "At Risk: r <= 2",
    ...      "action": {"action_id": "win-back", "channel": "email", "holdout": False}}
    >>> migration_text(m).plain
    '1997-03-01 00:00  00042  rfm  Loyal → At Risk  win-back (email)  At Risk: r <= 2'
    >>> m["action"]["holdout"] = True
    >>> "hold-out: win-back" in migration_text(m).plain
    True
    """
    at = str(m.get("at") or "")[:16].replace("T", " ")
    t = Text(at, style="dim")
    t.append(f"  {m.get('customer_id')}", style="bold")
    t.append(f"  {m.get('scheme')}  ", style="blue")
    frm = m.get("from_segment")
    t.append(str(frm) if frm is not None else "(new)", style="dim" if frm is None else "")
    t.append(" → ")
    t.append(str(m.get("to_segment")), style=segment_style(m.get("to_segment")))
    action = m.get("action")
    if isinstance(action, dict):
        if action.get("holdout"):
            t.append(f"  hold-out: {action.get('action_id')}", style="dim magenta")
        else:
            t.append(f"  {action.get('action_id')} ({action.get('channel')})", style="magenta")
    reason = str(m.get("reason") or "")
    if len(reason) > reason_chars:
        reason = reason[: reason_chars - 1] + "…"
    if reason:
        t.append(f"  {reason}", style="dim")
    return t


class Throttle:
    """At most ``per_second`` lines a wall-clock second; the rest are only counted.

    >>> t = Throttle(per_second=2)
    >>> [t.admit("rfm", 0.1), t.admit("rfm", 0.2), t.admit("lifecycle", 0.3)]
    [True, True, False]
    >>> t.roll(0.9) is None, t.roll(1.2)
    (True, '… 3 migrations in the last second, 1 not shown (lifecycle 1, rfm 2)')
    >>> t.roll(2.5) is None
    True
    """

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.started: float | None = None
        self.by_scheme: Counter[str] = Counter()

    def admit(self, scheme: str, now: float) -> bool:
        """Count a migration; whether to print it."""
        if self.started is None:
            self.started = now
        self.by_scheme[scheme] += 1
        return self.by_scheme.total() <= self.per_second

    def roll(self, now: float) -> str | None:
        """Close the second once it is over; say how many were not shown, if any."""
        if self.started is None or now - self.started < 1.0:
            return None
        total = self.by_scheme.total()
        schemes = ", ".join(f"{k} {v}" for k, v in sorted(self.by_scheme.items()))
        self.started, self.by_scheme = None, Counter()
        if total <= self.per_second:
            return None
        return (f"… {total} migrations in the last second, {total - self.per_second} "
                f"not shown ({schemes})")


class MigrationFeed:
    """A fresh consumer of the migrations topic, from its end, printing what arrives."""

    def __init__(self, s: Settings, console: Console, per_second: int) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from stream.kafka import client_config

        self.console = console
        self.throttle = Throttle(per_second)
        self.count = 0
        self.by_scheme: Counter[str] = Counter()
        self.last_customer: str | None = None
        self.consumer = KafkaConsumer(**client_config(s), enable_auto_commit=False)
        parts: set[int] = set()
        for _ in range(50):  # a just created topic can have no metadata yet
            parts = self.consumer.partitions_for_topic(s.migrations_topic) or set()
            if parts:
                break
            time.sleep(0.2)
        tps = [TopicPartition(s.migrations_topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end now, not at the first poll
            self.consumer.position(tp)

    def poll(self, timeout_ms: int = 200) -> None:
        batches = self.consumer.poll(timeout_ms=timeout_ms)
        for records in batches.values():
            for rec in records:
                self._show(rec.value)
        note = self.throttle.roll(time.monotonic())
        if note:
            self.console.print(Text(note, style="dim italic"))

    def _show(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            m = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        if not isinstance(m, dict):
            return
        self.count += 1
        scheme = str(m.get("scheme"))
        self.by_scheme[scheme] += 1
        self.last_customer = str(m.get("customer_id"))
        now = time.monotonic()
        note = self.throttle.roll(now)
        if note:
            self.console.print(Text(note, style="dim italic"))
        if self.throttle.admit(scheme, now):
            self.console.print(migration_text(m), soft_wrap=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.consumer.close(autocommit=False)


# -- the worker ---------------------------------------------------------------------

def start_worker(log: Path) -> subprocess.Popen[bytes]:
    """``segstream worker`` in its own session (a Ctrl-C in the terminal is the demo's)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "stream.cli", "worker"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_ready(worker: subprocess.Popen[bytes], log: Path, stop: threading.Event,
               timeout_s: float) -> str | None:
    """None once the worker runs, otherwise why not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop.is_set():
            return "interrupted"
        if worker.poll() is not None:
            return f"the worker exited with code {worker.returncode}"
        with contextlib.suppress(OSError):
            if READY_MARK in log.read_bytes():
                return None
        time.sleep(0.2)
    return f"the worker was not ready after {timeout_s:.0f}s"


def stop_worker(worker: subprocess.Popen[bytes], hurry: threading.Event,
                timeout_s: float = 30.0) -> None:
    """SIGTERM the worker's session and wait; SIGKILL after the timeout or a second Ctrl-C."""
    if worker.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while worker.poll() is None and time.monotonic() < deadline and not hurry.is_set():
        time.sleep(0.1)
    if worker.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- reading the results ------------------------------------------------------------

async def _read(s: Settings, what: str) -> Any:
    from features.store import RedisFeatureStore
    from stream import queries
    from stream.app import redis_client

    r = redis_client(s)
    try:
        store = RedisFeatureStore(r, s.redis_prefix)
        if what == "now":
            return await store.now()
        from stream.runtime import load_segment_catalogue

        schemes = load_segment_catalogue(s).schemes
        return (await queries.segments_doc(s, r, store, schemes),
                await queries.actions_doc(s, store))
    finally:
        await r.aclose()


def print_summary(console: Console, segments: dict[str, Any], actions: dict[str, Any],
                  top: int = 5) -> None:
    """Segment sizes per scheme and the most used actions."""
    from rich.columns import Columns

    tables = []
    for scheme, sizes in segments["schemes"].items():
        t = Table("segment", "customers", title=scheme)
        for name, n in sizes.items():
            t.add_row(Text(name, style=segment_style(name)), f"{n:,}")
        tables.append(t)
    console.print(f"segments as of {segments['as_of']}")
    console.print(Columns(tables))
    rows = sorted(actions["actions"], key=lambda r: -(r["treated_exposed"]
                                                      + r["holdout_exposed"]))[:top]
    if rows:
        t = Table("action", "segment", "treated", "hold-out", "uplift", title="top actions")
        for r in rows:
            up = "-" if r["uplift"] is None else f"{100 * r['uplift']:+.1f} pts"
            t.add_row(r["action_id"], r["segment"],
                      f"{r['treated_converted']}/{r['treated_exposed']}",
                      f"{r['holdout_converted']}/{r['holdout_exposed']}", up)
        console.print(t)


# -- the demo -----------------------------------------------------------------------

class _Interrupts:
    """SIGINT and SIGTERM ask for a clean stop; a second one asks to hurry."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.hurry = threading.Event()
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        (self.hurry if self.stop.is_set() else self.stop).set()

    def __enter__(self) -> _Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_demo(s: Settings, opts: DemoOptions, console: Console | None = None) -> int:
    """Run the demo; the exit code (0 after a normal end or a Ctrl-C)."""
    from stream import services
    from stream.kafka import ensure_topics

    con = console or get_console()
    if not (opts.cdnow or (opts.synthetic and opts.customers > 0)):
        drop = ["--no-cdnow"] + (["--no-synthetic"] if not opts.synthetic else [])
        con.print(f"[red]nothing to replay: drop {' or '.join(drop)}"
                  + (" or give --customers above 0" if opts.synthetic else ""))
        return 2
    try:
        if opts.cdnow:
            from stream.replay import cdnow_path

            try:
                cdnow_path()
            except FileNotFoundError:
                con.print("[red]the CDNOW log ships with the lifetimes package, which is not "
                          "installed: pip install lifetimes, or run with --no-cdnow")
                return 2
        with con.status("Kafka and Redis"):
            done = services.up(s)
        con.print(f"kafka {s.kafka_bootstrap} ({done['kafka']}), "
                  f"redis {redacted_url(s.redis_url)} ({done['redis']})")
        ensure_topics(s)
        with con.status("preparing the replay"):
            plan = plan_replay(opts)
            now = asyncio.run(_read(s, "now"))
    except KeyboardInterrupt:
        con.print("interrupted")
        return 130
    if plan.total == 0:
        con.print("[red]nothing to replay: no event of the chosen sources is in the period "
                  "(see --until and --days)")
        return 2
    pace = f"{opts.rate:,.0f} events/s" if opts.rate else "full speed (unthrottled)"
    con.print(f"replay: {plan.describe()} at {pace}")
    if now >= 0 and plan.start_ms < now - s.lateness_ms:
        con.print(f"[yellow]this deployment's clock is already at "
                  f"{datetime.fromtimestamp(now / 1000, UTC):%Y-%m-%d}: earlier events go to the "
                  "DLQ as too late. For a fresh demo run `segstream reset --yes` (deletes this "
                  "deployment's data) or set another SEGSTREAM_APP_ID, SEGSTREAM_TOPIC_PREFIX "
                  "and SEGSTREAM_REDIS_PREFIX.")
    log = s.data_dir / "demo" / f"{s.app_id}-worker.log"
    with _Interrupts() as sig:
        return _run(s, opts, plan, con, log, sig)


def _run(s: Settings, opts: DemoOptions, plan: ReplayPlan, con: Console, log: Path,
         sig: _Interrupts) -> int:
    worker = start_worker(log)
    feed: MigrationFeed | None = None
    replay: Replay | None = None
    code = 0
    try:
        con.print(f"worker pid {worker.pid}, log {log}")
        with con.status("starting the worker"):
            why = wait_ready(worker, log, sig.stop, opts.worker_start_timeout_s)
        if why == "interrupted":
            return 0
        if why is not None:
            con.print(f"[red]{why}; the end of its log:[/red]\n{log_tail(log)}")
            return 1
        base = s.api_url
        con.print(f"dashboard [bold underline]{base}/[/]  (also {base}/dashboard)")
        con.print(f"API       [bold underline]{base}/segments[/], {base}/migrations, "
                  f"{base}/customers/<id>, {base}/openapi.json")
        con.print("[dim]segment migrations as they are published (Ctrl-C stops the demo):")
        feed = MigrationFeed(s, con, opts.lines_per_second)
        replay = Replay(s, plan, opts.rate or None, sig.stop)
        replay.start()
        code = _watch(con, feed, replay, worker, log, sig.stop, opts.duration)
    finally:
        sig.stop.set()
        if replay is not None:
            replay.join(timeout=30)
        if feed is not None:
            feed.close()
        with con.status("stopping the worker"):
            stop_worker(worker, sig.hurry)
        con.print(f"worker stopped (exit code {worker.returncode})")
    if not sig.hurry.is_set():
        _summary(s, con, feed, replay)
    return code


def _watch(con: Console, feed: MigrationFeed, replay: Replay, worker: subprocess.Popen[bytes],
           log: Path, stop: threading.Event, duration: float | None) -> int:
    deadline: float | None = None
    replaying = True
    while not stop.is_set():
        if worker.poll() is not None:
            con.print(f"[red]the worker exited with code {worker.returncode}; the end of its "
                      f"log:[/red]\n{log_tail(log)}")
            return 1
        if replaying and not replay.is_alive():
            replaying = False
            if replay.error is not None:
                con.print(f"[red]replay failed: {replay.error}")
                return 1
            con.print(f"replay done: {replay.sent:,} events; the worker keeps going")
            if duration is not None:
                deadline = time.monotonic() + duration
                con.print(f"[dim]stopping in {duration:g}s")
            else:
                con.print("[dim]Ctrl-C stops the demo")
        if deadline is not None and time.monotonic() >= deadline:
            break
        feed.poll()
    return 0


def _summary(s: Settings, con: Console, feed: MigrationFeed | None, replay: Replay | None
             ) -> None:
    sent = replay.sent if replay is not None else 0
    seen = feed.count if feed is not None else 0
    schemes = ", ".join(f"{k} {v:,}" for k, v in sorted(feed.by_scheme.items())) if feed else ""
    con.print(f"\nproduced {sent:,} events; {seen:,} migrations seen"
              + (f" ({schemes})" if schemes else ""))
    try:
        segments, actions = asyncio.run(_read(s, "summary"))
    except Exception as exc:
        con.print(f"[yellow]no summary: {exc}")
        return
    print_summary(con, segments, actions)
    who = feed.last_customer if feed is not None and feed.last_customer else "00042"
    con.print(f"look closer: segstream customer {who} --json · segstream segments · "
              "segstream actions")
