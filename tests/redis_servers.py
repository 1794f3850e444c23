"""Throw-away Redis servers for tests: a Redis Cluster, and a TLS server with ACL users.

Both run Debian's ``redis-server`` as child processes in a temporary directory on free
loopback ports, and are torn down (processes stopped, files removed) afterwards.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (scripts/setup installs it)")
    return found


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited ({proc.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server not listening on {port}")


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=15)


def _start(args: list[str], d: Path, port: int) -> subprocess.Popen[bytes]:
    log = d / "redis.log"
    proc = subprocess.Popen([_binary("redis-server"), *args, "--dir", str(d),
                             "--logfile", str(log), "--daemonize", "no", "--save", "",
                             "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, log)
    except BaseException:
        _stop([proc])
        raise
    return proc


# -- A plain server ---------------------------------------------------------------------

def plain_redis(port: int, d: Path) -> subprocess.Popen[bytes]:
    """A plain redis-server on ``port`` (data in ``d``), listening when this returns."""
    return _start(["--port", str(port), "--appendonly", "no"], d, port)


def stop(proc: subprocess.Popen[bytes]) -> None:
    _stop([proc])


# -- Redis Cluster ----------------------------------------------------------------------

@dataclass
class Cluster:
    """A running Redis Cluster of primaries only."""

    ports: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A seed URL; the cluster client discovers the other nodes from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def cli(self, *args: str, port: int | None = None) -> str:
        out = subprocess.run([_binary("redis-cli"), "-p", str(port or self.ports[0]), *args],
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout


@contextmanager
def redis_cluster(nodes: int = 3) -> Iterator[Cluster]:
    """Start ``nodes`` cluster-mode servers, join them into one cluster, stop them after."""
    with tempfile.TemporaryDirectory(prefix="segstream-cluster-") as tmp:
        cluster = Cluster([])
        try:
            for i in range(nodes):
                port = free_port()
                d = Path(tmp) / f"n{i}"
                d.mkdir()
                # The bus port defaults to port + 10000, which may be taken or too high.
                cluster.procs.append(_start(
                    ["--port", str(port), "--cluster-port", str(free_port()),
                     "--cluster-enabled", "yes",
                     "--cluster-config-file", str(d / "nodes.conf"),
                     "--cluster-node-timeout", "5000", "--appendonly", "yes"], d, port))
                cluster.ports.append(port)
            subprocess.run(
                [_binary("redis-cli"), "--cluster", "create",
                 *(f"127.0.0.1:{p}" for p in cluster.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=120, check=True)
            deadline = time.monotonic() + 60
            while True:
                states = [cluster.cli("cluster", "info", port=p) for p in cluster.ports]
                if all("cluster_state:ok" in s for s in states):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not ok: {states}")
                time.sleep(0.2)
            yield cluster
        finally:
            _stop(cluster.procs)


# -- TLS with ACL users -----------------------------------------------------------------

ENGINE_USER = "segstream"
ENGINE_PASSWORD = "s3cret-engine"
ADMIN_USER = "admin"
ADMIN_PASSWORD = "s3cret-admin"


def engine_acl(prefixes: Sequence[str]) -> str:
    """The ACL rule of the engine's user: only its deployments' keys, no dangerous commands.

    Nothing the engine sends is in ``@dangerous`` (INFO, KEYS, CONFIG, FLUSHALL, DEBUG,
    MONITOR, SORT, ... are; SCAN, SCRIPT LOAD, EVALSHA, XADD, UNLINK and CLUSTER SLOTS
    are not), so the rule needs no exception.
    """
    keys = " ".join(f"~{p}*" for p in prefixes)
    return f"user {ENGINE_USER} on >{ENGINE_PASSWORD} {keys} +@all -@dangerous"


@dataclass
class TlsRedis:
    """A TLS-only Redis with ACL users and the CA that signed its certificate."""

    port: int
    ca_file: Path
    proc: subprocess.Popen[bytes]

    def url(self, user: str = ENGINE_USER, password: str = ENGINE_PASSWORD) -> str:
        return f"rediss://{user}:{password}@127.0.0.1:{self.port}/0"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([_binary("openssl"), *args], cwd=cwd, check=True, capture_output=True,
                   timeout=120)


def make_certificates(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost: (ca, cert, key)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=segstream test CA", "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt",
             cwd=d)
    return d / "ca.crt", d / "server.crt", d / "server.key"


@contextmanager
def tls_redis(prefixes: Sequence[str]) -> Iterator[TlsRedis]:
    """A Redis listening only on TLS; ``default`` is off, the engine user owns ``prefixes``.

    The ``admin`` user may do anything; tests use it to look behind the engine's back.
    """
    with tempfile.TemporaryDirectory(prefix="segstream-tls-") as tmp:
        d = Path(tmp)
        ca, cert, key = make_certificates(d)
        port = free_port()
        rules = [
            "user default off",
            f"user {ADMIN_USER} on >{ADMIN_PASSWORD} ~* &* +@all",
            engine_acl(prefixes),
        ]
        (d / "users.acl").write_text("\n".join(rules) + "\n")
        proc = _start(["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                       "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                       "--tls-auth-clients", "no", "--aclfile", str(d / "users.acl")], d, port)
        try:
            yield TlsRedis(port, ca, proc)
        finally:
            _stop([proc])
