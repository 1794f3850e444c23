"""Local Kafka (KRaft, single node) and Redis for development, tests and the demo.

``up`` reuses healthy running services, otherwise starts them as local processes:
Kafka from jars resolved by Maven (``deploy/kafka/pom.xml``) into a cache outside the
repository, Redis from the system's ``redis-server`` (installed with apt when
missing). When a Docker engine is reachable and ``SEGSTREAM_USE_DOCKER=1``, the
``kafka`` and ``redis`` services of ``docker-compose.yml`` are used instead.
``down`` stops only what ``up`` started (it keeps pid files).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from stream.errors import ServiceError, SettingsError
from stream.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
KAFKA_VERSION = "4.4.0"
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Health:
    kafka: bool
    redis: bool
    #: why a service is not usable, naming the setting to fix (``diagnose`` only)
    kafka_reason: str | None = None
    redis_reason: str | None = None


def _hostport(bootstrap: str) -> tuple[str, int]:
    """The first broker's host and port; an IPv6 address loses its brackets.

    >>> _hostport("[::1]:9092,other:9092"), _hostport("127.0.0.1:19092")
    (('::1', 9092), ('127.0.0.1', 19092))
    """
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _redis_hostport(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "127.0.0.1", u.port or 6379


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def kafka_healthy(settings: Settings) -> bool:
    """The broker answers a metadata request."""
    host, port = _hostport(settings.kafka_bootstrap)
    if not _port_open(host, port):
        return False
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    from stream.kafka import client_config

    try:
        cfg = client_config(settings)
        cfg["request_timeout_ms"] = 5000
        a = KafkaAdminClient(**cfg)
        try:
            a.list_topics()
        finally:
            a.close()
        return True
    except (KafkaError, OSError, ValueError):
        return False


def redis_healthy(settings: Settings) -> bool:
    """Redis answers PING."""
    from redis.exceptions import RedisClusterException, RedisError

    from stream.redisconn import redis_sync_client

    try:
        r = redis_sync_client(settings, timeout_s=2)
        try:
            return bool(r.ping())
        finally:
            r.close()
    except (RedisError, RedisClusterException, OSError):  # a cluster's are not RedisErrors
        return False


def health(settings: Settings) -> Health:
    return Health(kafka=kafka_healthy(settings), redis=redis_healthy(settings))


def diagnose(settings: Settings) -> Health:
    """Whether the engine can use each service, with the reason when not: the checks every
    command runs first (TLS, credentials, the deployment's key prefix), so a rejected
    password is told apart from a server that is down, in about a second."""
    from stream.errors import SegstreamError
    from stream.kafka import check_connection
    from stream.redisconn import check_redis

    def reason(check: Any) -> str | None:
        try:
            check()
        except SegstreamError as exc:
            return str(exc)
        return None

    kafka_reason = reason(lambda: check_connection(settings, wait_s=5.0))
    if kafka_reason is None and not kafka_healthy(settings):
        kafka_reason = (f"Kafka at {settings.kafka_bootstrap} took the connection but did "
                        "not answer a metadata request (SEGSTREAM_KAFKA_BOOTSTRAP)")
    redis_reason = reason(lambda: check_redis(settings))
    return Health(kafka_reason is None, redis_reason is None, kafka_reason, redis_reason)


def _command_line(pid: int) -> str | None:
    """The command line of process ``pid`` (its arguments joined by spaces), or None."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None  # Linux: no such process
        try:  # elsewhere (macOS): ask ps
            out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)],
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() or None
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None


def _pid_alive(pid_file: Path, *marks: str) -> int | None:
    """The pid in ``pid_file`` if that process runs and is the one ``up`` started: its
    command line holds every one of ``marks``. A pid left in a stale file may by now be
    any other process, which ``down`` must not signal."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    cmd = _command_line(pid)
    # each mark ends an argument: ":6379 " is not found in "…:63790 "
    if cmd is None or not all(m in f"{cmd} " for m in marks):
        return None
    return pid


def _wait(check: object, what: str, timeout: float = START_TIMEOUT_S,
          exited: Any = None) -> None:
    """Until ``check()``; fails at once when ``exited()`` gives a reason (the service's
    process ended), instead of waiting out the timeout for a service that is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        why = exited() if exited is not None else None
        if why:
            raise ServiceError(f"{what} exited at start: {why}")
        time.sleep(0.5)
    raise ServiceError(f"{what} did not become healthy within {timeout:.0f}s")


def _last_line(log: Path, *, containing: tuple[str, ...] = ()) -> str:
    """The last line of ``log`` (the last holding one of ``containing``, when given)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"see {log}"
    if containing:
        picked = [ln for ln in lines if any(c in ln for c in containing)]
        lines = picked or lines
    return (lines[-1][:300] + f" (see {log})") if lines else f"see {log}"


def _port_free(port: int) -> bool:
    """Nothing listens on loopback ``port`` and it can be bound."""
    if _port_open("127.0.0.1", port, timeout=0.5):
        return False
    with socket.socket() as sock:
        # As the servers bind it: connections of a server just stopped, left in TIME_WAIT,
        # do not keep the port from being bound again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -- Redis -------------------------------------------------------------------------


def redis_server_binary() -> str:
    """Path of redis-server, installing Debian's package when missing (needs root)."""
    found = shutil.which("redis-server")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, env=env)
        found = shutil.which("redis-server")
        if found:
            return found
    raise ServiceError("redis-server is not installed; install it (apt-get install redis-server)"
                       " or point SEGSTREAM_REDIS_URL at a running Redis")


#: Redis rewrites its append-only file once it grew by this many per cent of its size after
#: the last rewrite (Redis' default: 100). The engine rewrites a customer's state and profile
#: at every evaluation, so the file grows by about their size per evaluated customer, and at
#: 100 a busy engine made Redis fork and rewrite every few seconds: the child's CPU and the
#: copy-on-write faults it causes in the server slowed commits (see README, "Redis'
#: append-only file"). At 800 the file may reach nine times the data before a rewrite.
REDIS_AOF_REWRITE_PERCENTAGE = 800


def start_redis(settings: Settings) -> None:
    host, port = _redis_hostport(settings.redis_url)
    if host not in ("127.0.0.1", "localhost"):
        raise ServiceError(f"SEGSTREAM_REDIS_URL points at {host}; `up` only starts a local Redis")
    if settings.redis_cluster or settings.redis_url.startswith("rediss://"):
        # A single plaintext server on that port would not be what the settings describe.
        raise ServiceError("`up` only starts a plain single Redis; start the Redis Cluster or "
                           "TLS Redis yourself (SEGSTREAM_REDIS_CLUSTER / SEGSTREAM_REDIS_URL)")
    if not _port_free(port):
        raise ServiceError(f"port {port} of SEGSTREAM_REDIS_URL is in use by something that "
                           "is not a Redis answering there; stop it or choose another port")
    d = _redis_dir(settings, port)
    d.mkdir(parents=True, exist_ok=True)
    pid_file = d / "redis.pid"
    pid_file.unlink(missing_ok=True)
    started = time.monotonic()
    subprocess.run(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
         "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(d),
         "--auto-aof-rewrite-percentage", str(REDIS_AOF_REWRITE_PERCENTAGE),
         "--daemonize", "yes", "--pidfile", str(pid_file),
         "--logfile", str(d / "redis.log"), "--save", ""],
        check=True,
    )

    def exited() -> str | None:
        # The daemon writes its pid file once it runs; give it a moment to.
        if time.monotonic() - started < 3 or _pid_alive(pid_file, *_redis_marks(port)):
            return None
        return _last_line(d / "redis.log", containing=("#",))

    _wait(lambda: redis_healthy(settings), f"Redis on port {port}", exited=exited)


def _redis_dir(settings: Settings, port: int) -> Path:
    """Each port's server has its own directory (its append-only file and pid file)."""
    return settings.data_dir / "redis" / f"port-{port}"


def _redis_marks(port: int) -> tuple[str, ...]:
    """What the command line of the Redis ``up`` started on ``port`` holds (redis-server
    shows its address there)."""
    return ("redis-server", f":{port} ")


def stop_redis(settings: Settings) -> bool:
    _, port = _redis_hostport(settings.redis_url)
    return _stop(_redis_dir(settings, port) / "redis.pid", *_redis_marks(port))


# -- Kafka -------------------------------------------------------------------------


def kafka_libs(settings: Settings, version: str = KAFKA_VERSION) -> Path:
    """The broker's jars, resolved from Maven Central on first use and cached."""
    libs = settings.data_dir / "kafka" / f"libs-{version}"
    if libs.is_dir() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    if not shutil.which("mvn"):
        raise ServiceError("Maven (mvn) is needed to fetch Kafka's jars; install maven")
    tmp = libs.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
         f"-DoutputDirectory={tmp}", f"-Dkafka.version={version}"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise ServiceError(f"resolving Kafka {version} jars failed:\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    tmp.rename(libs)
    return libs


def _kafka_properties(settings: Settings, data: Path) -> str:
    host, port = _hostport(settings.kafka_bootstrap)
    ctl = port + 1
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{ctl}",
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctl}",
        f"advertised.listeners=PLAINTEXT://{host}:{port}",
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={data}",
        "num.partitions=1",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=10",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=false",
        "delete.topic.enable=true",
        "message.max.bytes=10485760",
        "log.retention.hours=-1",
        "",
    ])


def start_kafka(settings: Settings) -> None:
    host, port = _hostport(settings.kafka_bootstrap)
    if host not in ("127.0.0.1", "localhost"):
        raise ServiceError(f"SEGSTREAM_KAFKA_BOOTSTRAP points at {host}; "
                           "`up` only starts a local broker")
    if not shutil.which("java"):
        raise ServiceError("Java 17+ is needed to run the Kafka broker")
    for p, what in ((port, ""), (port + 1, " (the local broker's controller listens on the "
                                           "next port)")):
        if not _port_free(p):
            raise ServiceError(
                f"port {p} is in use{what}, so a broker for SEGSTREAM_KAFKA_BOOTSTRAP "
                f"{settings.kafka_bootstrap} cannot start; stop what uses it or choose "
                "another port")
    libs = kafka_libs(settings)
    base = settings.data_dir / "kafka" / f"node-{port}"
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    props = base / "server.properties"
    props.write_text(_kafka_properties(settings, data))
    log4j = base / "log4j2.properties"
    log4j.write_text(
        "status = warn\nappender.f.type = File\nappender.f.name = F\n"
        f"appender.f.fileName = {base / 'server.log'}\n"
        "appender.f.layout.type = PatternLayout\n"
        "appender.f.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = info\nrootLogger.appenderRef.f.ref = F\n"
        "logger.kafka.name = kafka\nlogger.kafka.level = warn\n"
        "logger.apache.name = org.apache.kafka\nlogger.apache.level = warn\n"
    )
    cp = f"{libs}/*"
    if not (data / "meta.properties").exists():
        subprocess.run(
            ["java", "-cp", cp, "kafka.tools.StorageTool", "format", "-t",
             uuid.uuid4().hex[:22], "-c", str(props), "--ignore-formatted"],
            check=True, capture_output=True,
        )
    out = open(base / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        ["java", "-Xms256m", "-Xmx1g", "-XX:+UseG1GC",
         f"-Dlog4j2.configurationFile={log4j}", "-cp", cp, "kafka.Kafka", str(props)],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    (base / "kafka.pid").write_text(str(proc.pid))

    def exited() -> str | None:
        if proc.poll() is None:
            return None
        return _last_line(base / "server.log", containing=("ERROR", "Exception")) \
            if (base / "server.log").exists() else _last_line(base / "stdout.log")

    _wait(lambda: kafka_healthy(settings), f"Kafka on port {port}", exited=exited)


def stop_kafka(settings: Settings) -> bool:
    _, port = _hostport(settings.kafka_bootstrap)
    base = settings.data_dir / "kafka" / f"node-{port}"
    return _stop(base / "kafka.pid", "kafka.Kafka ", f"{base / 'server.properties'} ")


def _stop(pid_file: Path, *marks: str, timeout: float = 30.0) -> bool:
    pid = _pid_alive(pid_file, *marks)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            break
        if _command_line(pid) is None:
            break  # exited, not yet reaped by its parent (a zombie has no command line)
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


# -- Docker --------------------------------------------------------------------------


def docker_available() -> bool:
    """A Docker engine answers (the client alone is not enough)."""
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


#: Where ``docker-compose.yml`` publishes its services on the host.
COMPOSE_KAFKA_PORT = 29092
COMPOSE_REDIS_PORT = 6379


def check_compose_ports(settings: Settings) -> None:
    """Fail naming the setting when the compose services would not be where the settings
    look for them (they would start, and ``up`` would wait for nothing).

    >>> try:
    ...     check_compose_ports(Settings(kafka_bootstrap="127.0.0.1:9092"))
    ... except SettingsError as exc:
    ...     print(str(exc).rpartition(": ")[2])
    set SEGSTREAM_KAFKA_BOOTSTRAP=localhost:29092
    >>> check_compose_ports(Settings(kafka_bootstrap="localhost:29092",
    ...                              redis_url="redis://localhost:6379/0"))
    """
    host, port = _hostport(settings.kafka_bootstrap)
    if host not in ("127.0.0.1", "localhost") or port != COMPOSE_KAFKA_PORT:
        raise SettingsError(
            f"SEGSTREAM_KAFKA_BOOTSTRAP is {settings.kafka_bootstrap}, but docker-compose.yml "
            f"publishes Kafka on localhost:{COMPOSE_KAFKA_PORT}: set "
            f"SEGSTREAM_KAFKA_BOOTSTRAP=localhost:{COMPOSE_KAFKA_PORT}")
    host, port = _redis_hostport(settings.redis_url)
    if host not in ("127.0.0.1", "localhost") or port != COMPOSE_REDIS_PORT:
        raise SettingsError(
            f"SEGSTREAM_REDIS_URL points at {host}:{port}, but docker-compose.yml publishes "
            f"Redis on localhost:{COMPOSE_REDIS_PORT}: set "
            f"SEGSTREAM_REDIS_URL=redis://localhost:{COMPOSE_REDIS_PORT}/0")


def _compose_up() -> None:
    subprocess.run(["docker", "compose", "-f", str(REPO_ROOT / "docker-compose.yml"),
                    "up", "-d", "kafka", "redis"], check=True)


# -- entry points ---------------------------------------------------------------------


def up(settings: Settings) -> dict[str, str]:
    """Make Kafka and Redis healthy; returns what was done for each."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"SEGSTREAM_DATA_DIR: cannot create {settings.data_dir} "
                            f"({exc.strerror or exc})") from None
    done: dict[str, str] = {}
    h = health(settings)
    if not (h.kafka and h.redis) and os.environ.get("SEGSTREAM_USE_DOCKER") == "1" \
            and docker_available():
        check_compose_ports(settings)
        _compose_up()
        _wait(lambda: health(settings).kafka and health(settings).redis, "docker services")
        return {"kafka": "docker", "redis": "docker"}
    if h.redis:
        done["redis"] = "reused"
    else:
        start_redis(settings)
        done["redis"] = "started"
    if h.kafka:
        done["kafka"] = "reused"
    else:
        start_kafka(settings)
        done["kafka"] = "started"
    return done


def down(settings: Settings) -> dict[str, bool]:
    """Stop what ``up`` started."""
    return {"kafka": stop_kafka(settings), "redis": stop_redis(settings)}
