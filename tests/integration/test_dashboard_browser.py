"""The dashboard in a real headless browser (Debian ``chromium``), against a live HTTP server.

The server is :func:`stream.web.add_routes` on a bare aiohttp app with a token set; the page is
opened as ``/?token=...`` so its requests must carry the bearer token. The backend is an
in-memory one with realistic data (no Kafka, no Redis). The test asserts every chart rendered
data points and saves a screenshot (``docs/dashboard.png`` when missing or when
``SEGSTREAM_UPDATE_SCREENSHOT=1``).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from dashboard_page import CHROMIUM, Charts, chromium

from stream.metrics import EngineMetrics
from stream.web import add_routes

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "dashboard.png"
TOKEN = "browser-test-token"
CHARTS = ("segment-sizes", "segment-history", "migration-flows", "throughput",
          "throughput-out", "lag",
          "model-quality", "model-auc", "action-lift")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: chromium)"),
]

T0 = 1_709_294_400_000  # 2024-03-01T12:00:00Z
STEP_MS = 2_500
POINTS = 72
AS_OF = "2024-03-01T11:59:30Z"
SCHEMES = {
    "rfm": {"Champions": 1180, "Loyal": 2240, "Potential Loyalists": 1630, "New Customers": 910,
            "At Risk": 1320, "Can't Lose Them": 240, "Hibernating": 2480},
    "engagement": {"Power User": 760, "Engaged": 3120, "Casual": 4210,
                   "Struggling Newbie": 530, "Dormant": 1590},
}


class RealisticBackend:
    """An in-memory backend shaped like the engine's, with a few minutes of history."""

    def __init__(self) -> None:
        rng = random.Random(7)
        self.history: dict[str, list[dict[str, Any]]] = {}
        for scheme, sizes in SCHEMES.items():
            rows = []
            for i in range(POINTS):
                drift = {s: round(n * (1 + 0.04 * math.sin(i / 9 + k)) + rng.randint(-9, 9))
                         for k, (s, n) in enumerate(sizes.items())}
                rows.append({"t": T0 + i * STEP_MS, "sizes": drift})
            self.history[scheme] = rows
        self.throughput = [
            {"t": T0 + i * STEP_MS,
             "events_in_per_s": round(4200 + 600 * math.sin(i / 8) + rng.uniform(-90, 90), 1),
             "migrations_per_s": round(38 + 9 * math.sin(i / 6 + 1) + rng.uniform(-3, 3), 2),
             "dlq_per_s": round(max(0.0, 1.5 + rng.uniform(-1, 1)), 2),
             "lag": int(900 + 700 * math.sin(i / 11) ** 2 + rng.randint(0, 80))}
            for i in range(POINTS)
        ]
        segs = list(SCHEMES["rfm"])
        self.flows = {
            "rfm": [{"from": None, "to": "New Customers", "count": 910}]
            + [{"from": a, "to": b, "count": rng.randint(3, 400)}
               for a in segs for b in segs if a != b and rng.random() < 0.45],
            "engagement": [{"from": "Struggling Newbie", "to": "Engaged", "count": 120},
                           {"from": "Engaged", "to": "Power User", "count": 64},
                           {"from": "Casual", "to": "Dormant", "count": 210}],
        }
        self.actions_rows = []
        for action, segment, t_rate, h_rate in (
            ("winback-email", "At Risk", 0.094, 0.061), ("winback-email", "Hibernating", 0.031,
                                                         0.029),
            ("vip-call", "Can't Lose Them", 0.22, 0.12), ("upsell-offer", "Loyal", 0.081, 0.085),
            ("onboarding-tips", "Struggling Newbie", 0.17, 0.11),
        ):
            exposed_t, exposed_h = 1800, 200
            conv_t, conv_h = round(exposed_t * t_rate), round(exposed_h * h_rate)
            t_rate_real, h_rate_real = conv_t / exposed_t, conv_h / exposed_h
            # The flat rows `segstream actions --json` and GET /actions return.
            self.actions_rows.append({
                "action_id": action, "segment": segment,
                "treated_exposed": exposed_t, "treated_converted": conv_t,
                "holdout_exposed": exposed_h, "holdout_converted": conv_h,
                "treated_rate": t_rate_real, "holdout_rate": h_rate_real,
                "uplift": t_rate_real - h_rate_real,
                "relative_lift": t_rate_real / h_rate_real - 1,
                "p_value": round(rng.uniform(0.001, 0.4), 3),
                "treated_ci": None, "holdout_ci": None,
            })
        self.models = [
            {"model": name, "version": version, "auc": auc, "log_loss": loss,
             "examples": examples, "drift_alarms": alarms,
             "history": [{"t": T0 + i * STEP_MS,
                          "auc": round(auc - 0.02 * math.cos(i / 10 + version), 4),
                          "log_loss": round(loss + 0.01 * math.sin(i / 10), 4)}
                         for i in range(POINTS)]}
            for name, version, auc, loss, examples, alarms in (
                ("churn", 4, 0.834, 0.412, 48210, 1),
                ("purchase_propensity_7d", 2, 0.771, 0.298, 31877, 0),
            )
        ]

    async def customer(self, customer_id: str) -> dict[str, Any] | None:
        return None

    async def segments(self) -> dict[str, Any]:
        return {"as_of": AS_OF, "schemes": SCHEMES}

    async def migrations(self, since: str | None, limit: int) -> dict[str, Any]:
        return {"migrations": [], "next": None}

    async def actions(self) -> dict[str, Any]:
        return {"as_of": AS_OF, "actions": self.actions_rows}

    async def health(self) -> dict[str, Any]:
        return {}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        return True, {"kafka": True, "redis": True, "partitions": 6}

    async def stats(self) -> dict[str, Any]:
        last = self.throughput[-1]
        return {
            "as_of": AS_OF, "generated_at": "2024-03-01T12:03:00Z",
            "throughput": self.throughput,
            "lag": {"total": last["lag"], "partitions": [
                {"topic": topic, "partition": p, "lag": last["lag"] // 12 + p}
                for topic in ("clickstream", "transactions") for p in range(6)]},
            "segments": SCHEMES, "segment_history": self.history, "flows": self.flows,
            "models": self.models, "actions": self.actions_rows,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




def test_dashboard_renders_every_chart(tmp_path: Path) -> None:
    async def main() -> tuple[str, str]:
        app = web.Application()
        metrics = EngineMetrics()
        add_routes(app, RealisticBackend(), metrics, TOKEN)
        runner = web.AppRunner(app)
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            url = f"http://127.0.0.1:{port}/?token={TOKEN}"
            dom, log = await chromium(url, tmp_path / "profile-dom", "--dump-dom")
            await chromium(url, tmp_path / "profile-shot",
                            f"--screenshot={tmp_path / 'dashboard.png'}")
            return dom, log
        finally:
            await runner.cleanup()

    dom, log = asyncio.run(main())
    parsed = Charts()
    parsed.feed(dom)
    assert set(CHARTS) <= set(parsed.points), parsed.points
    empty = [c for c in CHARTS if parsed.points[c] <= 0]
    assert not empty, f"charts without data: {empty} ({parsed.points})"
    assert parsed.points["segment-sizes"] == sum(len(s) for s in SCHEMES.values())
    assert parsed.points["action-lift"] == 5
    for row in RealisticBackend().actions_rows:  # both arms read from the flat rows
        assert f"{row['treated_converted']}/{row['treated_exposed']} (" in dom, row
        assert f"{row['holdout_converted']}/{row['holdout_exposed']} (" in dom, row
    assert parsed.points["model-quality"] == 2
    assert parsed.points["throughput"] == POINTS
    assert parsed.points["throughput-out"] == 2 * POINTS
    assert parsed.ready == "ready"
    assert "display: none" in (parsed.banner_style or ""), "the page shows an error banner"
    assert "Uncaught" not in log, log[-2000:]

    shot = tmp_path / "dashboard.png"
    assert shot.is_file() and shot.stat().st_size > 20_000
    if not SCREENSHOT.exists() or os.environ.get("SEGSTREAM_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


class StoreDownBackend(RealisticBackend):
    """Redis does not answer: the routes reading it answer 503, the worker's own figures
    (its last segment sizes among them) are still served, with no event time."""

    async def segments(self) -> dict[str, Any]:
        from redis.exceptions import ConnectionError as RedisConnectionError

        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379")

    async def actions(self) -> dict[str, Any]:
        return await self.segments()

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        return False, {"kafka": True, "redis": False, "partitions": 6}

    async def stats(self) -> dict[str, Any]:
        return {**await super().stats(), "as_of": None}


def test_with_the_store_down_the_page_says_its_sizes_are_not_current(tmp_path: Path) -> None:
    """With Redis down the page showed the last segment sizes as "now", with no warning."""
    async def main() -> tuple[str, str]:
        app = web.Application()
        add_routes(app, StoreDownBackend(), EngineMetrics(), TOKEN)
        runner = web.AppRunner(app)
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            return await chromium(f"http://127.0.0.1:{port}/?token={TOKEN}",
                                  tmp_path / "profile", "--dump-dom")
        finally:
            await runner.cleanup()

    dom, log = asyncio.run(main())
    parsed = Charts()
    parsed.feed(dom)
    assert "display: block" in (parsed.banner_style or ""), parsed.banner_style
    assert "The state store (Redis) does not answer" in dom
    assert "last reading" in dom and "not now" in dom
    assert parsed.ready == "not ready"
    assert "Uncaught" not in log, log[-2000:]
