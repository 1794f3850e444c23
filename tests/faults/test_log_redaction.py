"""No customer id and no event payload in a worker's log at INFO; the failing customer is
named by its keyed reference instead.

The worker runs with a ``sitecustomize`` that makes scoring raise for one customer, with an
exception message that quotes the customer id and a payload value (as a real bug's message
would). Malformed input carrying ids and payload strings goes to the dead-letter topic.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import ROOT, jsonl

pytestmark = pytest.mark.integration

T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z
HOUR = 3_600_000

SITECUSTOMIZE = '''
import os
import sys

sys.path.insert(0, os.environ["SEGSTREAM_TEST_ROOT"])
import scorers.scoring as _scoring

_poison = os.environ["SEGSTREAM_TEST_POISON"]
_evaluate = _scoring.evaluate


def evaluate(inputs, ctx):
    for c in inputs:
        if c.customer_id == _poison:
            raise RuntimeError("scoring exploded for customer " + c.customer_id +
                               " on event " + repr([e.event_id for e in c.events]))
    return _evaluate(inputs, ctx)


_scoring.evaluate = evaluate
'''


def _ref(key: str, customer_id: str) -> str:
    return "cid:" + hmac.new(key.encode(), customer_id.encode(), hashlib.sha256).hexdigest()[:16]


def test_worker_log_names_customers_only_by_keyed_reference(make_deployment: Any,
                                                            tmp_path: Path) -> None:
    tag = secrets.token_hex(4)
    key = secrets.token_hex(16)
    token = secrets.token_hex(12)
    poison = f"poison-{tag}"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    d = make_deployment(
        PYTHONPATH=str(site), SEGSTREAM_TEST_ROOT=str(ROOT), SEGSTREAM_TEST_POISON=poison,
        SEGSTREAM_LOG_HASH_KEY=key, SEGSTREAM_LOG_LEVEL="INFO", SEGSTREAM_API_TOKEN=token)

    customers = [f"cust-{tag}-{i}" for i in range(12)]
    marker = f"payload-{tag}"
    clicks = [{"event_id": f"evc-{tag}-{i}", "customer_id": customers[i % 12],
               "ts": T0 + i * HOUR, "event_type": "page_view", "session_id": f"sess-{tag}-{i}",
               "properties": {"note": f"{marker}-{i}"}} for i in range(60)]
    txns = [{"event_id": f"evt-{tag}-{i}", "customer_id": customers[i % 12],
             "ts": T0 + i * HOUR + 60_000, "amount": 10 + i, "currency": "EUR"}
            for i in range(36)]
    txns += [{"event_id": f"evp-{tag}-{i}", "customer_id": poison, "ts": T0 + i * 7 * HOUR,
              "amount": 25.5, "currency": "EUR"} for i in range(3)]
    bad_ids = [f"bad-{tag}-{i}" for i in range(6)]
    malformed: list[tuple[bytes | None, bytes]] = [
        (bad_ids[0].encode(), f'{{"customer_id": "{bad_ids[0]}", "amount": {marker}-x'.encode()),
        (bad_ids[1].encode(), orjson.dumps({"event_id": f"evb-{tag}-1",
                                            "customer_id": bad_ids[1], "ts": T0,
                                            "amount": f"{marker}-not-a-number"})),
        (bad_ids[2].encode(), orjson.dumps({"customer_id": bad_ids[2], "note": marker})),
        (bad_ids[3].encode(), orjson.dumps({"event_id": f"evb-{tag}-3",
                                            "customer_id": bad_ids[3], "ts": T0,
                                            "amount": -5, "currency": marker[:8]})),
        (bad_ids[4].encode(), b"\xff\xfe" + bad_ids[4].encode() + marker.encode()),
        (bad_ids[5].encode(), orjson.dumps({"event_id": f"evb-{tag}-5",
                                            "customer_id": bad_ids[5],
                                            "ts": "the day after tomorrow " + marker,
                                            "amount": 1})),
    ]

    worker = d.start_worker(tmp_path)
    path = tmp_path / "clicks.jsonl"
    path.write_bytes(jsonl(clicks))
    d.cli("replay", "jsonl", str(path), "--topic", "clickstream")
    d.produce("transactions", [(t["customer_id"].encode(), orjson.dumps(t)) for t in txns])
    d.produce("transactions", malformed)
    d.cli("wait", "--timeout", "300")

    # The API is asked about a known and an unknown customer (the path holds the id).
    base = d.web_url(worker)
    for cid in (customers[0], f"ghost-{tag}"):
        req = urllib.request.Request(f"{base}/customers/{cid}",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            urllib.request.urlopen(req, timeout=30).close()
        except urllib.error.HTTPError as exc:
            assert exc.code == 404

    # The poison customer's events and every malformed record reached the dead-letter topic.
    dlq = [orjson.loads(r.value) for r in d.consume_all("segmentation-dlq", timeout_s=60)]
    by_reason: dict[str, int] = {}
    for rec in dlq:
        by_reason[rec["reason"]] = by_reason.get(rec["reason"], 0) + 1
    assert by_reason.get("processing_error") == 3, by_reason
    assert sum(by_reason.values()) == 3 + len(malformed), by_reason
    assert all(poison in rec["error"] for rec in dlq if rec["reason"] == "processing_error")
    _, states = d.states()
    assert set(states) == set(customers)

    d.stop_all()
    log = d.logs[0].read_text(errors="replace")
    assert "Worker]: Ready" in log
    secrets_in_input = [poison, *customers, *bad_ids, marker, f"ghost-{tag}", f"sess-{tag}",
                        f"evc-{tag}", f"evt-{tag}", f"evp-{tag}", f"evb-{tag}"]
    leaked = [s for s in secrets_in_input if s in log]
    assert leaked == [], f"found in the worker log: {leaked}"
    assert key not in log and token not in log
    # The failing customer is named by the keyed hash, computed here independently.
    assert _ref(key, poison) in log, log[-3000:]
    assert "scoring failed for customer" in log


def _record(level: int, msg: str, args: tuple[Any, ...], exc: BaseException | None
            ) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("t", level, __file__, 1, msg, args, exc_info)


def _raise_chain(cid: str) -> BaseException:
    try:
        try:
            {}[cid]
        except KeyError as inner:
            raise RuntimeError(f"no state for {cid}") from inner
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


def test_redaction_of_records_keeps_types_frames_and_infrastructure_messages() -> None:
    from stream import redact

    cid = f"cust-{secrets.token_hex(4)}"
    exc = _raise_chain(cid)
    for level in (logging.INFO, logging.ERROR):
        rec = redact.redact_record(_record(level, "failed: %r", (exc,), exc))
        text = logging.Formatter("%(message)s").format(rec)
        assert cid not in text
        assert "RuntimeError" in text and "KeyError" in text and "_raise_chain" in text
        assert "direct cause" in text
    # DEBUG records keep everything.
    rec = redact.redact_record(_record(logging.DEBUG, "failed: %r", (exc,), exc))
    assert cid in logging.Formatter("%(message)s").format(rec)
    # Network errors keep their message: it is what an operator needs and holds no ids.
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 6379)")
    rec = redact.redact_record(_record(logging.WARNING, "redis: %s", (refused,), None))
    assert rec.getMessage() == f"redis: {refused}"


def test_cid_ref_is_an_hmac_of_the_configured_key() -> None:
    from stream import redact

    key = secrets.token_hex(8)
    redact.configure(key)
    try:
        assert redact.cid_ref("c42") == _ref(key, "c42")
        assert redact.cid_ref(b"c42") == _ref(key, "c42")
        redact.configure(secrets.token_hex(8))
        assert redact.cid_ref("c42") != _ref(key, "c42")
    finally:
        redact.configure(None)
