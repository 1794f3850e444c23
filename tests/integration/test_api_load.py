"""Many API clients at once against a running worker: requests queue for the store
instead of failing, and the worker keeps its readiness and its input."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from urllib.parse import quote

import aiohttp
import orjson
import pytest

pytestmark = pytest.mark.integration

T0 = 1_735_689_600_000  # 2025-01-01T00:00Z
CLIENTS = 400


def test_hundreds_of_concurrent_requests_are_answered_not_refused(
        deployment, tmp_path: Path) -> None:
    rng = random.Random(5)
    events = [{"event_id": f"a{i}", "customer_id": f"cust-{rng.randrange(60)}",
               "ts": T0 + i * 60_000, "amount": round(rng.uniform(1, 50), 2)}
              for i in range(600)]
    worker = deployment.start_worker(tmp_path)
    deployment.produce("transactions", [(e["customer_id"].encode(), orjson.dumps(e))
                                        for e in events])
    deployment.cli("wait", "--timeout", "180")
    base = deployment.web_url(worker)
    totals: dict[str, int] = {}
    for e in events:
        totals[e["customer_id"]] = totals.get(e["customer_id"], 0) + 1
    ids = sorted(totals)
    paths = ["/segments", "/actions", "/migrations?limit=50", "/readyz"]

    async def hammer() -> list[tuple[str, int, bytes]]:
        conn = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(connector=conn) as http:
            async def one(i: int) -> tuple[str, int, bytes]:
                path = (f"/customers/{quote(ids[i % len(ids)], safe='')}" if i % 2 == 0
                        else paths[i % len(paths)])
                async with http.get(base + path,
                                    timeout=aiohttp.ClientTimeout(total=120)) as resp:
                    return path, resp.status, await resp.read()
            out: list[tuple[str, int, bytes]] = []
            for _ in range(3):
                out += await asyncio.gather(*(one(i) for i in range(CLIENTS)))
            return out

    answers = asyncio.run(hammer())
    refused = [(p, s, b[:200]) for p, s, b in answers if s != 200]
    assert not refused, f"{len(refused)} of {len(answers)} refused, e.g. {refused[:3]}"
    for path, _, body in answers:
        if path.startswith("/customers/"):
            doc = orjson.loads(body)
            assert doc["features"]["purchases_total"] == totals[doc["customer_id"]]
    assert worker.poll() is None
    log = deployment.logs[0].read_text()
    assert "Too many connections" not in log and "Traceback" not in log
