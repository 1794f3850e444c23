"""A description of the machine and services a benchmark ran on."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil

from stream.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def kafka_version(settings: Settings) -> str:
    """The broker's release, read from a local broker's class path when it runs here."""
    port = settings.kafka_bootstrap.split(",")[0].rpartition(":")[2]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "kafka.Kafka" not in cmd:
            continue
        with contextlib.suppress(OSError):
            props = Path(proc.info["cmdline"][-1]).read_text()
            if f":{port}" not in props:
                continue
        m = re.search(r"kafka_2\.\d+-([\w.]+?)\.jar", cmd) or re.search(r"libs-([\w.]+)", cmd)
        if m:
            return m.group(1)
    return "unknown (remote broker)"


def listening_pid(port: int) -> int | None:
    """The local process listening on TCP ``port`` (None: remote, or not visible here)."""
    with contextlib.suppress(psutil.Error, OSError):
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return int(c.pid)
    return None


def service_pids(settings: Settings) -> dict[str, int]:
    """The local Kafka broker and Redis server this run uses, by role (when found)."""
    kafka_port = settings.kafka_bootstrap.split(",")[0].rpartition(":")[2]
    redis_port = urlparse(settings.redis_url).port or 6379
    out = {}
    for role, port in (("broker", int(kafka_port)), ("redis", redis_port)):
        pid = listening_pid(port)
        if pid is not None:
            out[role] = pid
    return out


def busy_cpu_s() -> tuple[float, float]:
    """CPU seconds every core of the machine spent busy since boot (not idle or waiting
    for I/O; guest time is already in user time), and of those the time the hypervisor
    ran something else on them (steal)."""
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    busy -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return float(busy), float(getattr(t, "steal", 0.0))


def native_modules() -> str:
    """How many hot-path modules the workers run compiled (``stream.native``)."""
    from stream import native

    if not native.enabled():
        return f"off ({native.ENV_SWITCH}=0)"
    compiled = sum(s.compiled is not None for s in native.status())
    return f"{compiled} of {len(native.MODULES)} compiled"


def describe(settings: Settings) -> dict[str, Any]:
    """CPU, cores, RAM, Python, Kafka, Redis and the code's git commit."""
    import redis

    from stream.redisconn import redis_sync_client

    r = redis_sync_client(settings, decode_responses=True)
    try:
        info: dict[str, Any] = r.info("server")  # type: ignore[assignment]
        redis_version = str(info.get("redis_version", "unknown"))
        persistence: dict[str, Any] = {}
        with contextlib.suppress(redis.RedisError):  # CONFIG may be refused to the user
            got = r.config_get("appendonly")
            got.update(r.config_get("auto-aof-rewrite-percentage"))
            persistence = {k.replace("-", "_"): v for k, v in got.items()}
    finally:
        r.close()
    return {
        "cpu": cpu_model(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else psutil.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "kafka": kafka_version(settings),
        "redis": redis_version,
        "redis_persistence": persistence,
        "git_commit": git_commit(),
        "native_modules": native_modules(),
    }
