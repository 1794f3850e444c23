"""E: engine workers consuming the benchmark input, measured from the outside.

Progress is the committed Redis offset watermarks (``P{pN}:meta`` fields
``wm:<topic>``), i.e. what the engine has durably applied, polled every 100 ms until
they reach the topics' end offsets. Throughput, CPU time and Redis counters are
deltas between the first poll that sees progress and the one that sees the end, so
start-up and the group join are not counted. Peak RSS covers the whole run.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from bench import breakdown, machine, worker
from bench.deploy import BenchDeployment
from features.store import Keys
from scorers.labels import MODELS
from stream.kafka import end_offsets
from stream.redisconn import redis_sync_client
from stream.runtime import registry_keys
from stream.settings import Settings

POLL_S = 0.1
STALL_S = 180.0


class BenchError(RuntimeError):
    """A benchmark step could not complete."""


@dataclass
class EngineResult:
    """What one E run measured."""

    workers: int
    events: int
    seconds: float
    eps: float
    startup_s: float
    cpu_s: float
    cpu_s_per_million_events: float
    #: the worker processes alone, without their children (the learners)
    worker_cpu_s: float
    rss_peak_mb: float
    roundtrips: int
    commands: int
    server: dict[str, float]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    profile_path: Path | None = None
    #: input records committed when every online model first had a serving version
    #: (None: not during the run); until then churn and propensity scores are null,
    #: which makes an evaluation cheaper
    models_serving_from: int | None = None
    #: input records already committed at the first progress sample, which E is timed
    #: from: they are not in ``events``
    events_before: int = 0
    #: input records the workers dead-lettered during the run, by reason (None: their
    #: metrics could not be read); a benchmark whose input is rejected measures little
    dead_letters: dict[str, int] | None = None
    #: CPU seconds per second of the run, by who spent them: every core of the machine
    #: (``machine``), the workers, their learners, the broker and Redis (when they run
    #: here), time the hypervisor gave to other machines (``steal``), and the rest (the
    #: benchmark's own poller, the OS, other processes)
    cpu_by_role: dict[str, float] = field(default_factory=dict)
    #: per worker, what its own metrics say it did over the measured part of the run
    #: (:func:`bench.breakdown.summary`: batches, mean records per batch, the mean of each
    #: stage per batch, sweeps, collector pauses) and its own CPU seconds per input record
    #: it processed; None where its metrics could not be read
    per_worker: list[dict[str, Any] | None] = field(default_factory=list)


def watermark_progress(r: redis.Redis, s: Settings, ends: dict[tuple[str, int], int]) -> int:
    """Input records the engine has committed (watermarks are last applied offsets)."""
    keys = Keys(s.redis_prefix)
    topics = list(s.input_topics)
    pipe = r.pipeline(transaction=False)
    for p in range(s.partitions):
        pipe.hmget(keys.meta(p), [f"wm:{t}" for t in topics])
    done = 0
    for p, row in enumerate(pipe.execute()):
        for t, v in zip(topics, row, strict=True):
            if v is not None:
                done += min(int(v) + 1, ends.get((t, p), 0))
    return done


def server_counters(r: redis.Redis) -> dict[str, float]:
    """Server-wide counters (every client of this Redis, not only the engine)."""
    st: dict[str, Any] = r.info("stats")  # type: ignore[assignment]
    mem: dict[str, Any] = r.info("memory")  # type: ignore[assignment]
    out = {k: float(st.get(k, 0)) for k in ("total_commands_processed", "total_reads_processed",
                                             "total_net_input_bytes")}
    out["used_memory"] = float(mem.get("used_memory", 0))
    with contextlib.suppress(redis.RedisError):
        pers: dict[str, Any] = r.info("persistence")  # type: ignore[assignment]
        out["aof_rewrites"] = float(pers.get("aof_rewrites", 0))
    return out


class Services:
    """CPU seconds of the broker and Redis serving the run, and of the whole machine."""

    def __init__(self, s: Settings) -> None:
        self.procs = {}
        for role, pid in machine.service_pids(s).items():
            with contextlib.suppress(psutil.Error):
                self.procs[role] = psutil.Process(pid)

    def sample(self) -> dict[str, float]:
        busy, steal = machine.busy_cpu_s()
        out = {"machine": busy, "steal": steal}
        for role, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[role] = t.user + t.system
                if role == "redis":
                    # its forks (AOF rewrites), counted once Redis has reaped them
                    out["redis_forks"] = t.children_user + t.children_system
        return out


def roles_cpu(worker_s: float, learner_s: float, services0: dict[str, float],
              services1: dict[str, float]) -> dict[str, float]:
    """CPU seconds by role between two :meth:`Services.sample` calls: the workers and
    their learners (measured by the caller), the broker, Redis, the machine in all, and
    the rest of the machine (this benchmark's own process among it)."""
    spent = {k: services1[k] - services0[k] for k in services0 if k in services1}
    by_role = {"machine": spent["machine"], "worker": worker_s, "learner": learner_s,
               **{k: v for k, v in spent.items() if k not in ("machine", "steal")},
               "steal": spent["steal"]}
    by_role["rest"] = max(0.0, by_role["machine"] - sum(
        v for k, v in by_role.items() if k != "machine"))
    return by_role


class ProcessTree:
    """CPU seconds and RSS of some processes and their children."""

    def __init__(self, pids: list[int]) -> None:
        self.roots = [psutil.Process(p) for p in pids]
        self.rss_peak = 0
        self._cpu: dict[int, float] = {}

    def roots_cpu(self) -> float:
        """CPU seconds of the root processes alone, as of the last sample."""
        return sum(self._cpu.get(root.pid, 0.0) for root in self.roots)

    def own_cpu(self, pid: int) -> float:
        """CPU seconds of one process alone (not its children), as of the last sample."""
        return self._cpu.get(pid, 0.0)

    def sample(self) -> float:
        """Sample now; returns total CPU seconds so far (exited children keep their last)."""
        rss = 0
        for root in self.roots:
            with contextlib.suppress(psutil.Error):
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error), proc.oneshot():
                        t = proc.cpu_times()
                        self._cpu[proc.pid] = t.user + t.system
                        rss += proc.memory_info().rss
        self.rss_peak = max(self.rss_peak, rss)
        return sum(self._cpu.values())


def _read_counters(paths: list[Path]) -> tuple[int, int]:
    rt = cmds = 0
    for p in paths:
        with contextlib.suppress(OSError, struct.error):
            a, b = worker.read(p)
            rt += a
            cmds += b
    return rt, cmds


def start_profiler(pid: int, out: Path, log: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling ``pid`` into a speedscope file (None if py-spy is unavailable)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--format", "speedscope", "--output", str(out),
         "--rate", "100", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
    )


def run_engine(dep: BenchDeployment, role: str, workers: int, total: int,
               profile: Path | None = None, progress: Any = None,
               ends: dict[tuple[str, int], int] | None = None) -> EngineResult:
    """Start ``workers`` engine workers and measure them until they caught up with
    ``ends`` (default: the input topics' end offsets now).

    The latency phases append to the input topics: a run after them passes the end
    offsets of the input E measured, so it measures the same records and not, in
    partitions done early, some of the latency phases' too.
    """
    s = dep.settings(role)
    if ends is None:
        ends = end_offsets(s, s.input_topics)
    if sum(ends.values()) < total:
        raise BenchError(f"input topics hold {sum(ends.values())} records, expected {total}")
    r = redis_sync_client(s)
    counters = [dep.workdir / f"{role}-{i}.counters" for i in range(workers)]
    spawned = time.monotonic()
    procs = [dep.spawn("bench.worker", s, f"{role}-{i}", BENCH_COUNTERS=str(counters[i]))
             for i in range(workers)]
    token = s.api_token.get_secret_value() if s.api_token else None
    scraped: list[dict[str, dict[str, Any]] | None] = []
    own_cpu0: list[float] = []
    profiler: subprocess.Popen[bytes] | None = None
    tree = ProcessTree([p.pid for p in procs])
    services = Services(s)
    first: tuple[float, int, float, tuple[int, int], dict[str, float]] | None = None
    last_change, last_done = time.monotonic(), -1
    models_key = registry_keys(s.redis_prefix)["models"]
    models_from: int | None = None
    try:
        while True:
            time.sleep(POLL_S)
            for i, p in enumerate(procs):
                if p.poll() is not None:
                    raise BenchError(f"engine worker exited ({p.returncode}):\n"
                                     f"{dep.log_tail(f'{role}-{i}')}")
            if first is None:
                # The workers' metrics before the watermarks E starts from: a worker counts a
                # batch once evaluated, so every batch counted here is in the watermarks read
                # next but for one whose commit is still under way in the background, and the
                # per-worker account covers what E measures but for that batch.
                before = [breakdown.scrape(dep.metrics_url(p), token) for p in procs]
            done = watermark_progress(r, s, ends)
            now = time.monotonic()
            cpu = tree.sample()
            if progress is not None:
                progress(done)
            if done != last_done:
                last_change, last_done = now, done
            elif now - last_change > STALL_S:
                raise BenchError(f"engine made no progress for {STALL_S:.0f}s at {done}/{total}:"
                                 f"\n{dep.log_tail(f'{role}-0')}")
            if models_from is None and s.models_enabled and all(
                    r.hexists(models_key, m) for m in MODELS):
                models_from = done
            if first is None and done > 0:
                first = (now, done, cpu, _read_counters(counters), server_counters(r))
                roots0, services0 = tree.roots_cpu(), services.sample()
                own_cpu0 = [tree.own_cpu(p.pid) for p in procs]
                scraped = before
                if profile is not None:  # the steady state only, not imports and group join
                    profiler = start_profiler(procs[0].pid, profile,
                                              dep.workdir / f"{role}-py-spy.log")
            if done >= total and first is not None:
                rt, cmds = _read_counters(counters)
                end_server = server_counters(r)
                services1 = services.sample()
                break
        t0, n0, cpu0, (rt0, cmds0), server0 = first
        seconds = max(1e-9, now - t0)
        events = done - n0
        if events <= 0:
            # E is timed from its first progress sample to the last: none lay between
            raise BenchError(f"E committed all {done:,} events before its second progress "
                             f"sample ({POLL_S:g} s apart): too few to time; give more "
                             "--events")
        cpu_s = cpu - cpu0
        worker_cpu_s = tree.roots_cpu() - roots0
        by_role = roles_cpu(worker_cpu_s, cpu_s - worker_cpu_s, services0, services1)
        time.sleep(POLL_S)  # a batch's counters move just after its commit
        dead = dead_letters(dep, s, procs)
        tree.sample()
        per_worker = []
        for i, p in enumerate(procs):
            # No baseline (the worker's metrics did not answer yet): everything since it started.
            before = scraped[i] if i < len(scraped) else None
            got = breakdown.summary(before, breakdown.scrape(dep.metrics_url(p), token))
            if got is not None and got.get("records") and i < len(own_cpu0):
                got["cpu_us_per_record"] = round(
                    (tree.own_cpu(p.pid) - own_cpu0[i]) / got["records"] * 1e6, 1)
            per_worker.append(got)
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(timeout=60)
        r.close()
    return EngineResult(
        workers=workers, events=events, events_before=n0, seconds=seconds,
        eps=events / seconds,
        startup_s=t0 - spawned, cpu_s=cpu_s,
        cpu_s_per_million_events=cpu_s / max(1, events) * 1e6,
        worker_cpu_s=worker_cpu_s, rss_peak_mb=tree.rss_peak / 2**20,
        roundtrips=rt - rt0, commands=cmds - cmds0,
        server={k: end_server[k] - server0[k] for k in server0},
        procs=procs, profile_path=profile if profiler is not None else None,
        models_serving_from=models_from,
        cpu_by_role={k: v / seconds for k, v in by_role.items()},
        dead_letters=dead,
        per_worker=per_worker,
    )


def dead_letters(dep: BenchDeployment, s: Settings, procs: list[subprocess.Popen[bytes]]
                 ) -> dict[str, int] | None:
    """The workers' ``segstream_dlq_records_total`` by reason, summed over workers."""
    token = s.api_token.get_secret_value() if s.api_token else None
    out: dict[str, int] = {}
    for p in procs:
        got = breakdown.counter_by_label(dep.metrics_url(p), "dlq_records", "reason", token)
        if got is None:
            return None
        for reason, n in got.items():
            if int(n):  # every known reason is exported, at 0 until its first record
                out[reason] = out.get(reason, 0) + int(n)
    return out

