"""The CLV refit: BG/NBD and Gamma-Gamma fitted on the current customer state.

``segstream clv fit`` runs it in its own process. A worker's scheduled refit runs it in a
child process (``python -m stream.clvfit``, settings on standard input, the stored document
on standard output): reading and fitting every purchaser is seconds to minutes of CPU, more
where the likelihood is flat and the optimiser runs to its evaluation limit, and on the
worker's event loop it would hold every batch, commit, heartbeat and ``/metrics`` scrape for
as long. The child runs on another core with its own Redis connection and imports only what
the fit needs.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import time
from typing import Any

import orjson

from features import serial
from features.state import derive, last_activity_ts
from features.store import RedisFeatureStore
from scorers import clv
from stream.errors import SegstreamError
from stream.redisconn import AsyncRedis, redis_client
from stream.runtime import registry_keys
from stream.settings import Settings

#: Customers sampled for a scheduled CLV refit (the fit is over the population, so a
#: large uniform sample gives the same parameters at a bounded cost).
CLV_FIT_MAX_CUSTOMERS = 500_000
#: The child's exit status for "nothing to fit" (a :class:`SegstreamError`; stderr says why).
EXIT_SKIPPED = 3
#: How much of a failed child's stderr the parent's error keeps.
STDERR_TAIL = 2_000


async def refit_clv(settings: Settings, r: AsyncRedis, store: RedisFeatureStore
                    ) -> dict[str, Any]:
    """Fit BG/NBD and Gamma-Gamma on the current customer state and store a new version."""
    t0 = time.perf_counter()
    now = await store.now()
    rows = []
    async for _, _, blob in store.iter_customers(settings.partitions):
        state = serial.decode(blob)
        # A customer committed while the scan runs may hold events past the engine time
        # read before it (a replay or catch-up under way): each is observed up to its own
        # newest event then, not before its purchases (T < 0 made the likelihood NaN, and
        # the optimiser's starting point was stored as a fit).
        f = derive(state, max(now, last_activity_ts(state)))
        if f["bgnbd_frequency"] is not None:
            rows.append((f["bgnbd_frequency"], f["bgnbd_recency"], f["bgnbd_T"],
                         f["bgnbd_monetary"]))
            if len(rows) >= CLV_FIT_MAX_CUSTOMERS:
                break
    if not rows:
        raise SegstreamError("no purchasing customers yet; nothing to fit")
    x, t_x, t_big, m = (list(c) for c in zip(*rows, strict=True))
    # Without these the likelihoods are flat: a "fit" would be the optimiser's starting
    # point (BG/NBD's a = 1 made the expected purchases -inf; Gamma-Gamma's p = q = v = 1
    # priced every repeat customer). Nothing is stored, and the scores stay unserved.
    if not any(v > 0 for v in t_big):
        raise SegstreamError("every purchasing customer is new today; nothing to fit")
    if not any(f > 0 and s > 0 for f, s in zip(x, m, strict=True)):
        raise SegstreamError("no repeat purchase of positive spend yet; nothing to fit")
    try:
        bg = clv.fit_bgnbd(x, t_x, t_big)
        gg = clv.fit_gamma_gamma(x, m)
    except ValueError as exc:
        raise SegstreamError(f"no fit stored: {exc}") from None
    doc: dict[str, Any] = {"customers": len(rows), "as_of": now, "bgnbd": bg.to_json(),
                           "gamma_gamma": {"p": gg.p, "q": gg.q, "v": gg.v}}
    keys = registry_keys(settings.redis_prefix)
    prev = await r.get(keys["clv"])
    if prev is not None and _same_fit(orjson.loads(prev), doc):
        # Unchanged parameters keep their version: a new one makes every worker re-score
        # every customer.
        old = orjson.loads(prev)
        old["seconds"] = round(time.perf_counter() - t0, 3)
        old["unchanged"] = True
        return dict(old)
    doc["version"] = int(await r.incr(keys["clv_version"]))
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    await r.set(keys["clv"], orjson.dumps(doc))
    return doc


def _same_fit(a: dict[str, Any], b: dict[str, Any], rel: float = 1e-6) -> bool:
    if a.get("customers") != b.get("customers"):
        return False
    for part in ("bgnbd", "gamma_gamma"):
        for k, v in b[part].items():
            w = a.get(part, {}).get(k)
            if isinstance(v, str) or w is None:
                if v != w:
                    return False
            elif abs(float(w) - float(v)) > rel * max(1.0, abs(float(v))):
                return False
    return True


async def refit_clv_in_child(settings: Settings) -> dict[str, Any]:
    """:func:`refit_clv` in a child process; the worker's event loop only waits for it.

    Raises :class:`SegstreamError` when there is nothing to fit (as :func:`refit_clv`
    does) and :class:`RuntimeError` with the end of the child's stderr when it fails.
    Cancelled (the worker stopping), the child is killed: the next tick fits again.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream.clvfit", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await proc.communicate(pickle.dumps(settings))
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        raise
    if proc.returncode == 0:
        doc: dict[str, Any] = orjson.loads(out)
        return doc
    text = err.decode(errors="replace").strip()
    if proc.returncode == EXIT_SKIPPED:
        raise SegstreamError(text)
    raise RuntimeError(f"the CLV refit process exited with status {proc.returncode}: "
                       f"{text[-STDERR_TAIL:]}")


async def _refit_with_own_client(settings: Settings) -> dict[str, Any]:
    r = redis_client(settings)
    try:
        return await refit_clv(settings, r, RedisFeatureStore(r, settings.redis_prefix))
    finally:
        await r.aclose()


def main() -> int:
    """The child: settings (pickled by the worker) in, the stored document out."""
    settings = pickle.load(sys.stdin.buffer)
    try:
        doc = asyncio.run(_refit_with_own_client(settings))
    except SegstreamError as exc:
        print(exc, file=sys.stderr)
        return EXIT_SKIPPED
    sys.stdout.buffer.write(orjson.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
