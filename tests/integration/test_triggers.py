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


class FlakyWebhook:
    """Fails ~30% of requests with 500, times out ~5%, rejects to_segment 'Reject' with 422."""

    def __init__(self, seed: int, slow_s: float) -> None:
        self.rng = random.Random(seed)
        self.slow_s = slow_s
        self.outcomes: dict[str, list[str]] = defaultdict(list)
        self.problems: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

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

    async def __aenter__(self) -> FlakyWebhook:
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
