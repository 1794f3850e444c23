"""Producers that feed the input topics: CDNOW, JSON lines and the synthetic generator."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from stream.kafka import producer
from stream.settings import Settings


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes


def cdnow_path() -> Path:
    """CDNOW_master.txt as shipped by the ``lifetimes`` package."""
    try:
        import lifetimes
    except ImportError:
        raise FileNotFoundError("the lifetimes package is not installed; pass --path") from None
    return Path(lifetimes.__file__).parent / "datasets" / "CDNOW_master.txt"


@dataclass(frozen=True, slots=True)
class CdnowRow:
    line: int
    customer_id: str
    day: str  # YYYYMMDD
    quantity: int
    amount: float


def read_cdnow(path: Path) -> list[CdnowRow]:
    """Rows of CDNOW_master.txt (a header line and blank lines skipped), in file order.

    A row that is not ``<customer id> <YYYYMMDD> <quantity> <amount>`` raises ValueError
    naming the file and line: a replay of part of a file would be silently wrong.
    """
    rows = []
    header_possible = True  # until the first line that is not blank
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        for n, line in enumerate(fh):
            parts = line.split()
            if not parts:
                continue  # blank
            if header_possible:
                header_possible = False
                if not parts[0].isdigit():
                    continue  # the header
            try:
                if len(parts) != 4 or not parts[0].isdigit():
                    raise ValueError
                day = parts[1]
                datetime.strptime(day, "%Y%m%d")
                quantity, amount = int(parts[2]), float(parts[3])
                # The amounts the transactions schema takes (NaN fails too): a row it
                # would dead-letter is refused here, before anything is replayed.
                if len(day) != 8 or quantity < 0 or not 0 <= amount <= 1e12:
                    raise ValueError
            except ValueError:
                shown = line.strip()[:80]
                raise ValueError(
                    f"{path}:{n + 1}: expected '<customer id> <YYYYMMDD> <quantity> "
                    f"<amount>', got {shown!r}") from None
            rows.append(CdnowRow(n, parts[0], day, quantity, amount))
    if not rows:
        # A file of only a header (or of one line of anything) replays nothing: not CDNOW.
        raise ValueError(f"{path}: no '<customer id> <YYYYMMDD> <quantity> <amount>' rows")
    return rows


def cdnow_events(path: Path, until: str | None = None) -> list[dict[str, object]]:
    """CDNOW purchases as transaction events in time order, event ids stable across runs."""
    rows = read_cdnow(path)
    rows.sort(key=lambda r: (r.day, r.line))
    out = []
    for r in rows:
        if until is not None and r.day >= until.replace("-", ""):
            continue
        ts = datetime.strptime(r.day, "%Y%m%d").replace(tzinfo=UTC)
        out.append({
            "event_id": f"cdnow-{r.line}",
            "customer_id": r.customer_id,
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "amount": r.amount,
            "kind": "purchase",
            "currency": "USD",
            "items": r.quantity,
        })
    return out


def to_records(topic: str, events: Iterable[dict[str, object]]) -> Iterator[OutRecord]:
    for e in events:
        cid = e.get("customer_id")
        key = str(cid).encode() if cid is not None else None
        yield OutRecord(topic, key, orjson.dumps(e))


def jsonl_records(path: Path, topic: str, max_bytes: int | None = None
                  ) -> Iterator[OutRecord]:
    """Lines of a JSON-lines file, keyed by their customer_id; unparsable lines are sent as is.

    Blank lines and a UTF-8 byte order mark are skipped. A line longer than ``max_bytes``
    (the engine's ``SEGSTREAM_MAX_EVENT_BYTES``) is sent cut to one byte over it: the
    engine dead-letters it as ``too_large`` either way, and the cut keeps it under the
    broker's message size limit, which would otherwise stop the replay there.
    """
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh):
            line = raw.rstrip(b"\r\n")
            if i == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            if max_bytes is not None and len(line) > max_bytes:
                yield OutRecord(topic, None, line[:max_bytes + 1])
                continue
            key = None
            try:
                doc = orjson.loads(line)
                if isinstance(doc, dict) and doc.get("customer_id") is not None:
                    key = str(doc["customer_id"]).encode()
            except orjson.JSONDecodeError:
                pass
            yield OutRecord(topic, key, line)


def produce(settings: Settings, records: Iterable[OutRecord], total: int | None = None,
            rate: float | None = None, progress: bool = True, label: str = "replay") -> int:
    """Send records (optionally throttled to ``rate`` per second) and wait for every ack."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    p = producer(settings)
    n = 0
    start = time.monotonic()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[eps]} ev/s"), TimeRemainingColumn(),
                   disable=not progress)
    try:
        with bar:
            task = bar.add_task(label, total=total, eps="-")
            for rec in records:
                p.send(rec.topic, key=rec.key, value=rec.value)
                n += 1
                if rate:
                    ahead = n / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
                if n % 2000 == 0:
                    el = time.monotonic() - start
                    bar.update(task, completed=n, eps=f"{n / el:,.0f}" if el else "-")
            p.flush()
            el = time.monotonic() - start
            bar.update(task, completed=n, eps=f"{n / el:,.0f}" if el else "-")
    finally:
        p.close()
    return n
