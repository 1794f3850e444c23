"""Timer sweeps: re-evaluate customers whom time or the population moved.

A silent customer still moves (Loyal -> At Risk -> Hibernating) because engine
time advances with other customers' events, RFM ranks move with the population,
and models and rules get new versions. Every input of an evaluation other than
the customer's own state is summarised in :meth:`ScoringRuntime.digest`; when it
differs from the digest of the last completed pass over a partition, the
partition is swept again. Each chunk of customers is loaded, evaluated and
committed with the same optimistic, fenced commit as the ingest path, so a
sweep and a micro-batch never overwrite each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from features import serial
from features.events import MS_PER_DAY
from features.store import FeatureStore, PartitionCommit, StoreUnavailable
from scorers.profile import Profile
from scorers.scoring import RFM_HASH, CustomerInput, ScoringContext, is_current
from stream.pipeline import BatchProcessor, Scoring, settled_ms
from stream.redact import cid_ref
from stream.redisconn import refusal_hint

#: The swept marker of a partition with held customers coming due: never the context, so
#: ``segstream wait`` does not count the partition as settled until they are evaluated.
HELD_MARK = "held"

log = logging.getLogger(__name__)

#: Customers per sweep step of an idle worker.
CHUNK = 200
#: Customers per sweep step while input keeps arriving: a batch waits for at most one
#: step, and a step of 200 customers held the event loop for 50-100 ms.
BUSY_CHUNK = 40
#: The time a busy sweep step aims to hold the batch lock, so a batch arriving meanwhile
#: waits about this long at most: steps shrink below BUSY_CHUNK customers when a customer
#: costs more (many schemes, many moves, a slow Redis).
BUSY_STEP_S = 0.02
#: Fewest customers in a busy step (each step also pays its Redis round trips).
MIN_BUSY_CHUNK = 4
#: Weight of the latest step in the running cost per customer.
COST_WEIGHT = 0.3
#: Attempts at a chunk (conflicts with batches, failed commits) before it is given up.
CHUNK_ATTEMPTS = 20
#: Seconds before a chunk whose commit failed (Redis unreachable) is tried again.
RETRY_S = 0.5
#: How often a sweep step waits for the background commit and publish of the batch
#: before it outside the batch lock, before it waits for them holding the lock.
SETTLE_TRIES = 3
#: The most a busy sweep step's time counts for its pause (a step of BUSY_CHUNK customers
#: takes a few tens of milliseconds; a longer one waited for something).
PACED_STEP_MAX_S = 0.25


@dataclass
class SweepStats:
    #: customers evaluated, and customers passed over as current (see ``is_current``)
    customers: int = 0
    skipped: int = 0
    migrations: int = 0
    conflicts: int = 0
    #: customers passed over because their stored state or profile could not be read
    unreadable: int = 0
    #: chunks given up after repeated conflicts or failed commits (their partition is
    #: not marked swept, so the next pass tries it again)
    abandoned: int = 0
    seconds: float = 0.0
    #: partitions of the pass whose outbox is being published in the background
    published_to: set[int] = field(default_factory=set)


class Sweeper:
    """Runs sweep passes over the partitions this worker owns."""

    def __init__(self, processor: BatchProcessor, runtime: Scoring,
                 store: FeatureStore, lock: asyncio.Lock,
                 busy: Callable[[], bool] = lambda: False, max_share: float = 1.0) -> None:
        self.processor = processor
        self.runtime = runtime
        self.store = store
        self.lock = lock
        #: whether input is arriving; while it is, a pass is paced by ``max_share``
        self.busy = busy
        self.max_share = max_share
        self.swept: dict[int, str] = {}
        self.last_pass_end = 0.0
        #: called with (customers evaluated, seconds the lock was held) after each step
        self.on_step: Callable[[int, float], None] | None = None
        #: running lock time per customer of a step (0: no step measured yet)
        self.cost_per_customer = 0.0
        #: per partition, a heap of (end of a minimum dwell, customer id): customers held
        #: in a segment past the engine time of their last evaluation (:meth:`note_held`);
        #: an entry counts only while it is the customer's earliest in ``held_next``
        self.held: dict[int, list[tuple[int, str]]] = {}
        self.held_next: dict[int, dict[str, int]] = {}
        #: per partition, how often it was revoked: a pass or timer run that began before
        #: a revocation must not mark the partition swept
        self._generation: dict[int, int] = {}
        self._catalogue: object = None
        self._short_dwell = False
        if processor is not None:
            processor.on_moved = self.note_moved

    def busy_step(self) -> int:
        """Customers in the next step while input arrives: as many as fit in
        :data:`BUSY_STEP_S` at the running cost, within MIN_BUSY_CHUNK..BUSY_CHUNK."""
        if self.cost_per_customer <= 0:
            return BUSY_CHUNK
        return max(MIN_BUSY_CHUNK, min(BUSY_CHUNK, int(BUSY_STEP_S / self.cost_per_customer)))

    def _observe_cost(self, customers: int, held_s: float) -> None:
        # Capped like the pacing: a step that waited out an outage says little of the cost.
        per = min(held_s, PACED_STEP_MAX_S) / customers
        old = self.cost_per_customer
        self.cost_per_customer = per if old <= 0 else (1 - COST_WEIGHT) * old + COST_WEIGHT * per

    def pause_after(self, chunk_s: float) -> float:
        """Seconds to wait after a chunk that took ``chunk_s``, so that while input is
        arriving sweeps take at most ``max_share`` of the worker's time. Ingest comes
        first: a busy worker evaluates its customers with every batch anyway, and only
        the time-driven moves of silent customers wait longer."""
        if self.max_share >= 1.0 or not self.busy():
            return 0.0
        return chunk_s * (1.0 - self.max_share) / self.max_share

    async def check_store(self, partitions: Iterable[int]) -> None:
        """Stop (``PipelineFailed``) if the store lost what this worker committed to
        ``partitions``, with no batch or sweep needed to find out.

        A batch and a sweep step check the watermarks they load, but an idle worker loads
        nothing: a Redis restarted empty under it went unnoticed until input came for a
        partition it had committed to, and meanwhile sweeps and batches of its other
        partitions scored against the emptied state. Called while the worker is idle;
        one round trip, under the batch lock with nothing committing in the background
        (a commit landing between the read and the check would look like a loss).
        """
        wrote = self.processor.written_partitions()
        parts = sorted(p for p in partitions if p in wrote)
        if not parts:
            return
        await self._acquire()
        try:
            await self.processor.drain()
            self.processor.raise_if_failed()
            _now, snaps = await self.store.load({p: [] for p in parts}, self.processor.topics)
            self.processor.check_kept(snaps)
        finally:
            self.lock.release()

    def key(self, now_ms: int) -> str:
        """What a pass at ``now_ms`` is marked with: the engine day and the population's
        RFM thresholds in clear (``segstream wait`` compares them with the store's, so a
        worker that died after a batch moved either leaves the deployment unsettled),
        then the digest of every scoring input (:meth:`ScoringRuntime.digest`)."""
        pop = getattr(self.runtime, "population", None)
        return (f"{now_ms // MS_PER_DAY}:{pop.digest if pop is not None else ''}:"
                f"{self.runtime.digest(now_ms)}")

    @staticmethod
    def key_parts(key: str) -> tuple[int, str] | None:
        """The engine day and the RFM threshold digest a :meth:`key` names (None: a key
        of another form, as older workers wrote)."""
        day, sep, rest = key.partition(":")
        if not sep or not day.isdigit():
            return None
        return int(day), rest.partition(":")[0]

    def note_held(self, p: int, customer_id: str, profile: Profile, now_ms: int = -1) -> None:
        """Remember when ``profile``'s minimum dwells end past ``now_ms`` (-1: the profile
        of a move, made at its newest segment entry): the customer is evaluated again
        then (:meth:`run_held`), with no event of theirs and within the engine day (a
        pass over the partition only follows a new day or new inputs)."""
        catalogue = getattr(self.runtime, "catalogue", None)
        if catalogue is None or not profile.segments:
            return
        schemes = catalogue.schemes
        if now_ms < 0:  # a move: its segment's entry time is the evaluation's engine time
            now_ms = max(since for _seg, since in profile.segments.values())
        soonest = -1
        for name, (segment, since) in profile.segments.items():
            scheme = schemes.get(name)
            if scheme is None or scheme.min_dwell_ms <= 0 or (
                    segment not in scheme.segment_names):
                continue
            end = since + scheme.min_dwell_ms
            if end > now_ms and (soonest < 0 or end < soonest):
                soonest = end
        if soonest < 0:
            return
        # Only the earliest end is kept: the evaluation then notes the later ones again.
        known = self.held_next.setdefault(p, {})
        have = known.get(customer_id)
        # An end at or before this evaluation is spent: the customer is being evaluated.
        if have is None or soonest < have or have <= now_ms:
            known[customer_id] = soonest
            heapq.heappush(self.held.setdefault(p, []), (soonest, customer_id))

    def note_moved(self, p: int, customer_id: str, profile: Profile, now_ms: int = -1) -> None:
        """:meth:`note_held` for a move, where a pass may not note it in time: a dwell of a
        day or more that a move starts ends on a later engine day, and that day's pass
        (which reads every customer of the partition) notes it, or evaluates the customer
        if the dwell has ended by then. Only a catalogue with a shorter dwell needs each
        move noted (it costs the ingest path a few microseconds per move)."""
        catalogue = getattr(self.runtime, "catalogue", None)
        if catalogue is not self._catalogue:
            self._catalogue = catalogue
            self._short_dwell = catalogue is not None and any(
                0 < s.min_dwell_ms < MS_PER_DAY for s in catalogue.schemes.values())
        if self._short_dwell:
            self.note_held(p, customer_id, profile, now_ms)

    def _pop_held(self, p: int, now_ms: int) -> list[str]:
        """The customers of partition ``p`` whose earliest dwell end is at or before
        ``now_ms``, forgotten here (their evaluation notes their later ends)."""
        heap, known = self.held.get(p), self.held_next.get(p)
        out: list[str] = []
        while heap and heap[0][0] <= now_ms:
            end, cid = heapq.heappop(heap)
            if known is not None and known.get(cid) == end:
                del known[cid]
                out.append(cid)
        return out

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions this worker no longer owns: if they come back, another owner may
        have moved their customers meanwhile, so they are swept (and noted) afresh."""
        for p in partitions:
            self._generation[p] = self._generation.get(p, 0) + 1
            self.swept.pop(p, None)
            self.held.pop(p, None)
            self.held_next.pop(p, None)

    async def run_held(self, partitions: Iterable[int]) -> SweepStats:
        """Evaluate the customers of ``partitions`` whose minimum dwell has ended by the
        engine time now (they may move now), as a sweep evaluates them."""
        stats = SweepStats()
        now = await self.store.now()
        if now < 0:
            return stats
        t0 = time.perf_counter()
        await self.runtime.refresh()
        key = self.key(now)
        for p in sorted(set(partitions)):
            marked = self.swept.get(p)
            if marked != key:
                # Due for a pass (a new day, new inputs, or engine time moved on during
                # the last one): the pass evaluates these customers and drops their ends.
                continue
            ids = self._pop_held(p, now)
            if not ids:
                continue
            generation = self._generation.get(p, 0)
            try:
                await self.store.mark_swept(p, HELD_MARK)
                complete = True
                while ids:
                    step = self.busy_step() if self.busy() else CHUNK
                    c0 = time.perf_counter()
                    complete = await self._chunk(p, ids[:step], stats) and complete
                    ids = ids[step:]
                    pause = self.pause_after(min(time.perf_counter() - c0, PACED_STEP_MAX_S))
                    if pause > 0:
                        await asyncio.sleep(pause)
                if p in stats.published_to:
                    stats.published_to.discard(p)
                    await self.processor.drain()
                    complete = complete and self.processor.is_clean(p)
            except BaseException:
                # Their ends are gone from the timer: the next pass takes the partition.
                self.swept.pop(p, None)
                raise
            if self._generation.get(p, 0) != generation:
                continue  # revoked meanwhile: its next owner marks it
            if not complete:
                self.swept.pop(p, None)  # the next pass takes the whole partition again
            elif self.swept.get(p) == marked:
                await self.store.mark_swept(p, marked)
        stats.seconds = time.perf_counter() - t0
        return stats

    async def due(self, partitions: Iterable[int]) -> list[int]:
        """Partitions whose last completed pass used other inputs than now."""
        await self.runtime.refresh()
        now = await self.store.now()
        if now < 0:
            return []
        digest = self.key(now)
        # Published so that `segstream wait` can tell when every partition is settled.
        await self.store.set_context(digest)
        return [p for p in partitions if self.swept.get(p) != digest]

    async def run_pass(self, partitions: Iterable[int]) -> SweepStats:
        stats = SweepStats()
        t0 = time.perf_counter()
        for p in partitions:
            await self.runtime.refresh()
            now = await self.store.now()
            digest = self.key(now)
            generation = self._generation.get(p, 0)
            cursor, complete = 0, True
            while True:
                cursor, ids = await self.store.scan_customers(p, cursor, CHUNK)
                while ids:
                    step = self.busy_step() if self.busy() else CHUNK
                    c0 = time.perf_counter()
                    complete = await self._chunk(p, ids[:step], stats) and complete
                    ids = ids[step:]
                    # A step counts for at most PACED_STEP_MAX_S: one that waited out a
                    # broker or Redis outage did no work meanwhile, and pacing it by its
                    # whole time held every time-driven move back for 9 x the outage.
                    held = time.perf_counter() - c0
                    pause = self.pause_after(min(held, PACED_STEP_MAX_S))
                    if pause > 0:
                        await asyncio.sleep(pause)
                if cursor == 0:
                    break
            if not complete:
                # A chunk was given up: the partition is not settled, and the next pass
                # (its scoring inputs are still the same) must take it again.
                continue
            # The partition counts as swept (``segstream wait``) once its migrations are
            # out; one whose publish failed is swept again (its outbox waits in the store
            # for the next flush).
            if p in stats.published_to:
                stats.published_to.discard(p)
                await self.processor.drain()
                if not self.processor.is_clean(p):
                    log.warning("sweep of partition %d: outbox publish failed; the "
                                "partition is swept again", p)
                    continue
            if self._generation.get(p, 0) != generation:
                continue  # revoked during the pass: its next owner sweeps and marks it
            await self.store.mark_swept(p, digest)
            self.swept[p] = digest  # only once the store says so too (``segstream wait``)
            # Every customer whose dwell ended by then was evaluated in this pass (their
            # mark is of an earlier day, or their dwell ends today: not current).
            self._pop_held(p, now)
        stats.seconds = time.perf_counter() - t0
        self.last_pass_end = time.monotonic()
        return stats

    async def _chunk(self, p: int, ids: list[str], stats: SweepStats) -> bool:
        """Sweep one chunk of customers; False if it was given up."""
        for _attempt in range(CHUNK_ATTEMPTS):
            await self._acquire()
            try:
                before, t0 = stats.customers, time.perf_counter()
                try:
                    outcome = await self._step(p, ids, stats)
                finally:
                    held = time.perf_counter() - t0
                    if self.on_step is not None:
                        self.on_step(stats.customers - before, held)
            finally:
                self.lock.release()
            if ids:
                self._observe_cost(len(ids), held)
            if outcome == "done":
                return True
            if outcome == "failed":
                await self.retry_pause()  # outside the lock: batches go on meanwhile
        stats.abandoned += 1
        log.warning("sweep of partition %d gave up on a chunk of %d customers after %d "
                    "conflicts or failed commits; the partition is swept again", p,
                    len(ids), CHUNK_ATTEMPTS)
        return False

    async def _acquire(self) -> None:
        """Take the batch lock, preferably with nothing committing or publishing in the
        background.

        A step must start after the background commit and publish of the batch before it
        (it loads what that batch committed). Waiting for them while holding the lock
        kept the next batch waiting too, for a broker acknowledgement that is neither's
        work; so the step waits for them first, and gives the lock back when a batch
        slipped in meanwhile and left work of its own in the background. After
        :data:`SETTLE_TRIES` such turns it keeps the lock and waits under it (the step's
        own drain), so that a steady input cannot hold sweeps off for good.
        """
        for _turn in range(SETTLE_TRIES):
            await self.processor.drain()
            await self.lock.acquire()
            if self.processor.settled:
                return
            self.lock.release()
        await self.lock.acquire()

    def _evaluate(self, customers: list[tuple[str, bytes, Profile]], ctx: ScoringContext,
                  commit: PartitionCommit, p: int, stats: SweepStats) -> dict[str, int]:
        """Evaluate ``customers`` into ``commit``; returns their changes to the sketch."""
        inputs = []
        for cid, blob, profile in customers:
            try:
                inputs.append(CustomerInput(cid, serial.decode(blob), profile))
            except Exception as exc:
                self._unreadable(p, cid, exc, stats)
        changes: dict[str, int] = {}
        for c, outcome in self.processor.score(inputs, ctx):
            if isinstance(outcome, Exception):
                continue
            self.note_held(p, c.customer_id, outcome.profile, ctx.now_ms)
            self.processor.add_outcome(commit, outcome, None)
            for fld, d in outcome.increments.get(RFM_HASH, {}).items():
                changes[fld] = changes.get(fld, 0) + d
        return {k: v for k, v in changes.items() if v}

    @staticmethod
    def _unreadable(p: int, cid: str, exc: Exception, stats: SweepStats) -> None:
        # As the ingest path's poison customer: the others of the chunk and of the
        # partition are swept all the same.
        stats.unreadable += 1
        log.warning("sweep of partition %d: customer %s passed over, its stored state "
                    "cannot be read: %r", p, cid_ref(cid), exc)

    async def retry_pause(self) -> None:
        """The wait before a chunk whose commit failed is tried again."""
        await asyncio.sleep(RETRY_S)

    async def _step(self, p: int, ids: list[str], stats: SweepStats) -> str:
        """One attempt at a chunk, under the lock: ``done`` (committed, or nothing to
        commit), ``conflict`` (another write moved the partition on) or ``failed``."""
        # A batch's commit may still be running in the background: load what it wrote
        # (and commit nothing past one that gave up).
        await self.processor.drain()
        self.processor.raise_if_failed()
        now, snaps = await self.store.load({p: ids}, self.processor.topics)
        # An idle worker's only loads may be its sweeps': a store that lost writes stops
        # it here as at a batch (nothing is committing in the background after the drain).
        self.processor.check_kept(snaps)
        snap = snaps[p]
        ctx = dataclasses.replace(self.runtime.context(now), settled_ms=settled_ms(
            snap.high_ts, self.processor.settings.lateness_ms))
        # Customers whose last evaluation used this context wait for the second round: only
        # those the population has ranked elsewhere since then are evaluated again.
        first: list[tuple[str, bytes, Profile]] = []
        second: list[tuple[str, bytes, Profile]] = []
        for cid, blob in snap.states.items():
            if blob is not None:
                try:
                    profile = Profile.from_bytes(snap.profiles.get(cid))
                except Exception as exc:
                    self._unreadable(p, cid, exc, stats)
                    continue
                keyed = bool(ctx.context_key) and profile.context == ctx.context_key
                (second if keyed else first).append((cid, blob, profile))
                self.note_held(p, cid, profile, ctx.now_ms)
        commit = PartitionCommit(p, snap.ver, {}, snap.now_ms)
        changes = self._evaluate(first, ctx, commit, p, stats)
        # Ranked as evaluating everyone together would rank them: with the first round's
        # changes to the sketch (the second round's own contributions are unchanged).
        pop = ctx.population.updated(changes)
        moved = [c for c in second if not is_current(c[2], ctx, pop)]
        if moved:
            self._evaluate(moved, dataclasses.replace(ctx, population=pop), commit, p,
                           stats)
        stats.customers += len(first) + len(moved)
        stats.skipped += len(second) - len(moved)
        if not (commit.profiles or commit.outbox or commit.increments):
            return "done"
        # As a batch does: the publish still running ends before this commit, so outbox
        # records go out in commit order.
        await self.processor.drain()
        try:
            ok = await self.store.commit([commit])
        except StoreUnavailable as exc:
            self.processor.mark_dirty([p])  # the commit may have been applied
            log.warning("sweep commit failed (%s)%s; retrying", exc, refusal_hint(exc))
            return "failed"
        if ok.get(p):
            stats.migrations += sum(1 for k in commit.outbox if k.startswith("m:"))
            if self.processor.background_publish:
                # Published while the next batch or step runs, not under the batch lock.
                self.processor.publish_later([p], {p: commit.outbox})
                stats.published_to.add(p)
            else:
                await self.processor.flush_outbox([p], {p: commit.outbox})
            return "done"
        stats.conflicts += 1
        return "conflict"
