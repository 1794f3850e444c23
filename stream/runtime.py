"""The worker's view of shared scoring state: population sketch, models, CLV, rules.

Everything here is read from Redis (or the rules files) and cached for a short
while, so a micro-batch costs no extra round trip most of the time. Any worker
(and any restart) sees the same shared state: models and CLV parameters are
versioned in Redis, so a restarted worker scores with the version it had.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from features.store import RedisFeatureStore, StoreUnavailable
from scorers import clv, rfm
from scorers.scoring import RFM_HASH, ClvModel, ScoringContext
from stream.errors import SettingsError
from stream.redisconn import mget_any
from stream.settings import Settings

log = logging.getLogger(__name__)

RULES_CHECK_S = 5.0
MODELS_CHECK_S = 2.0


def registry_keys(prefix: str) -> dict[str, str]:
    """Names of the deployment-wide registry keys."""
    return {
        "models": f"{prefix}models",
        "model_seq": f"{prefix}models:seq",
        "clv": f"{prefix}clv:params",
        "clv_version": f"{prefix}clv:version",
        "rules": f"{prefix}rules:version",
        "context": f"{prefix}context",
        "learner": f"{prefix}learner",
    }


def restore_model(name: str, blob: bytes) -> Any:
    """A model from its snapshot bytes: the personas for ``cluster``, else an online model."""
    if name == "cluster":
        from scorers.personas import PersonaModel

        return PersonaModel.restore(blob)
    from scorers.online import OnlineModel

    return OnlineModel.restore(blob)


def registry_versions(raw: Mapping[Any, Any], unreadable: set[Any] | None = None
                      ) -> dict[str, int]:
    """The models registry's ``{name: version}``; an entry that is not a whole number is
    skipped (logged once per name and value when ``unreadable`` is given).

    >>> registry_versions({b"churn": b"3", b"cluster": b"v-x"})
    {'churn': 3}
    """
    out: dict[str, int] = {}
    for k, v in raw.items():
        name = k.decode() if isinstance(k, bytes) else str(k)
        try:
            out[name] = int(v)
        except (TypeError, ValueError):
            if unreadable is not None and (name, v) not in unreadable:
                unreadable.add((name, v))
                log.error("models registry entry %s is not a version number (%r); skipped",
                          name, v[:40] if isinstance(v, bytes | str) else v)
    return out


def model_key(prefix: str, name: str) -> str:
    return f"{prefix}model:{name}"


def load_segment_catalogue(settings: Settings) -> Any:
    """The segment catalogue the settings point at (or the default one)."""
    from scorers import rules

    try:
        return (rules.load_catalogue(settings.rules_path) if settings.rules_path
                else rules.default_catalogue())
    except rules.RulesError as exc:
        raise SettingsError(f"SEGSTREAM_RULES_PATH: {exc}") from None


def load_rules(settings: Settings) -> tuple[Any, Any]:
    """The segment catalogue and action catalogue the settings point at (or the defaults)."""
    from scorers import nba

    cat = load_segment_catalogue(settings)
    schemes = {name: list(s.segment_names) for name, s in cat.schemes.items()}
    try:
        acts = (nba.load_actions(settings.actions_path, schemes) if settings.actions_path
                else _default_actions_for(schemes))
    except Exception as exc:
        raise SettingsError(f"SEGSTREAM_ACTIONS_PATH: {exc}") from None
    return cat, acts


def _default_actions_for(schemes: dict[str, list[str]]) -> Any:
    """The packaged actions, keeping only rules whose scheme and segments exist.

    With custom rules and no action file the defaults still apply where they fit; an
    action file given explicitly is validated strictly instead.
    """
    import importlib.resources

    import yaml

    from scorers import nba

    doc = yaml.safe_load(importlib.resources.files("scorers").joinpath("actions.yaml")
                         .read_text("utf-8"))

    def fits(rule: dict[str, Any]) -> bool:
        known = schemes.get(rule.get("scheme", ""))
        if known is None or rule.get("to") not in known:
            return False
        frm = rule.get("from")
        frm = [frm] if isinstance(frm, str) else (frm or [])
        return all(f is None or f in known for f in frm)

    doc["rules"] = [r for r in doc.get("rules", []) if fits(r)]
    return nba.load_actions(yaml.safe_dump(doc), schemes)


def _mtime(p: Path | None) -> float:
    try:
        return p.stat().st_mtime if p else 0.0
    except OSError:
        return 0.0


class ScoringRuntime:
    """Caches the shared scoring state and builds a :class:`ScoringContext` per batch."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, store: RedisFeatureStore,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.r = redis
        self.store = store
        self.clock = clock
        self.keys = registry_keys(settings.redis_prefix)
        self.catalogue, self.actions = load_rules(settings)
        self._rules_mtime = (_mtime(settings.rules_path), _mtime(settings.actions_path))
        self._rules_checked = clock()
        #: called with the catalogue's and the actions file's versions once they are
        #: loaded again, and with no argument when an edit of them is refused
        self.on_rules: Callable[[str, str], None] | None = None
        self.on_rules_refused: Callable[[], None] | None = None
        self.population = rfm.Population.empty()
        #: the sketch per partition, and when each partition's part was last read
        self._sketch = rfm.SketchParts()
        self._sketch_read_at: dict[int, float] = {}
        self.models: dict[str, Any] = {}
        self.personas: Any | None = None
        self.versions: dict[str, int] = {}
        #: (model, version) pairs whose snapshot could not be read, and registry entries
        #: that are not versions: each logged once, not tried again
        self._unreadable: set[Any] = set()
        self._models_at = 0.0
        self.clv: ClvModel | None = None
        self.published_rules = False
        #: this process' part of every context key: a profile evaluated by another process
        #: (another worker, or this one before a restart, perhaps with other settings or
        #: code) is never taken as current
        self.instance = os.urandom(8).hex()

    # -- refreshing --------------------------------------------------------------------
    async def refresh(self, force: bool = False) -> None:
        """Re-read whatever is due; one pipelined round trip at most."""
        t = self.clock()
        await self._maybe_reload_rules(t)
        parts = range(self.settings.partitions)
        every = self.settings.population_refresh_s
        # An empty cached sketch is read again at every batch: against it a purchaser whose
        # RFM fields did not change in this batch (a click, a sweep) got no scores at all
        # and fell to the never-bought fallback (Prospects) until the next re-read.
        if force or self.population.total <= 0 or len(self._sketch) < len(parts):
            due = list(parts)
        else:
            # Each partition's part is re-read once it is ``every`` seconds old; the parts
            # come due at different times (see below), so a batch reads one or two of them
            # instead of one batch a second reading (and parsing) them all.
            read_at = self._sketch_read_at
            due = [p for p in parts if t - read_at.get(p, 0.0) >= every]
        want_models = force or t - self._models_at >= MODELS_CHECK_S
        if not (due or want_models or not self.published_rules):
            return
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for p in due:
                    pipe.hgetall(self.store.keys.table(p, RFM_HASH))
                if want_models:
                    pipe.hgetall(self.keys["models"])
                    pipe.get(self.keys["clv"])
                if not self.published_rules:
                    pipe.set(self.keys["rules"],
                             f"{self.catalogue.version}/{self.actions.version}")
                res = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"redis read failed: {exc}") from None
        self.store.roundtrips += 1
        self.published_rules = True
        i = len(due)
        if due:
            for p, hist in zip(due, res[:i], strict=True):
                self._sketch.replace(p, hist or {})
            self.population = self._sketch.population()
            if len(due) == len(parts):
                # Read all at once: spread their next reads evenly over the interval.
                for k, p in enumerate(parts):
                    self._sketch_read_at[p] = t - every * k / len(parts)
            else:
                for p in due:
                    self._sketch_read_at[p] = t
        if want_models:
            self._models_at = t
            versions = registry_versions(res[i] or {}, self._unreadable)
            await self._load_models(versions)
            self._set_clv(res[i + 1])

    async def _maybe_reload_rules(self, t: float) -> None:
        if t - self._rules_checked < RULES_CHECK_S:
            return
        self._rules_checked = t
        stamp = (_mtime(self.settings.rules_path), _mtime(self.settings.actions_path))
        if stamp == self._rules_mtime:
            return
        self._rules_mtime = stamp
        try:
            # Parsing and compiling a large rules file takes a while (pure-Python YAML):
            # in a thread, the loop's other tasks (web, timers, producer) go on meanwhile.
            cat, acts = await asyncio.to_thread(load_rules, self.settings)
        except SettingsError as exc:
            log.error("rules not reloaded, keeping version %s: %s", self.catalogue.version, exc)
            if self.on_rules_refused is not None:
                self.on_rules_refused()
            return
        if cat.version != self.catalogue.version or acts.version != self.actions.version:
            log.info("rules reloaded: catalogue %s -> %s, actions %s -> %s",
                     self.catalogue.version, cat.version, self.actions.version, acts.version)
            self.catalogue, self.actions = cat, acts
            self.published_rules = False
            if self.on_rules is not None:
                self.on_rules(str(cat.version), str(acts.version))

    async def _load_models(self, versions: dict[str, int]) -> None:
        if not self.settings.models_enabled:
            return
        # A version that could not be read is not tried again (it was logged once); the
        # model serves its previous version until the learner publishes a newer one.
        changed = [n for n, v in versions.items()
                   if self.versions.get(n) != v and (n, v) not in self._unreadable]
        if not changed:
            return

        try:
            blobs = await mget_any(self.r, [model_key(self.settings.redis_prefix, n)
                                            for n in changed])
        except RedisError as exc:
            # As the read in refresh(): the caller's batch retries it with backoff. A raw
            # RedisError would crash the ingest agent and lose the batch in flight.
            raise StoreUnavailable(f"redis read failed: {exc}") from None
        for name, blob in zip(changed, blobs, strict=True):
            if blob is None:
                continue
            try:
                model = restore_model(name, blob)
                if name == "cluster":
                    self.personas = model
                else:
                    self.models[name] = model
                self.versions[name] = versions[name]
            except Exception as exc:
                self._unreadable.add((name, versions[name]))
                log.error("model %s version %s cannot be read (%s); serving version %s until "
                          "a newer one is published", name, versions[name], type(exc).__name__,
                          self.versions.get(name, "none"))

    def _set_clv(self, raw: bytes | None) -> None:
        if not raw:
            return
        doc = orjson.loads(raw)
        if self.clv is not None and self.clv.version == doc.get("version"):
            return
        bg = doc["bgnbd"]
        gg = doc.get("gamma_gamma")
        self.clv = ClvModel(
            clv.BgNbdParams(bg["r"], bg["alpha"], bg["a"], bg["b"]),
            clv.GammaGammaParams(gg["p"], gg["q"], gg["v"]) if gg else None,
            int(doc.get("version", 0)),
        )

    # -- contexts ----------------------------------------------------------------------
    def context(self, now_ms: int) -> ScoringContext:
        s = self.settings
        return ScoringContext(
            now_ms=now_ms,
            wall_ms=int(self.clock() * 1000),
            lateness_ms=s.lateness_ms,
            population=self.population,
            catalogue=self.catalogue,
            actions=self.actions,
            clv=self.clv,
            models=dict(self.models),
            personas=self.personas,
            label_options={
                "min_gap_days": s.observation_gap_days,
                "churn_horizon_clicks_ms": int(s.churn_horizon_days * 86_400_000),
                "churn_horizon_transactions_ms": int(s.churn_horizon_txn_days * 86_400_000),
            } if s.models_enabled else None,
            context_key=context_key(self.instance, self.catalogue, self.actions,
                                    self.versions, self.clv),
        )

    def digest(self, now_ms: int) -> str:
        """Identifies every input of an evaluation except the customer's own state."""
        parts = [
            str(now_ms // 86_400_000),
            self.population.digest,
            self.catalogue.version,
            self.actions.version,
            repr(sorted(self.versions.items())),
            str(self.clv.version if self.clv else 0),
        ]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def context_key(instance: str, catalogue: Any, actions: Any,
                versions: dict[str, int], clv_model: ClvModel | None) -> str:
    """``ScoringContext.context_key``: the process, rules, actions and models."""
    parts = [
        instance,
        catalogue.version if catalogue is not None else "",
        actions.version if actions is not None else "",
        repr(sorted(versions.items())),
        str(clv_model.version if clv_model else 0),
    ]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


class StaticScoring:
    """An in-memory twin of :class:`ScoringRuntime`: fixed rules and models, live sketch.

    The population sketch is re-read from the store (any :class:`FeatureStore`) before
    every batch, so unit tests see exactly what a worker would.
    """

    def __init__(self, settings: Settings, store: Any, catalogue: Any, actions: Any = None,
                 models: dict[str, Any] | None = None, clv_model: ClvModel | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.catalogue = catalogue
        self.actions = actions
        self.models = models or {}
        self.clv = clv_model
        self.clock = clock
        self.population = rfm.Population.empty()
        self.instance = os.urandom(8).hex()

    async def refresh(self, force: bool = False) -> None:
        tables = await self.store.read_tables(RFM_HASH, range(self.settings.partitions))
        self.population = rfm.Population.from_hashes(tables.values())

    def digest(self, now_ms: int) -> str:
        return f"{now_ms // 86_400_000}|{self.population.digest}"

    def context(self, now_ms: int) -> ScoringContext:
        s = self.settings
        return ScoringContext(
            now_ms=now_ms, wall_ms=int(self.clock() * 1000), lateness_ms=s.lateness_ms,
            population=self.population, catalogue=self.catalogue, actions=self.actions,
            clv=self.clv, models=dict(self.models),
            label_options={"min_gap_days": s.observation_gap_days} if self.models else None,
            context_key=context_key(
                self.instance, self.catalogue, self.actions,
                {n: m.version for n, m in self.models.items()}, self.clv),
        )
