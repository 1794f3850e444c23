"""The worker's scheduled CLV refit runs in a child process, never on the event loop.

A fit can take seconds of CPU (purchasers whose history leaves the BG/NBD dropout
parameters unidentified once ran the optimiser to its evaluation limit). Fitted on the
worker's loop, it held every batch, commit, heartbeat and ``/metrics`` scrape for as long
(it fired the ``SegstreamEventLoopHeld`` alert).
"""
from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import orjson
import psutil
import pytest

from features.store import RedisFeatureStore
from stream.clvfit import refit_clv, refit_clv_in_child
from stream.errors import SegstreamError
from stream.pipeline import BatchProcessor, RawRecord
from stream.redisconn import redis_client
from stream.runtime import registry_keys
from stream.settings import Settings, load_settings

pytestmark = pytest.mark.integration
T0 = 1_735_689_600_000
DAY = 86_400_000
CUSTOMERS = 150


class Sink:
    async def publish(self, recs) -> None:
        pass


def _settings(services: dict[str, str]) -> Settings:
    return load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                         redis_prefix=f"cf-{uuid.uuid4().hex[:8]}:", partitions=1,
                         models_enabled=False)


def _purchases() -> list[tuple[str, int, float]]:
    """Every customer buys on day 0 and day 50: nothing tells dropout from no dropout."""
    rng = np.random.default_rng(7)
    return [(f"c{i}", T0 + d * DAY, float(rng.uniform(5, 100)))
            for i in range(CUSTOMERS) for d in (0, 50)]


async def _load(s: Settings, r) -> None:
    store = RedisFeatureStore(r, s.redis_prefix)
    wall = (T0 + 301 * DAY) / 1000
    bp = BatchProcessor(s, store, Sink(), clock=lambda: wall)
    recs = []
    for n, (cid, ts, amount) in enumerate(sorted(_purchases(), key=lambda p: p[1])):
        value = orjson.dumps({"event_id": f"t{n}", "customer_id": cid, "ts": ts,
                              "amount": amount})
        recs.append(RawRecord(s.transactions_topic, 0, n, cid.encode(), value))
    for i in range(0, len(recs), 100):
        await bp.process(recs[i:i + 100])


async def _drop(s: Settings, r) -> None:
    async for k in r.scan_iter(f"{s.redis_prefix}*"):
        await r.delete(k)


def test_the_refit_leaves_the_event_loop_free_and_fits_what_the_worker_would(services) -> None:
    s = _settings(services)

    async def run() -> tuple[dict, float, dict]:
        r = redis_client(s)
        try:
            await _load(s, r)
            gaps = [0.0]
            stop = asyncio.Event()

            async def ticker() -> None:
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.create_task(ticker())
            t0 = time.monotonic()
            doc = await refit_clv_in_child(s)
            waited = time.monotonic() - t0
            stop.set()
            await tick
            # The same fit in this process finds the same parameters, so keeps the version.
            again = await refit_clv(s, r, RedisFeatureStore(r, s.redis_prefix))
            await _drop(s, r)
            return doc, max(gaps), again, waited
        finally:
            await r.aclose()

    doc, longest, again, waited = asyncio.run(run())
    assert doc["customers"] == CUSTOMERS and doc["version"] == 1
    assert again.get("unchanged") is True and again["version"] == 1, again
    # The child took a while (an interpreter, its imports, the fit): the loop never waited
    # on any of it, the fit included (in the loop, it alone would be a gap that long).
    assert waited > doc["seconds"], (waited, doc["seconds"])
    assert longest < min(waited / 4, doc["seconds"]), (longest, waited, doc["seconds"])


def test_a_cancelled_refit_kills_its_child_and_stores_nothing(services) -> None:
    s = _settings(services)

    async def run() -> tuple[bytes | None, list]:
        r = redis_client(s)
        try:
            await _load(s, r)
            me = psutil.Process()
            before = {c.pid for c in me.children()}  # the session's broker and Redis
            task = asyncio.create_task(refit_clv_in_child(s))
            deadline = time.monotonic() + 10
            child: list[psutil.Process] = []
            while not child and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
                child = [c for c in me.children() if c.pid not in before]
            assert child and not task.done()  # spawned, starting or fitting: not done
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            _, left = psutil.wait_procs(child, timeout=10)
            await asyncio.sleep(3)  # longer than a whole refit: a surviving child stores it
            stored = await r.get(registry_keys(s.redis_prefix)["clv"])
            await _drop(s, r)
            return stored, left
        finally:
            await r.aclose()

    stored, left = asyncio.run(run())
    assert left == []
    assert stored is None


def test_the_child_reports_nothing_to_fit_and_a_redis_it_cannot_reach(services) -> None:
    s = _settings(services)
    with pytest.raises(SegstreamError, match="no purchasing customers yet"):
        asyncio.run(refit_clv_in_child(s))
    closed = load_settings(kafka_bootstrap=services["kafka"], redis_url="redis://127.0.0.1:1/0",
                           redis_prefix=s.redis_prefix, partitions=1, models_enabled=False)
    with pytest.raises((SegstreamError, RuntimeError), match=r"(?i)connect"):
        asyncio.run(refit_clv_in_child(closed))


@pytest.mark.parametrize("days, spend", [((0,), 20.0), ((0, 3), -4.0)])
def test_a_refit_on_data_that_identifies_no_model_stores_no_invented_parameters(
        services, days: tuple[int, ...], spend: float) -> None:
    """Only first purchases, all today: BG/NBD is unidentified, and the refit says so
    instead of storing the optimiser's start (whose expected purchases were -inf).
    Repeat purchase days whose spend is negative (refunds): Gamma-Gamma is unidentified
    (it stored p = q = v = 1, which priced every repeat customer): refused as well."""
    s = _settings(services)

    async def run() -> tuple[str | None, bytes | None]:
        r = redis_client(s)
        try:
            store = RedisFeatureStore(r, s.redis_prefix)
            last = T0 + max(days) * DAY
            bp = BatchProcessor(s, store, Sink(), clock=lambda: (last + DAY // 2) / 1000)
            rows = [(i, d, "purchase", 20.0 if d == 0 else 10.0)
                    for d in days for i in range(40)]
            # a later day's purchase with a larger refund the same day: its spend is < 0
            rows += [(i, d, "refund", 10.0 - spend) for d in days if d for i in range(40)]
            recs = []
            for n, (i, d, kind, amount) in enumerate(sorted(rows, key=lambda r: r[1])):
                value = orjson.dumps({"event_id": f"t{n}", "customer_id": f"c{i}",
                                      "ts": T0 + d * DAY + n, "kind": kind,
                                      "amount": amount})
                recs.append(RawRecord(s.transactions_topic, 0, n, f"c{i}".encode(), value))
            await bp.process(recs)
            try:
                await refit_clv(s, r, store)
                refused = None
            except SegstreamError as exc:
                refused = str(exc)
            stored = await r.get(registry_keys(s.redis_prefix)["clv"])
            await _drop(s, r)
            return refused, stored
        finally:
            await r.aclose()

    refused, stored = asyncio.run(run())
    assert refused is not None and "nothing to fit" in refused
    assert ("new today" in refused) == (days == (0,))
    assert stored is None


def test_a_refit_whose_scan_sees_commits_past_its_engine_time_fits_each_customer_as_of_them(
        services) -> None:
    """A replay under way: customers committed while the fit scans hold purchases past the
    engine time read before the scan. They were derived before their own purchases (T < 0),
    the likelihood was NaN everywhere, and the optimiser's start (r = a = b = 1) was stored
    as the fit. Each is now observed up to its own newest event, and the fit is the one
    of exactly those observation ends."""
    import pandas as pd

    from scorers import clv

    s = _settings(services)
    rng = np.random.default_rng(3)
    buys: list[tuple[str, int, float]] = []
    for i in range(1_000):  # Poisson-like rates, dropping out after a purchase
        rate, drop = rng.gamma(0.6, 1 / 8.0), rng.beta(0.8, 3.0)
        day = int(rng.integers(0, 60))
        days = {day}
        while True:
            day += max(1, int(rng.exponential(1 / rate)))
            if day > 120 or rng.random() < drop:
                break
            days.add(day)
        buys += [(f"k{i}", T0 + d * DAY + 3_600_000, float(rng.uniform(5, 80)))
                 for d in sorted(days)]
    stale_day = 40

    class Stale(RedisFeatureStore):
        async def now(self) -> int:  # the engine time read before the scan
            return T0 + stale_day * DAY

    async def run() -> dict:
        r = redis_client(s)
        try:
            store = RedisFeatureStore(r, s.redis_prefix)
            bp = BatchProcessor(s, store, Sink(), clock=lambda: (T0 + 400 * DAY) / 1000)
            recs = [RawRecord(s.transactions_topic, 0, n, cid.encode(), orjson.dumps(
                {"event_id": f"v{n}", "customer_id": cid, "ts": ts, "amount": amount}))
                for n, (cid, ts, amount) in enumerate(sorted(buys, key=lambda b: b[1]))]
            for i in range(0, len(recs), 500):
                await bp.process(recs[i:i + 500])
            doc = await refit_clv(s, r, Stale(r, s.redis_prefix))
            await _drop(s, r)
            return doc
        finally:
            await r.aclose()

    doc = asyncio.run(run())
    df = pd.DataFrame(buys, columns=["cid", "ts", "amount"])
    df["day"] = (df.ts - T0) // DAY
    g = df.groupby("cid").day
    summary = pd.DataFrame({"x": g.nunique() - 1, "t_x": g.max() - g.min(),
                            "T": np.maximum(stale_day, g.max()) - g.min()})
    assert (summary["T"] >= summary["t_x"]).all() and doc["customers"] == len(summary)
    # The fitter itself is held to lifetimes' in tests/unit/scorers/test_clv.py; here its
    # inputs are: the pandas summary above, with each customer's own observation end.
    want = clv.fit_bgnbd(summary["x"], summary["t_x"], summary["T"])
    got = doc["bgnbd"]
    assert (got["r"], got["a"], got["b"]) != (1.0, 1.0, 1.0)
    for k in ("r", "alpha", "a", "b"):
        assert got[k] == pytest.approx(getattr(want, k), rel=1e-6), (k, got, want)
