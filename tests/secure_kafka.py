"""A private single-node KRaft broker that only speaks SASL_SSL (SCRAM-SHA-512), for tests.

The broker uses the same jars as the development broker (:func:`stream.services.kafka_libs`),
runs on free ports in a temporary directory and is gone after :meth:`SecureKafka.stop`:

* one client listener, ``SASL_SSL`` with ``SCRAM-SHA-512`` only; the broker talks to itself on
  it too (as the ``admin`` user), so it trusts the test CA;
* the KRaft controller listener on loopback (controllers cannot authenticate with SCRAM: the
  credentials live in the metadata log they serve);
* a throw-away CA made with ``openssl``; the broker certificate names ``127.0.0.1`` and
  ``localhost`` so clients verify the host name;
* SCRAM users written into the metadata log when the storage is formatted
  (``kafka-storage format --add-scram``), before the broker first starts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

MECHANISM = "SCRAM-SHA-512"
USER = "segstream"
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, cwd: Path) -> None:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{proc.stdout}\n{proc.stderr}")


def make_certificates(d: Path, keystore_password: str) -> tuple[Path, Path]:
    """A CA and a broker key pair signed by it; returns (CA certificate, PKCS12 keystore)."""
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=segstream test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _run("openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key",
         "-out", "broker.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "broker.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    _run("openssl", "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "2", "-out", "broker.pem", "-extfile", "broker.ext", cwd=d)
    _run("openssl", "pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key",
         "-certfile", "ca.pem", "-name", "broker", "-out", "broker.p12",
         "-passout", f"pass:{keystore_password}", cwd=d)
    return d / "ca.pem", d / "broker.p12"


@dataclass
class SecureKafka:
    """A SASL_SSL-only broker; :attr:`env` holds the engine settings that reach it."""

    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="segstream-sasl-")))
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    admin_password: str = field(default_factory=lambda: secrets.token_hex(12))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def cafile(self) -> Path:
        return self.base / "ca.pem"

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    @property
    def env(self) -> dict[str, str]:
        """``SEGSTREAM_*`` connection settings of a deployment on this broker."""
        return {
            "SEGSTREAM_KAFKA_BOOTSTRAP": self.bootstrap,
            "SEGSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "SEGSTREAM_KAFKA_SASL_MECHANISM": MECHANISM,
            "SEGSTREAM_KAFKA_SASL_USERNAME": USER,
            "SEGSTREAM_KAFKA_SASL_PASSWORD": self.password,
            "SEGSTREAM_KAFKA_SSL_CAFILE": str(self.cafile),
        }

    def client_config(self, **overrides: object) -> dict[str, object]:
        """kafka-python settings written out by hand (not through the engine's own helper)."""
        cfg: dict[str, object] = {
            "bootstrap_servers": [self.bootstrap],
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": MECHANISM,
            "sasl_plain_username": USER,
            "sasl_plain_password": self.password,
            "ssl_cafile": str(self.cafile),
            "request_timeout_ms": 10_000,
        }
        cfg.update(overrides)
        return cfg

    def properties(self, keystore: Path, keystore_password: str) -> str:
        jaas = ("org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="admin" password="{self.admin_password}";')
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=SASL_SSL://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=SASL_SSL://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=SASL_SSL",
            f"sasl.enabled.mechanisms={MECHANISM}",
            f"sasl.mechanism.inter.broker.protocol={MECHANISM}",
            f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={jaas}",
            "ssl.keystore.type=PKCS12",
            f"ssl.keystore.location={keystore}",
            f"ssl.keystore.password={keystore_password}",
            f"ssl.key.password={keystore_password}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.cafile}",
            "ssl.client.auth=none",
            f"log.dirs={self.base / 'data'}",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=3",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "delete.topic.enable=true",
            "message.max.bytes=10485760",
            "",
        ])

    def start(self) -> SecureKafka:
        from stream import services
        from stream.settings import load_settings

        if not shutil.which("java") or not shutil.which("openssl"):
            raise RuntimeError("java and openssl are needed for the SASL_SSL broker")
        libs = services.kafka_libs(load_settings())
        store_pw = secrets.token_hex(12)
        _, keystore = make_certificates(self.base, store_pw)
        props = self.base / "server.properties"
        props.write_text(self.properties(keystore, store_pw))
        log4j = self.base / "log4j2.properties"
        log4j.write_text(
            "status = warn\nappender.f.type = File\nappender.f.name = F\n"
            f"appender.f.fileName = {self.log}\n"
            "appender.f.layout.type = PatternLayout\n"
            "appender.f.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = info\nrootLogger.appenderRef.f.ref = F\n"
            "logger.kafka.name = kafka\nlogger.kafka.level = info\n"
            "logger.apache.name = org.apache.kafka\nlogger.apache.level = warn\n"
        )
        cp = f"{libs}/*"
        _run("java", "-cp", cp, "kafka.tools.StorageTool", "format",
             "-t", uuid.uuid4().hex[:22], "-c", str(props),
             "--add-scram", f"{MECHANISM}=[name={USER},password={self.password}]",
             "--add-scram", f"{MECHANISM}=[name=admin,password={self.admin_password}]",
             cwd=self.base)
        out = open(self.base / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            ["java", "-Xms128m", "-Xmx512m", "-XX:+UseSerialGC",
             f"-Dlog4j2.configurationFile={log4j}", "-cp", cp, "kafka.Kafka", str(props)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"SASL_SSL broker exited:\n{self.tail()}")
            try:
                a = KafkaAdminClient(**self.client_config(request_timeout_ms=5000))
                try:
                    a.list_topics()
                    return
                finally:
                    a.close()
            except (KafkaError, OSError) as exc:
                last = exc
                time.sleep(1.0)
        raise RuntimeError(f"SASL_SSL broker not ready ({last!r}):\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        parts = []
        for f in (self.base / "stdout.log", self.log):
            if f.exists():
                parts.append(f.read_text(errors="replace")[-n:])
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)
