"""One settings object, read from ``SEGSTREAM_*`` environment variables once at start."""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlparse

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url as redis_parse_url

from stream.errors import SettingsError

log = logging.getLogger(__name__)

ENV_PREFIX = "SEGSTREAM_"
# Patterns are applied with fullmatch: ``$`` would also match before a final newline.
_NAME_RE = re.compile(r"[A-Za-z0-9._:-]*")
#: What Kafka allows in a topic name (the app id names a topic and the consumer group).
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]*")
#: A host name: dot-separated labels (letters, digits, ``_`` and ``-``), a final dot allowed.
_HOST_NAME_RE = re.compile(r"[\w-]+(?:\.[\w-]+)*\.?")
#: ``SEGSTREAM_*`` variables read outside :class:`Settings` (not typos of a setting):
#: compiled modules (``stream.native``), ``segstream up`` with Docker, the learner child,
#: and the test suite's own.
OTHER_ENV_VARS = frozenset({
    "SEGSTREAM_NATIVE", "SEGSTREAM_NATIVE_DIR", "SEGSTREAM_USE_DOCKER",
    "SEGSTREAM_LEARNER_PARENT_PID", "SEGSTREAM_FAULT_SEED", "SEGSTREAM_UPDATE_SCREENSHOT",
})
#: The test suite's variables (``tests/conftest.py`` keeps them out of a deployment's).
_TEST_ENV_PREFIX = "SEGSTREAM_TEST"


def _redis_client_refuses(url: str, cluster: bool) -> str | None:
    """Why redis-py cannot build the engine's client from ``url``, or None.

    redis-py hands a query option it does not read itself to the client or its connections,
    whose constructor then fails with a TypeError at the first command: the client is built
    here, without connecting, to find that out at start.
    """
    from redis import asyncio as aioredis
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    try:
        if cluster:
            aioredis.RedisCluster.from_url(url, socket_timeout=1.0)
        else:
            aioredis.ConnectionPool.from_url(url, socket_timeout=1.0).make_connection()
    except TypeError as exc:
        m = re.search(r"unexpected keyword argument '([^']*)'", str(exc))
        if m is None:
            return str(exc)
        close = difflib.get_close_matches(
            m.group(1), sorted(set(URL_QUERY_ARGUMENT_PARSERS) - {m.group(1)}), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        client = "a Redis Cluster client" if cluster else "the client"
        return f"{client} takes no option {m.group(1)!r} in the URL's query{hint}"
    except Exception:  # anything else is the URL's or the connection's to report, later
        return None
    return None


class Settings(BaseSettings):
    """Engine configuration. Every field is ``SEGSTREAM_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore",
                                      allow_inf_nan=False)

    app_id: str = Field("segstream", min_length=1, max_length=100)
    topic_prefix: str = Field("", max_length=100)
    #: Never empty: ``segstream reset`` deletes every key under it.
    redis_prefix: str = Field("segstream:", min_length=1, max_length=100)

    kafka_bootstrap: str = "127.0.0.1:9092"
    # -- security: Kafka SASL/TLS and log redaction (checked together at start) -------
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, validate_default=True)
    kafka_sasl_username: str | None = Field(None, validate_default=True)
    kafka_sasl_password: SecretStr | None = Field(None, validate_default=True)
    kafka_ssl_cafile: Path | None = Field(None, validate_default=True)
    #: Key of the HMAC that stands for customer ids in logs (``stream.redact.cid_ref``);
    #: unset, every process draws a random one.
    log_hash_key: SecretStr | None = None

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: The durations have floors where a smaller value cannot work: a Redis timeout
    #: shorter than a round trip, or a sweep interval that turns the sweeper into a busy loop.
    redis_timeout_s: float = Field(5.0, ge=0.05, le=120)
    #: ``redis_url`` is one seed node of a Redis Cluster (the other nodes are discovered).
    redis_cluster: bool = False
    #: CA bundle that signed the server's certificate (``rediss://`` only; default: system CAs).
    redis_tls_ca_file: Path | None = None
    #: Client certificate and key, when the server requires them (``tls-auth-clients yes``).
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = Field(None, validate_default=True)

    partitions: int = Field(6, ge=1, le=1024)
    web_host: str = Field("127.0.0.1", min_length=1)
    web_port: int = Field(6066, ge=1, le=65535)
    api_token: SecretStr | None = None

    allowed_lateness_days: float = Field(7.0, ge=0, le=3650)
    max_future_skew_s: float = Field(300.0, ge=0, le=31_536_000)
    max_event_bytes: int = Field(65_536, ge=256, le=10_000_000)
    #: The one currency of the deployment's amounts (ISO 4217, e.g. ``USD``): a transaction
    #: naming another goes to the DLQ as ``currency`` (one without ``currency`` is taken to
    #: be in it). Unset: amounts are summed as given, whatever currency they name.
    currency: str | None = Field(None, pattern=r"^[A-Za-z]{3}$")
    #: Most bytes of a rejected record kept in its dead letter. Escaped as JSON, a byte can
    #: take six (a control character), so at this bound a dead letter stays under the
    #: producer's 1 MiB request and the default 1 MB ``max.message.bytes``; a larger one
    #: would be refused by Kafka and block its partition's outbox for good.
    dlq_payload_bytes: int = Field(4_096, ge=64, le=160_000)

    #: The longest the broker holds a worker's fetch when its partitions have no new records.
    kafka_fetch_max_wait_ms: int = Field(50, ge=1, le=10_000)
    #: About how long the broker holds a worker's fetch to gather more input: the fetch's
    #: minimum size follows the input rate (:mod:`stream.fetch_size`). 0: a fetch is
    #: answered at the first new record. At most ``kafka_fetch_max_wait_ms``.
    kafka_fetch_coalesce_ms: int = Field(0, ge=0, le=10_000)
    #: Largest record batch the worker's producer sends to one partition. The producer
    #: keeps one request in flight per broker, and a request carries one batch per
    #: partition, so a batch's outbox goes out in about size / (partitions x this)
    #: round trips; it must not exceed the output topics' ``max.message.bytes``.
    kafka_produce_batch_bytes: int = Field(524_288, ge=16_384, le=64 * 1024 * 1024)
    #: Largest micro-batch. A customer is evaluated once per batch, so larger batches observe
    #: fewer label examples and intermediate moves while a backlog (a replay) is worked off.
    batch_max: int = Field(2_000, ge=1, le=100_000)
    #: The longest a micro-batch gathers input; it is handed over sooner once it holds
    #: ``batch_max`` records or everything that was waiting for the worker.
    batch_within_s: float = Field(0.05, ge=0.001, le=10)
    #: Align catch-up on event time: a batch takes no record newer than what the
    #: partitions still behind in Kafka have fetched, and waits at most this long for
    #: one whose fetch does not come (:mod:`stream.inbox`). 0: no alignment.
    align_wait_s: float = Field(2.0, ge=0, le=600)
    #: Publish a batch's outbox (migrations, examples, dead letters) while the next batch
    #: is loaded and evaluated; off, a batch ends once its outbox is published. Either way
    #: the outbox is committed with the batch and published in commit order.
    publish_in_background: bool = True
    #: Commit a batch's state to the store, then publish its outbox, while the next batch
    #: is loaded and evaluated (which reads what that commit writes from the commit
    #: itself); off, a batch ends once its state is committed. A commit that does not land
    #: is applied again before any later batch commits, and a batch that read it is judged
    #: again.
    commit_in_background: bool = True
    #: The worker's event loop: ``uvloop`` (libuv; cheaper per loop turn, and Faust takes a
    #: turn per event) or ``asyncio`` (the standard library's).
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    #: Net new container objects that start a young-generation garbage collection in the
    #: worker (Python's default is 700). A micro-batch's objects are freed by reference
    #: counting when it ends, so a threshold above a batch's peak means no collection runs
    #: inside a batch; only reference cycles (rare) ever reach it.
    gc_threshold: int = Field(200_000, ge=100, le=100_000_000)
    #: Move every object that exists once the worker is assembled (modules, Faust, River)
    #: out of the collector's sight, so a full collection scans only what came later.
    gc_freeze: bool = True

    rules_path: Path | None = None
    actions_path: Path | None = None
    sweep_interval_s: float = Field(30.0, ge=0.1, le=86_400)
    #: While events keep arriving, sweeps take at most this share of the worker's time:
    #: after each step of a pass that took t seconds, the pass waits t * (1 - share) / share.
    sweep_max_share: float = Field(0.1, gt=0, le=1)
    population_refresh_s: float = Field(1.0, ge=0.05, le=3_600)
    models_enabled: bool = True
    #: where the online models train: a child process of each worker (one of them active)
    #: or the worker's own event loop, shared with the ingest agent
    learner: Literal["process", "inline"] = "process"
    churn_horizon_days: float = Field(30.0, gt=0, le=3650)
    churn_horizon_txn_days: float = Field(90.0, gt=0, le=3650)
    observation_gap_days: int = Field(7, ge=1, le=3650)
    model_snapshot_s: float = Field(5.0, ge=0.1, le=3_600)
    model_promote_s: float = Field(300.0, ge=0.1, le=86_400)
    clv_refit_interval_s: float = Field(600.0, ge=0, le=604_800)

    data_dir: Path = Path.home() / ".cache" / "segstream"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("topic_prefix", "app_id")
    @classmethod
    def _topic_name(cls, v: str) -> str:
        # Part of topic names: Kafka allows only these characters in them.
        if not _TOPIC_RE.fullmatch(v):
            raise ValueError("use only letters, digits and . _ - (it is part of topic names)")
        return v

    @field_validator("redis_prefix")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # Braces would change Redis Cluster hash slots.
        if not _NAME_RE.fullmatch(v):
            raise ValueError("use only letters, digits and . _ : -")
        return v

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir(cls, v: object) -> object:
        # An empty value would be read as the working directory.
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty; give a directory or unset it (default ~/.cache/segstream)")
        if isinstance(v, str | Path):
            # ``~`` as a shell would read it, and absolute: ``segstream down`` finds what
            # ``up`` started (their PID files) from any working directory.
            try:
                v = Path(v).expanduser().absolute()
            except RuntimeError as exc:  # ``~user`` of no such user
                raise ValueError(f"{v}: {exc}") from None
            if v.exists() and not v.is_dir():
                raise ValueError(f"{v} exists and is not a directory")
        return v

    @field_validator("web_host")
    @classmethod
    def _web_host(cls, v: str) -> str:
        # Bound as given: a URL or a stray space would fail only when the server starts.
        if v and not is_host(v, brackets=False):
            raise ValueError("expected a host name or IP address to listen on (no scheme, "
                             "port, path or spaces), e.g. 127.0.0.1 or 0.0.0.0")
        return v

    @field_validator("api_token", "log_hash_key")
    @classmethod
    def _not_blank(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # An empty value is a mistake, not a way to turn the feature off: say so.
        if v is not None and not v.get_secret_value().strip():
            raise ValueError(f"empty; unset {env_name(info.field_name or '')} instead")
        if v is not None and info.field_name == "api_token":
            # Clients' tokens are compared without surrounding whitespace; a secret read
            # from a file often ends in a newline, which would lock every client out.
            return SecretStr(v.get_secret_value().strip())
        return v

    @field_validator("rules_path", "actions_path")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("no such file")
        return v

    @field_validator("kafka_fetch_coalesce_ms")
    @classmethod
    def _coalesce_within_wait(cls, v: int, info: ValidationInfo) -> int:
        wait = info.data.get("kafka_fetch_max_wait_ms")
        if wait is not None and v > wait:
            raise ValueError(f"{v} ms is longer than SEGSTREAM_KAFKA_FETCH_MAX_WAIT_MS ({wait} "
                             "ms), the longest the broker holds a fetch")
        return v

    @field_validator("kafka_sasl_mechanism")
    @classmethod
    def _sasl_mechanism(cls, v: str | None, info: ValidationInfo) -> str | None:
        protocol = info.data.get("kafka_security_protocol")
        if protocol is None:
            return v
        if protocol.startswith("SASL_") and v is None:
            raise ValueError(f"required when SEGSTREAM_KAFKA_SECURITY_PROTOCOL is {protocol}")
        if not protocol.startswith("SASL_") and v is not None:
            raise ValueError(f"SEGSTREAM_KAFKA_SECURITY_PROTOCOL is {protocol}, which does not "
                             "authenticate with SASL; use SASL_SSL (or SASL_PLAINTEXT)")
        return v

    @field_validator("kafka_sasl_username", "kafka_sasl_password")
    @classmethod
    def _sasl_credential(cls, v: str | SecretStr | None, info: ValidationInfo
                         ) -> str | SecretStr | None:
        mechanism = info.data.get("kafka_sasl_mechanism")
        given = v.get_secret_value() if isinstance(v, SecretStr) else v
        if given and not given.strip():
            raise ValueError(f"only whitespace; give a value or unset "
                             f"{env_name(info.field_name or '')}")
        if mechanism is not None and not given:
            raise ValueError(f"required when SEGSTREAM_KAFKA_SASL_MECHANISM is {mechanism}")
        protocol = info.data.get("kafka_security_protocol")
        if given and protocol is not None and not protocol.startswith("SASL_"):
            raise ValueError(f"SEGSTREAM_KAFKA_SECURITY_PROTOCOL is {protocol}, which does not "
                             "authenticate with SASL; it would be ignored")
        return v

    @field_validator("kafka_ssl_cafile")
    @classmethod
    def _ssl_cafile(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return v
        protocol = info.data.get("kafka_security_protocol")
        if protocol is not None and protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(f"SEGSTREAM_KAFKA_SECURITY_PROTOCOL is {protocol}, which does not "
                             "use TLS; use SSL or SASL_SSL")
        if not v.is_file():
            raise ValueError("no such file")
        _check_ca_file(v)
        return v

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        for part in v.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not (port.isascii() and port.isdigit()):
                raise ValueError("expected host:port[,host:port...]")
            if ":" in host and _is_ip(host):
                # the Kafka clients read "::1:9092" as the address "::1:9092", default port
                raise ValueError(f"{part.strip()!r}: an IPv6 address goes in brackets, as "
                                 f"[{host}]:{port}")
            if not is_host(host):
                raise ValueError(f"{part.strip()!r} is not host:port with a host name or IP "
                                 "address (no scheme or spaces); expected "
                                 "host:port[,host:port...]")
            if not 1 <= int(port) <= 65535:
                raise ValueError(f"port {port} is not between 1 and 65535")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://, rediss:// or unix:// URL")
        url = urlparse(v)
        databases = parse_qs(url.query).get("db", [])
        if not v.startswith("unix://"):
            try:
                port = url.port
            except ValueError:
                raise ValueError("the port is not a number between 1 and 65535") from None
            if port == 0:
                raise ValueError("the port is not a number between 1 and 65535")
            if not url.hostname:
                raise ValueError("no host")
            databases.append(url.path.strip("/") or "0")
        for db in databases:
            # redis-py ignores a database it cannot parse and uses database 0
            if not (db.isascii() and db.isdigit()):
                raise ValueError(f"the database {db!r} is not a non-negative number")
        try:  # the client's own reading of the URL's options (?socket_timeout=abc)
            redis_parse_url(v)
        except ValueError as exc:  # its messages name the option, never the password
            raise ValueError(str(exc)) from None
        return v

    @field_validator("redis_cluster")
    @classmethod
    def _redis_cluster(cls, v: bool, info: ValidationInfo) -> bool:
        url = str(info.data.get("redis_url") or "")
        if v and url.startswith("unix://"):
            raise ValueError("a Redis Cluster is reached over TCP, not a unix:// socket")
        parts = urlparse(url)
        dbs = [parts.path.strip("/"), *parse_qs(parts.query).get("db", [])]
        if v and any(db not in ("", "0") for db in dbs):
            raise ValueError("a Redis Cluster has only database 0 (use .../0 in the URL)")
        return v

    @model_validator(mode="after")
    def _redis_url_options(self) -> Settings:
        # after both fields: a cluster client takes other options than a single server's
        why = _redis_client_refuses(self.redis_url, self.redis_cluster)
        if why is not None:
            raise ValueError(f"{env_name('redis_url')}: {why}")
        return self

    @field_validator("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
    @classmethod
    def _redis_tls_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            if info.field_name == "redis_tls_key_file" and info.data.get("redis_tls_cert_file"):
                raise ValueError("a client certificate needs its key file")
            return v
        if not str(info.data.get("redis_url") or "").startswith("rediss://"):
            raise ValueError("TLS files need a rediss:// SEGSTREAM_REDIS_URL")
        if not v.is_file():
            raise ValueError("no such file")
        cert = info.data.get("redis_tls_cert_file")
        if info.field_name == "redis_tls_key_file" and cert is None:
            raise ValueError("a client key needs SEGSTREAM_REDIS_TLS_CERT_FILE too")
        if info.field_name == "redis_tls_ca_file":
            _check_ca_file(v)
        if info.field_name == "redis_tls_key_file":
            try:
                ssl.create_default_context().load_cert_chain(str(cert), str(v))
            except (ssl.SSLError, OSError) as exc:
                raise ValueError("SEGSTREAM_REDIS_TLS_CERT_FILE and this key do not load "
                                 f"as a PEM certificate and its key ({exc})") from None
        return v

    # -- derived names -------------------------------------------------------------
    def topic(self, name: str) -> str:
        """The deployment's name of a contract topic."""
        return f"{self.topic_prefix}{name}"

    @property
    def clickstream_topic(self) -> str:
        return self.topic("clickstream")

    @property
    def transactions_topic(self) -> str:
        return self.topic("transactions")

    @property
    def migrations_topic(self) -> str:
        return self.topic("segment-migrations")

    @property
    def dlq_topic(self) -> str:
        return self.topic("segmentation-dlq")

    @property
    def examples_topic(self) -> str:
        return self.topic("segmentation-examples")

    @property
    def input_topics(self) -> tuple[str, str]:
        return (self.clickstream_topic, self.transactions_topic)

    @property
    def lateness_ms(self) -> int:
        return int(self.allowed_lateness_days * 86_400_000)

    @property
    def future_skew_ms(self) -> int:
        return int(self.max_future_skew_s * 1000)

    @property
    def learner_group(self) -> str:
        """The consumer group of the learner process (``segstream learner``)."""
        return f"{self.app_id}-learner"

    @property
    def triggers_group(self) -> str:
        """The reference trigger consumer's default consumer group."""
        return f"{self.app_id}-triggers"

    @property
    def api_url(self) -> str:
        """The HTTP API's base URL as a client on this host reaches it: a wildcard bind
        address (``0.0.0.0``, ``::``, empty) is reached on the loopback, and an IPv6
        address is bracketed.

        >>> [Settings(web_host=h, web_port=6066).api_url for h in ("0.0.0.0", "::", "fe80::1")]
        ['http://127.0.0.1:6066', 'http://[::1]:6066', 'http://[fe80::1]:6066']
        """
        host = self.web_host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if not host or (ip is not None and ip.is_unspecified):
            host = "::1" if ip is not None and ip.version == 6 else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.web_port}"

    @property
    def kafka_url(self) -> str:
        return ";".join(f"kafka://{h.strip()}" for h in self.kafka_bootstrap.split(","))


def _check_ca_file(path: Path) -> None:
    """Raise ValueError unless ``path`` holds PEM CA certificates."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ValueError(f"not a PEM file of CA certificates ({exc})") from None


def is_host(host: str, brackets: bool = True) -> bool:
    """Whether ``host`` is a host name or an IP address (IPv6 also in ``[...]`` if
    ``brackets``): no scheme, port, path or whitespace.

    >>> [is_host(h) for h in ("kafka-0.svc", "10.0.0.1", "::1", "[::1]", "http://h", "a b")]
    [True, True, True, True, False, False]
    """
    if brackets and host.startswith("[") and host.endswith("]"):
        return ":" in host and _is_ip(host[1:-1])
    return _is_ip(host) or (len(host) <= 253 and _HOST_NAME_RE.fullmatch(host) is not None)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def redacted_url(url: str) -> str:
    """The URL without its password (in the user info or a ``password=`` parameter).

    A password may hold an unescaped ``/``, ``@`` or ``?`` (the server would not read it,
    but the error message shows the URL), so the user info runs to the last ``@``.

    >>> redacted_url("rediss://engine:hunter2@cache:6380/0")
    'rediss://engine:***@cache:6380/0'
    >>> redacted_url("redis://:a/b@c@h:1/0"), redacted_url("unix:///r.sock?password=pw&db=1")
    ('redis://:***@h:1/0', 'unix:///r.sock?password=***&db=1')
    """
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    head, q, query = rest.partition("?")
    query = _redacted_query(query)
    if "@" in query:  # not in a password parameter: the password itself holds a "?"
        userinfo, _, after = f"{head}?{query}".rpartition("@")
        tail, q, query = after.partition("?")
        head, query = f"{userinfo}@{tail}", _redacted_query(query)
    userinfo, at, hostpath = head.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if colon:
        head = f"{user}:***{at}{hostpath}"
    return f"{scheme}{sep}{head}{q}{query}"


def _redacted_query(query: str) -> str:
    """A URL's query string with the value of every ``password`` parameter hidden."""
    parts = []
    for part in query.split("&"):
        name, eq, _value = part.partition("=")
        parts.append(f"{name}=***" if eq and unquote(name).strip().lower() == "password"
                     else part)
    return "&".join(parts)


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return f"{ENV_PREFIX}{field.upper()}"


_warned_unknown: set[str] = set()


def warn_unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Log a warning for every ``SEGSTREAM_*`` variable that nothing reads (a typo is
    otherwise silently ignored), naming the setting it most resembles; once per variable
    and process. The names warned about now."""
    environ = os.environ if environ is None else environ
    known = {env_name(f) for f in Settings.model_fields} | OTHER_ENV_VARS
    unknown = sorted(
        name for name in environ
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
        and not name.upper().startswith(_TEST_ENV_PREFIX) and name not in _warned_unknown)
    for name in unknown:
        _warned_unknown.add(name)
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        log.warning("ignoring unknown setting %s%s", name, hint)
    return unknown


def load_settings(**overrides: object) -> Settings:
    """Build the settings once; an invalid value raises :class:`SettingsError` naming it.

    An unknown ``SEGSTREAM_*`` variable is logged as a warning (:func:`warn_unknown_env`).
    """
    warn_unknown_env()
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a check of several settings: its message names them
                lines.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            field = str(err["loc"][0])
            info = Settings.model_fields.get(field)
            secret = info is not None and "SecretStr" in str(info.annotation)
            shown = err.get("input")
            if field == "redis_url" and isinstance(shown, str):
                shown = redacted_url(shown)
            got = "value hidden" if secret else f"got {shown!r}"
            lines.append(f"{env_name(field)}: {err['msg']} ({got})")
        raise SettingsError("invalid setting: " + "; ".join(lines)) from None
