"""The reference trigger consumer against the real broker and Redis and a flaky local webhook."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

import orjson
import pytest
from aiohttp import web

from stream.triggers import TriggerStats, run_triggers

pytestmark = pytest.mark.integration


class Webhook:
    """A local webhook at ``url`` (``POST /hook``) while in ``async with``; ``handle``
    answers each request."""

    url = ""
    _runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


class FlakyWebhook(Webhook):
    """Fails ~30% of requests with 500, times out ~5%, rejects to_segment 'Reject' with 422."""

    def __init__(self, seed: int, slow_s: float) -> None:
        self.rng = random.Random(seed)
        self.slow_s = slow_s
        self.outcomes: dict[str, list[str]] = defaultdict(list)
        self.problems: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        mid = body["migration_id"]
        if request.headers.get("Idempotency-Key") != mid:
            self.problems.append(f"idempotency key of {mid}")
        if set(body) != {"migration_id", "customer_id", "scheme", "from_segment", "to_segment",
                         "at", "action"} or body["action"]["holdout"]:
            self.problems.append(f"body of {mid}: {body}")
        if body["to_segment"] == "Reject":
            self.outcomes[mid].append("rejected")
            return web.Response(status=422)
        roll = self.rng.random()
        if roll < 0.30:
            self.outcomes[mid].append("fail")
            return web.Response(status=500)
        if roll < 0.35:
            self.outcomes[mid].append("slow")  # the client gives up before the answer
            await asyncio.sleep(self.slow_s)
            return web.Response(status=200)
        self.outcomes[mid].append("ok")
        return web.Response(status=204)

    def ok(self) -> set[str]:
        return {m for m, o in self.outcomes.items() if "ok" in o}


def migrations(n: int, seed: int) -> tuple[list[tuple[bytes | None, bytes | None]], dict[str, Any]]:
    """Hand-built migration events (DESIGN §3) with duplicates, hold-outs, nulls, tombstones."""
    rng = random.Random(seed)
    records: list[tuple[bytes | None, bytes | None]] = []
    kinds: dict[str, set[str]] = defaultdict(set)
    docs: list[tuple[bytes, bytes]] = []
    for i in range(n):
        cid = f"c{i % 97}"
        mid = f"mig-{seed}-{i:05d}"
        kind = ("holdout" if i % 10 == 5 else "null" if i % 10 == 6
                else "reject" if i % 25 == 7 else "eligible")
        kinds[kind].add(mid)
        doc = {
            "migration_id": mid, "customer_id": cid, "scheme": "rfm",
            "from_segment": rng.choice([None, "Loyal", "Champions"]),
            "to_segment": "Reject" if kind == "reject" else rng.choice(["At Risk", "Lost"]),
            "at": 1_700_000_000_000 + i * 60_000, "emitted_at": "2024-01-01T00:00:00Z",
            "reason": "recency_days >= 90", "features": {"recency_days": 91},
            "scores": {"rfm": "311"}, "rules_version": "r1", "model_versions": {},
            "action": None if kind == "null" else {"action_id": "win-back-email",
                                                   "channel": "email",
                                                   "holdout": kind == "holdout"},
        }
        rec = (cid.encode(), orjson.dumps(doc))
        docs.append(rec)
        records.append(rec)
        if i % 9 == 0:  # an immediate redelivery by the engine
            records.append(rec)
            kinds["duplicates"].add(mid)
        if i % 20 == 3:
            records.append((cid.encode(), None))
    # Late redeliveries of earlier migrations, and some garbage.
    records += rng.sample(docs, 30)
    records += [(b"c1", b"not json"), (b"c2", b'{"no_id": 1}')]
    return records, kinds


async def committed_up_to_end(settings: Any, group: str) -> bool:
    from kafka import KafkaConsumer, TopicPartition

    from stream.kafka import client_config, end_offsets

    def check() -> bool:
        ends = end_offsets(settings, [settings.migrations_topic])
        c = KafkaConsumer(**client_config(settings), group_id=group, enable_auto_commit=False)
        try:
            return all(
                (c.committed(TopicPartition(t, p)) or 0) == end for (t, p), end in ends.items()
            )
        finally:
            c.close()

    return await asyncio.to_thread(check)


async def run_until(settings: Any, hook: FlakyWebhook, done: Any, *, cancel: bool = False,
                    timeout_s: float = 120) -> TriggerStats | None:
    """Run the consumer until ``done()``; then stop it gracefully or cancel it like a crash."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_triggers(
        settings, hook.url, max_attempts=40, stop=stop, request_timeout_s=0.3,
        backoff_base_s=0.01, backoff_max_s=0.2, batch_max=50,
    ))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await done():
        if task.done():
            task.result()
            raise AssertionError("consumer ended early")
        assert loop.time() < deadline, "consumer did not get there in time"
        await asyncio.sleep(0.05)
    if cancel:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return None
    stop.set()
    return await asyncio.wait_for(task, 30)


def check_deliveries(
    hook: FlakyWebhook,
    kinds: dict[str, set[str]],
    records: list[tuple[Any, bytes | None]],
    restarted: bool = False,
) -> None:
    assert not hook.problems, hook.problems[:5]
    eligible = kinds["eligible"]
    missing = eligible - hook.ok()
    assert not missing, f"{len(missing)} eligible migrations never delivered"
    never = kinds["holdout"] | kinds["null"]
    assert not never & set(hook.outcomes), "hold-out or action-less migrations were POSTed"
    copies: dict[str, int] = defaultdict(int)
    for _, v in records:
        if v is not None and v.startswith(b'{"migration_id"'):
            copies[orjson.loads(v)["migration_id"]] += 1
    repeated_rejections = 0
    for mid in kinds["reject"]:
        # Never retried and never blocking; a rejection is marked as a delivery is, so
        # later copies are skipped, and a restart offers it again only if it crashed
        # between the POST and the mark (it used to offer every rejection since the last
        # offset commit again after a crash).
        assert set(hook.outcomes[mid]) == {"rejected"}
        n = len(hook.outcomes[mid])
        assert 1 <= n <= copies[mid] if restarted else n == 1
        repeated_rejections += n - 1
    if restarted:
        assert repeated_rejections <= 3, repeated_rejections  # a partition each at most


def test_every_actionable_migration_is_posted_once(deployment: Any) -> None:
    s = deployment.settings
    records, kinds = migrations(300, seed=1)
    deployment.produce("segment-migrations", records)
    group = f"{s.app_id}-triggers"

    async def scenario() -> tuple[TriggerStats, FlakyWebhook]:
        async with FlakyWebhook(seed=7, slow_s=0.8) as hook:
            async def done() -> bool:
                return kinds["eligible"] <= hook.ok() and await committed_up_to_end(s, group)

            stats = await run_until(s, hook, done)
            assert stats is not None
            # A restart of the same group finds nothing left to do.
            before = {m: list(o) for m, o in hook.outcomes.items()}
            stop = asyncio.Event()
            task = asyncio.create_task(run_triggers(s, hook.url, stop=stop))
            await asyncio.sleep(6)
            stop.set()
            again = await asyncio.wait_for(task, 30)
            assert again.posted == again.duplicates == again.holdout == 0
            assert hook.outcomes == before
            return stats, hook

    stats, hook = asyncio.run(scenario())
    check_deliveries(hook, kinds, records)
    # No crash: every eligible migration succeeded exactly once, duplicates were skipped.
    oks = {m: o.count("ok") for m, o in hook.outcomes.items()}
    assert all(oks[m] == 1 for m in kinds["eligible"])
    for outcomes in hook.outcomes.values():
        if "ok" in outcomes:
            assert outcomes.index("ok") == len(outcomes) - 1  # nothing after a success
    n_values = [v for _, v in records]
    assert stats.tombstones == n_values.count(None)
    assert stats.malformed == 2
    assert stats.rejected == sum(len(hook.outcomes[m]) for m in kinds["reject"])
    assert stats.posted == len(kinds["eligible"])
    assert stats.retries > 0 and any("slow" in o for o in hook.outcomes.values())
    eligible_records = sum(
        1 for _, v in records
        if v is not None and v.startswith(b"{\"migration_id\"")
        and orjson.loads(v)["migration_id"] in kinds["eligible"]
    )
    reject_records = sum(
        1 for _, v in records
        if v is not None and v.startswith(b"{\"migration_id\"")
        and orjson.loads(v)["migration_id"] in kinds["reject"]
    )
    assert stats.duplicates == (eligible_records - len(kinds["eligible"])
                                + reject_records - len(kinds["reject"]))
    holdout_records = sum(1 for _, v in records if v and b'"holdout":true' in v)
    assert stats.holdout == holdout_records


def test_stopped_and_crashed_consumer_resumes_without_missing_any(deployment: Any) -> None:
    s = deployment.settings
    records, kinds = migrations(400, seed=2)
    deployment.produce("segment-migrations", records)
    group = f"{s.app_id}-triggers"
    eligible = kinds["eligible"]

    async def scenario() -> FlakyWebhook:
        async with FlakyWebhook(seed=11, slow_s=0.8) as hook:
            async def third() -> bool:
                return len(hook.ok() & eligible) >= len(eligible) // 3

            async def two_thirds() -> bool:
                return len(hook.ok() & eligible) >= 2 * len(eligible) // 3

            async def everything() -> bool:
                return eligible <= hook.ok() and await committed_up_to_end(s, group)

            first = await run_until(s, hook, third)
            assert first is not None and first.posted < len(eligible)
            await run_until(s, hook, two_thirds, cancel=True)
            await run_until(s, hook, everything)
            return hook

    hook = asyncio.run(scenario())
    check_deliveries(hook, kinds, records, restarted=True)
    # A graceful stop never re-posts; the crash may re-post what was in flight (one per
    # partition), and only where that POST was not yet marked as delivered.
    repeated = [m for m, o in hook.outcomes.items() if o.count("ok") > 1]
    assert len(repeated) <= s.partitions, repeated


class PacedWebhook(FlakyWebhook):
    """A FlakyWebhook that takes ``pace_s`` over every request (a busy receiver)."""

    def __init__(self, seed: int, slow_s: float, pace_s: float) -> None:
        super().__init__(seed, slow_s)
        self.pace_s = pace_s

    async def handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.pace_s)
        return await super().handle(request)


def test_a_second_consumer_joining_the_group_posts_nothing_twice(deployment: Any) -> None:
    """Scale-out: a second consumer joins the group while the first is mid-batch. The
    rebalance takes partitions from the first; what it handled of them is committed before
    they go and it handles no more of them, so the new owner posts nothing twice."""
    s = deployment.settings
    records, kinds = migrations(400, seed=3)
    deployment.produce("segment-migrations", records)
    group = f"{s.app_id}-triggers"
    eligible = kinds["eligible"]

    async def scenario() -> tuple[PacedWebhook, TriggerStats, TriggerStats]:
        async with PacedWebhook(seed=13, slow_s=0.8, pace_s=0.08) as hook:
            stops = [asyncio.Event(), asyncio.Event()]

            def start(i: int) -> asyncio.Task[TriggerStats]:
                return asyncio.create_task(run_triggers(
                    s, hook.url, max_attempts=40, stop=stops[i], request_timeout_s=0.3,
                    backoff_base_s=0.01, backoff_max_s=0.2, batch_max=50))

            first = start(0)
            while len(hook.ok() & eligible) < len(eligible) // 5:
                assert not first.done(), first
                await asyncio.sleep(0.05)
            second = start(1)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 180
            while not (eligible <= hook.ok() and await committed_up_to_end(s, group)):
                assert loop.time() < deadline, "not delivered in time"
                assert not first.done() and not second.done()
                await asyncio.sleep(0.1)
            for stop in stops:
                stop.set()
            a, b = await asyncio.wait_for(asyncio.gather(first, second), 60)
            return hook, a, b

    hook, a, b = asyncio.run(scenario())
    # A rejection (4xx) is not marked: one in flight when its partition moved may be offered
    # to the webhook again by the new owner, as after a restart.
    check_deliveries(hook, kinds, records, restarted=True)
    twice = [m for m, o in hook.outcomes.items() if o.count("ok") > 1]
    assert not twice, twice
    assert b.posted > 0, "the second consumer never got a partition"
    assert a.posted + b.posted == len(eligible)


def test_each_group_delivers_every_migration_to_its_own_webhook(deployment: Any) -> None:
    """One consumer group per downstream system (--group): each gets every migration."""
    s = deployment.settings
    records, kinds = migrations(120, seed=4)
    deployment.produce("segment-migrations", records)

    async def deliver(group: str) -> FlakyWebhook:
        async with FlakyWebhook(seed=17, slow_s=0.8) as hook:
            stop = asyncio.Event()
            task = asyncio.create_task(run_triggers(
                s, hook.url, group=group, max_attempts=40, stop=stop, request_timeout_s=0.3,
                backoff_base_s=0.01, backoff_max_s=0.2))
            deadline = asyncio.get_running_loop().time() + 120
            while not (kinds["eligible"] <= hook.ok() and await committed_up_to_end(s, group)):
                assert asyncio.get_running_loop().time() < deadline and not task.done()
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 30)
            return hook

    for group in (f"{s.app_id}-email", f"{s.app_id}-crm"):
        hook = asyncio.run(deliver(group))
        check_deliveries(hook, kinds, records)


def test_the_consumer_starts_before_any_worker_created_the_topics(deployment: Any) -> None:
    """The trigger consumer creates the deployment's topics when missing, as a worker does,
    instead of failing on a topic that does not exist yet."""
    from stream.kafka import admin

    s = deployment.settings

    async def scenario() -> TriggerStats:
        async with FlakyWebhook(seed=1, slow_s=0.8) as hook:
            stop = asyncio.Event()
            task = asyncio.create_task(run_triggers(s, hook.url, stop=stop))
            await asyncio.sleep(5)
            assert not task.done() or task.exception() is None
            stop.set()
            return await asyncio.wait_for(task, 30)

    assert asyncio.run(scenario()).posted == 0
    a = admin(s)
    try:
        assert s.migrations_topic in set(a.list_topics())
    finally:
        a.close()


class GatedWebhook(Webhook):
    """Answers 500 to the first attempt of every migration whose id ends in 3, else 204,
    and holds every request while ``gate`` is clear; counts what it was sent."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.requests = 0
        self.failed = 0
        self.seen: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        await self.gate.wait()
        mid = orjson.loads(await request.read())["migration_id"]
        first = mid not in self.seen
        self.seen.add(mid)
        if first and mid.endswith("3"):
            self.failed += 1
            return web.Response(status=500)
        return web.Response(status=204)


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_the_consumer_exports_its_counts_its_lag_and_the_webhook_times(
        make_deployment: Any) -> None:
    """`segstream triggers --metrics-port`: an operator sees the consumer fall behind while
    the webhook hangs, and what became of every migration, against the records produced
    and the requests the webhook counted."""
    import socket
    import urllib.error
    import urllib.request

    from stream.kafka import end_offsets
    from stream.triggers import TriggerOptionError

    token = "trigger-metrics-token"
    dep = make_deployment(SEGSTREAM_API_TOKEN=token)
    s = dep.settings
    records, kinds = migrations(200, seed=5)
    dep.produce("segment-migrations", records)
    ends = end_offsets(s, [s.migrations_topic])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}/metrics"

    def scrape(auth: bool = True) -> dict[str, float]:
        req = urllib.request.Request(base, headers={"Authorization": f"Bearer {token}"}
                                     if auth else {})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            return _samples(resp.read().decode())

    def lags(m: dict[str, float]) -> dict[int, float]:
        head = 'segstream_triggers_consumer_lag{partition="'
        return {int(k[len(head):-2]): v for k, v in m.items() if k.startswith(head)}

    async def scenario() -> tuple[dict[str, float], dict[str, float], GatedWebhook, int]:
        async with GatedWebhook() as hook:
            stop = asyncio.Event()
            task = asyncio.create_task(run_triggers(
                s, hook.url, stop=stop, request_timeout_s=30, backoff_base_s=0.01,
                backoff_max_s=0.05, metrics_port=port))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            # Every partition fetched and stuck at its first actionable migration.
            while True:
                assert not task.done(), task
                assert loop.time() < deadline, "the lag of every partition never showed"
                try:
                    held = await asyncio.to_thread(scrape)
                except (urllib.error.URLError, ConnectionError):
                    held = {}
                if len(lags(held)) == len(ends) and hook.requests >= len(ends):
                    break
                await asyncio.sleep(0.2)
            with pytest.raises(urllib.error.HTTPError) as refused:
                await asyncio.to_thread(scrape, False)
            code = refused.value.code
            # A second consumer cannot take the same port: it says which option.
            with pytest.raises(TriggerOptionError, match="--metrics-port"):
                await run_triggers(s, hook.url, group="other", metrics_port=port)
            hook.gate.set()
            group = f"{s.app_id}-triggers"
            while not (await committed_up_to_end(s, group)
                       and kinds["eligible"] <= hook.seen):
                assert loop.time() < deadline + 120, "the consumer did not catch up"
                await asyncio.sleep(0.2)
            done = await asyncio.to_thread(scrape)
            stop.set()
            await asyncio.wait_for(task, 30)
            return held, done, hook, code

    held, done, hook, code = asyncio.run(scenario())
    assert code == 401
    total = sum(ends.values())
    values = [v for _, v in records]
    docs = [orjson.loads(v) for v in values if v is not None and v.startswith(b'{"migration_id"')]
    eligible = [d for d in docs if d["migration_id"] in kinds["eligible"] | kinds["reject"]]
    # Held: at most one record per partition handled past its first actionable one, none
    # of which was answered, so every actionable record is still behind.
    assert len(eligible) <= sum(lags(held).values()) <= total, (lags(held), total)
    assert held.get('segstream_triggers_migrations_total{outcome="posted"}') == 0
    # Caught up: nothing behind, and every record counted once under what became of it.
    assert set(lags(done).values()) == {0.0}, lags(done)

    def outcome(name: str) -> float:
        return done[f'segstream_triggers_migrations_total{{outcome="{name}"}}']

    assert outcome("posted") == len(kinds["eligible"]) + len(kinds["reject"])  # no 4xx here
    assert outcome("holdout") == sum(1 for d in docs if d["action"] and d["action"]["holdout"])
    assert outcome("no_action") == sum(1 for d in docs if d["action"] is None)
    assert outcome("tombstone") == values.count(None)
    assert outcome("malformed") == 2
    assert outcome("duplicate") == len(eligible) - len(hook.seen)
    assert outcome("rejected") == outcome("forgotten") == 0
    assert done["segstream_triggers_retries_total"] == hook.failed > 0
    assert done["segstream_triggers_webhook_seconds_count"] == hook.requests
    assert done["segstream_triggers_offset_commits_total"] >= 1
    # The requests held at the gate took their time, and show in the histogram.
    assert done["segstream_triggers_webhook_seconds_sum"] > 0.1
