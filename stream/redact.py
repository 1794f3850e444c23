"""Customer ids and event payloads stay out of the logs at INFO and above.

Log lines name a customer by :func:`cid_ref`, a keyed hash (HMAC-SHA256): the same customer
gives the same reference, but without the key nobody can test guesses (customer ids are often
sequential numbers or e-mail addresses) against the logs. The key is ``SEGSTREAM_LOG_HASH_KEY``;
unset, each process draws a random one, so references match only within one process's log.
Give every worker the same secret key to follow a customer across workers and restarts, and
print a customer's reference with ``python -m stream.redact CUSTOMER_ID``.

Exception messages are the other way ids and payloads leak: a ``KeyError('c42')``, a pydantic
error quoting the input, or any error raised while scoring a customer. :func:`install` wraps
the logging record factory so that, for every record at INFO or above from any logger, the
messages of exceptions in tracebacks and in ``%r``/``%s`` arguments are replaced by their type
and length, except for errors of the network and storage layers, whose messages carry no
customer data and are what an operator needs; the customer id in the path of an aiohttp
access-log line becomes ``{customer_id}``. DEBUG records are left as they are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sys
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

#: Exceptions whose messages are kept: I/O, Kafka and Redis clients, the engine's own errors
#: (``features.store`` wraps Redis errors).
SAFE_MODULES = ("kafka.", "aiokafka.", "redis.", "aiohttp.", "ssl.", "asyncio.",
                "stream.errors.", "features.store.")
SAFE_TYPES: tuple[type[BaseException], ...] = (OSError, TimeoutError)
#: ... except these, whose messages quote what they were given: aiohttp's HTTP parser errors
#: quote the request line (a customer id in the path of a request it refused).
UNSAFE_MODULES = ("aiohttp.http_exceptions.",)
_CUSTOMER_PATH = re.compile(r"(/customers/)[^\s\"?]+")
REF_PREFIX = "cid:"
REF_HEX = 16

_key = secrets.token_bytes(32)
_installed: Callable[..., logging.LogRecord] | None = None


def configure(key: str | bytes | None) -> None:
    """Use ``key`` for :func:`cid_ref` (``None``: a random key for this process)."""
    global _key
    if key is None or key == "" or key == b"":
        _key = secrets.token_bytes(32)
    else:
        _key = key.encode() if isinstance(key, str) else key


def cid_ref(customer_id: str | bytes | None) -> str:
    """The reference that stands for a customer id in logs.

    >>> configure("example-key")
    >>> cid_ref("c42")
    'cid:09c706bb10f7c94f'
    >>> cid_ref(b"c42") == cid_ref("c42")
    True
    """
    if customer_id is None:
        return f"{REF_PREFIX}none"
    raw = customer_id.encode() if isinstance(customer_id, str) else customer_id
    return REF_PREFIX + hmac.new(_key, raw, hashlib.sha256).hexdigest()[:REF_HEX]


def _safe(exc: BaseException) -> bool:
    module = type(exc).__module__ + "."
    if module.startswith(UNSAFE_MODULES):
        return False
    return isinstance(exc, SAFE_TYPES) or module.startswith(SAFE_MODULES)


def describe(exc: BaseException) -> str:
    """An exception's type, and its message only if it cannot carry customer data."""
    if _safe(exc):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__} (message redacted, {len(str(exc))} chars)"


class _Redacted:
    """Stands in for an exception argument of a log call."""

    def __init__(self, exc: BaseException) -> None:
        self.text = describe(exc)

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


def format_exception(exc_type: type[BaseException] | None, exc: BaseException | None,
                     tb: TracebackType | None) -> str:
    """A traceback with the frames kept and unsafe messages (also of causes) redacted."""
    if exc is None:
        return "".join(traceback.format_exception(exc_type, exc, tb)).rstrip("\n")
    te = traceback.TracebackException(type(exc), exc, tb, compact=True)
    seen: set[int] = set()
    stack: list[tuple[traceback.TracebackException, BaseException]] = [(te, exc)]
    while stack:
        node, err = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if not _safe(err):
            node._str = f"(message redacted, {len(str(err))} chars)"  # type: ignore[attr-defined]
            # Notes (PEP 678) and SyntaxError details are message text too.
            node.__notes__ = None  # type: ignore[attr-defined]
            if getattr(node, "msg", None) is not None:
                node.msg = "(message redacted)"
                node.text = None
        if node.__cause__ is not None and err.__cause__ is not None:
            stack.append((node.__cause__, err.__cause__))
        if node.__context__ is not None and err.__context__ is not None:
            stack.append((node.__context__, err.__context__))
        if getattr(node, "exceptions", None) and isinstance(err, BaseExceptionGroup):
            stack.extend(zip(node.exceptions, err.exceptions, strict=False))
    return "".join(te.format()).rstrip("\n")


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Redact exception messages of a record at INFO or above, in place."""
    if record.levelno < logging.INFO:
        return record
    if record.name == "aiohttp.access" and isinstance(record.msg, str):
        # Access logs (off in the worker, on in some embeddings) would print the id in the path.
        record.msg = _CUSTOMER_PATH.sub(r"\1{customer_id}", record.msg)
    if record.exc_info and record.exc_info[1] is not None:
        record.exc_text = format_exception(*record.exc_info)
        record.exc_info = None
    if _unsafe(record.msg):
        record.msg = describe(record.msg)
    args = record.args
    if isinstance(args, tuple) and any(_unsafe(a) for a in args):
        record.args = tuple(_Redacted(a) if _unsafe(a) else a for a in args)
    elif isinstance(args, dict) and any(_unsafe(a) for a in args.values()):
        record.args = {k: _Redacted(a) if _unsafe(a) else a for k, a in args.items()}
    return record


def _unsafe(value: object) -> bool:
    return isinstance(value, BaseException) and not _safe(value)


class RedactingFilter(logging.Filter):
    """The same redaction as a handler filter, for setups that configure handlers themselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def install(key: str | bytes | None = None) -> None:
    """Set the reference key and redact every record created from now on, in any logger."""
    global _installed
    configure(key)
    if _installed is not None:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    _installed = factory


def install_from_settings(settings: Any) -> None:
    """:func:`install` with ``SEGSTREAM_LOG_HASH_KEY`` (a ``SecretStr`` or ``None``)."""
    key = settings.log_hash_key
    install(key.get_secret_value() if key is not None else None)


def main(argv: list[str] | None = None) -> int:
    """``python -m stream.redact ID...``: the log references of customers (with the key set)."""
    from stream.settings import load_settings

    ids = sys.argv[1:] if argv is None else argv
    settings = load_settings()
    if settings.log_hash_key is None:
        sys.stderr.write("SEGSTREAM_LOG_HASH_KEY is not set: workers use a random key each, "
                         "so no reference can be computed here\n")
        return 2
    configure(settings.log_hash_key.get_secret_value())
    for cid in ids:
        sys.stdout.write(f"{cid}\t{cid_ref(cid)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
