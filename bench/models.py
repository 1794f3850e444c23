"""Serving models for the benchmark's engine runs, so E scores with every model from its
first record.

A fresh deployment has no online models until delayed labels resolve and the learner
promotes a version (``SEGSTREAM_MODEL_PROMOTE_S``, or 3 s after its input stops), and no
CLV parameters until the first scheduled refit. Its evaluations then skip the churn,
propensity, persona and CLV scores, and are cheaper than a deployment's steady state:
``segstream bench`` measured 8,086 against 16,980 and 18,707 events/s on the same 60,000
events depending on whether a promotion happened during the run. With ``--models
serving`` (the default) the run's registry is seeded before E with versions trained on
synthetic customers (:func:`bench.profile_scoring.build`), exactly as a learner and a
refit would publish them; the workers load them at start and the learner resumes from
them. ``--models cold`` measures the fresh deployment instead.
"""

from __future__ import annotations

import orjson

from bench.profile_scoring import build
from stream.learner import checkpoint_key
from stream.redisconn import redis_sync_client
from stream.runtime import model_key, registry_keys
from stream.settings import Settings


def seed_serving_models(settings: Settings, customers: int = 1000, seed: int = 11
                        ) -> dict[str, int]:
    """Publish trained online models, personas and CLV parameters as version 1 of the
    settings' deployment; returns the versions written."""
    w = build(customers=customers, days=90, seed=seed, with_models=True)
    ctx = w.ctx
    prefix = settings.redis_prefix
    keys = registry_keys(prefix)
    blobs: dict[str, bytes] = {}
    for name, model in ctx.models.items():
        model.version = 1
        blobs[name] = model.snapshot()
    if ctx.personas is not None:
        ctx.personas.publish()
        blobs["cluster"] = ctx.personas.snapshot()
    assert ctx.clv is not None
    bg, gg = ctx.clv.bgnbd, ctx.clv.gamma_gamma
    clv_doc = {"customers": customers, "as_of": ctx.now_ms, "version": 1,
               "bgnbd": bg.to_json(),
               "gamma_gamma": {"p": gg.p, "q": gg.q, "v": gg.v} if gg else None}
    r = redis_sync_client(settings)
    try:
        pipe = r.pipeline(transaction=False)
        for name, blob in blobs.items():
            # The snapshot before the version that points at it, as the learner writes them.
            pipe.set(model_key(prefix, name), blob)
            pipe.set(checkpoint_key(prefix, name), blob)
        pipe.hset(keys["models"], mapping=dict.fromkeys(blobs, 1))
        pipe.hset(keys["model_seq"], mapping=dict.fromkeys(blobs, 1))
        pipe.set(keys["clv"], orjson.dumps(clv_doc))
        pipe.set(keys["clv_version"], 1)
        pipe.execute()
    finally:
        r.close()
    return {**dict.fromkeys(blobs, 1), "clv": 1}
