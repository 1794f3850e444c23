"""The learner in a process of its own (``SEGSTREAM_LEARNER=process``, the default).

Training the online models is CPU work that does not have to share the ingest loop:
``segstream bench`` measured the end-to-end latency at 5,000 events/s offered at a
p99 of seconds while the learner worked off the examples of a backlog in the
worker's own event loop, and about 100 ms with no learning at all. ``segstream
worker`` therefore starts ``segstream learner`` as a child process, which runs
:class:`~stream.learner.Learner` on its own event loop and core: it consumes the
examples topic in its own consumer group (``<app id>-learner``; one partition, so
one learner of a deployment is active and the others wait), learns, and publishes
model snapshots and persona pages to Redis exactly as the in-loop learner does
(``SEGSTREAM_LEARNER=inline`` keeps that one). A child whose worker is gone (even
after ``kill -9``) stops within a second.

Offsets are committed after the examples were learned, as the in-loop learner acks
them; a model snapshot every ``SEGSTREAM_MODEL_SNAPSHOT_S`` carries what was learned,
and an example delivered again is recognised by the model and not learned twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from features.store import RedisFeatureStore
from stream.kafka import aiokafka_config
from stream.learner import Learner
from stream.redisconn import redis_client
from stream.settings import Settings

log = logging.getLogger(__name__)

#: Examples taken from Kafka at a time.
FETCH_RECORDS = 1_000
#: How often the service checks that its parent worker still exists.
PARENT_CHECK_S = 1.0
#: Longest wait between two attempts to load the models while Redis does not answer.
LOAD_RETRY_MAX_S = 5.0


def group_id(settings: Settings) -> str:
    return settings.learner_group


class _Assignments(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: LearnerService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            await self.service.on_revoked()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            try:
                await self.service.on_assigned()
            except Exception as exc:  # e.g. Redis down: the fetch loop loads them later
                log.warning("learner: models not loaded on assignment (%r); loading them "
                            "again when examples arrive", exc)


class LearnerService:
    """Consumes the examples topic, learns, and publishes snapshots on a timer."""

    def __init__(self, settings: Settings, parent_pid: int | None = None) -> None:
        self.settings = settings
        self.parent_pid = parent_pid
        self.stop = asyncio.Event()
        self.redis = redis_client(settings)
        self.store = RedisFeatureStore(self.redis, settings.redis_prefix)
        self.learner: Learner | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self._loading = asyncio.Lock()

    async def on_assigned(self) -> None:
        # Another learner may have trained meanwhile: resume from the newest checkpoint.
        async with self._loading:
            if self.learner is not None:
                return
            learner = Learner(self.settings, self.redis)
            await learner.load()
            self.learner = learner
        log.info("learner: examples partition assigned; models loaded")

    async def on_revoked(self) -> None:
        if self.learner is not None:
            with contextlib.suppress(Exception):
                await self._publish()
            with contextlib.suppress(Exception):
                await self._commit_saved()
        self.learner = None

    async def _commit_saved(self) -> None:
        """Commit the examples' offsets once everything learned from them is in Redis.

        What a fetch teaches stays in memory until the next checkpoint (every
        ``CHECKPOINT_S``) or promotion, so the commit moves only when no model holds
        unsaved learning: a learner killed in between is restarted from its checkpoint and
        sent again what that checkpoint lacks (it skips, by example id, what it holds).
        """
        learner = self.learner
        if (learner is None or self.consumer is None or learner.offset < 0
                or learner.unsaved or learner.dirty):
            return
        tp = TopicPartition(self.settings.examples_topic, 0)
        await self.consumer.commit({tp: learner.offset + 1})

    async def _publish(self) -> None:
        # A learner whose worker was killed publishes nothing more: a worker that dies
        # takes its in-loop learner with it, and a restarted one resumes from what the
        # registry held at the kill.
        if self.learner is not None and not self.parent_gone():
            await self.learner.learn_personas(self.store)
            await self.learner.publish()

    def parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    async def _snapshots(self) -> None:
        next_snapshot = time.monotonic() + self.settings.model_snapshot_s
        while not self.stop.is_set():
            await asyncio.sleep(min(PARENT_CHECK_S, self.settings.model_snapshot_s))
            if self.parent_gone():
                log.info("learner: the worker that started it is gone; stopping")
                self.stop.set()
                return
            if time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + self.settings.model_snapshot_s
                try:
                    await self._publish()
                    await self._commit_saved()
                except Exception as exc:
                    log.warning("model snapshot failed: %r", exc)

    async def run(self) -> None:
        s = self.settings
        self.consumer = AIOKafkaConsumer(
            group_id=group_id(s), enable_auto_commit=False, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 2**20, **aiokafka_config(s))
        consumer = self.consumer
        await consumer.start()
        consumer.subscribe([s.examples_topic], listener=_Assignments(self))
        timer = asyncio.ensure_future(self._snapshots())
        failures = 0
        try:
            while not self.stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=FETCH_RECORDS)
                if not batches:
                    continue
                if self.learner is None:
                    # Records can arrive while the assignment callback still loads the
                    # models; they are never dropped (the position is already past them).
                    try:
                        await self.on_assigned()
                    except Exception as exc:
                        # Redis does not answer: learn nothing yet, and fetch these
                        # examples again once the models could be loaded.
                        for tp, records in batches.items():
                            consumer.seek(tp, records[0].offset)
                        failures += 1
                        delay = min(LOAD_RETRY_MAX_S, 0.1 * 2 ** min(failures, 6))
                        log.warning("learner: models could not be loaded (%r); "
                                    "retrying in %.1fs", exc, delay)
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self.stop.wait(), delay)
                        continue
                    failures = 0
                learner = self.learner
                assert learner is not None
                for records in batches.values():
                    learner.learn([(r.offset, r.value) for r in records])
                # committed by _commit_saved once a checkpoint holds what was learned
        finally:
            timer.cancel()
            with contextlib.suppress(BaseException):
                await timer
            with contextlib.suppress(Exception):
                await self._publish()
            with contextlib.suppress(Exception):
                await self._commit_saved()
            await consumer.stop()
            await self.redis.aclose()


#: Scheduling priority of a learner started by a worker: training is background work,
#: and on a shared host the worker, Kafka and Redis go first.
CHILD_NICE = 10


def run(settings: Settings, parent_pid: int | None = None) -> None:
    """Run the learner in this process until SIGTERM/SIGINT or until its parent is gone
    (a learner a worker started runs at a lower priority, :data:`CHILD_NICE`)."""
    if parent_pid is not None:
        os.nice(CHILD_NICE)

    async def main() -> None:
        service = LearnerService(settings, parent_pid)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop.set)
        await service.run()

    asyncio.run(main())


class LearnerChild:
    """A worker's learner process, started again whenever it exits on its own.

    A learner that dies (a crash, an out-of-memory kill) would leave the deployment's
    examples unlearned and its models frozen until the worker restarts; this one is
    restarted after a pause that doubles with each quick exit (up to a minute). One that
    was told to stop (exit code 0, SIGINT or SIGTERM) is not.
    """

    #: A child that ran this long before it exited is restarted after the shortest pause.
    STEADY_S = 60.0

    def __init__(self, settings: Settings, check_s: float = 1.0) -> None:
        self.settings = settings
        self.check_s = check_s
        self.restarts = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.proc = spawn(settings)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="learner-child", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        pause = 1.0
        while not self._stopped.wait(self.check_s):
            code = self.proc.poll()
            if code is None:
                continue
            if code in (0, -signal.SIGINT, -signal.SIGTERM):
                # Told to stop (e.g. Ctrl-C reached the whole process group): the worker
                # is stopping too.
                log.info("learner process stopped (code %s)", code)
                return
            if time.monotonic() - self._started >= self.STEADY_S:
                pause = 1.0
            log.warning("learner process exited (code %s); starting it again in %.0fs",
                        code, pause)
            if self._stopped.wait(pause):
                return
            with self._lock:
                if self._stopped.is_set():
                    return
                self.proc = spawn(self.settings)
                self._started = time.monotonic()
                self.restarts += 1
            pause = min(60.0, pause * 2)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching, then stop the child (SIGTERM, then SIGKILL)."""
        with self._lock:
            self._stopped.set()
            proc = self.proc
        stop_child(proc, timeout)


def spawn(settings: Settings) -> subprocess.Popen[bytes]:
    """Start ``segstream learner`` as a child of this process (with its environment)."""
    env = dict(os.environ)
    env["SEGSTREAM_LEARNER_PARENT_PID"] = str(os.getpid())
    return subprocess.Popen([sys.executable, "-m", "stream.cli", "learner"], env=env)


def stop_child(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a spawned learner: SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
