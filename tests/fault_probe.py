"""Test-only instrumentation injected into a worker process through ``sitecustomize``.

:func:`install` writes a ``sitecustomize.py`` into a directory and returns the
environment that puts it first on a worker's ``PYTHONPATH``. Python imports it at
start-up, before the worker, and it wraps engine functions without changing them:

* ``FAULT_PROBE_LOG=1``: every feature-store commit prints one line to the worker's log,
  ``FAULT-PROBE commit p0=ok p2=fenced``; ``fenced`` means the partition's version had
  moved on, so the script refused the write (the zombie fence of ``features/store.py``).
* ``FAULT_STALL_FLAG=<path>``: when that file exists, the next commit removes it, prints
  ``FAULT-PROBE stall ...`` and stops its own process with SIGSTOP after loading and
  scoring and before writing: a batch is in flight until someone sends SIGCONT.
* ``FAULT_POISON_CUSTOMER=<id>``: the scoring step (``stream.pipeline.evaluate``) raises
  whenever that customer is among its inputs (and prints ``FAULT-PROBE poison raised``).
"""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = '''
"""Fault-injection hooks of the segstream test suite (see tests/fault_probe.py)."""
import os
import signal
import sys


def _install():
    import features.store as store

    original = store.RedisFeatureStore.commit
    log = os.environ.get("FAULT_PROBE_LOG") == "1"
    flag = os.environ.get("FAULT_STALL_FLAG")

    async def commit(self, commits):
        if flag and os.path.exists(flag):
            os.unlink(flag)
            parts = ",".join(str(c.partition) for c in commits)
            print(f"FAULT-PROBE stall before commit partitions={parts}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
            print("FAULT-PROBE resumed", flush=True)
        ok = await original(self, commits)
        if log:
            cells = " ".join(f"p{c.partition}=" + ("ok" if ok.get(c.partition) else "fenced")
                             for c in commits)
            print(f"FAULT-PROBE commit {cells}", flush=True)
        return ok

    store.RedisFeatureStore.commit = commit

    poison = os.environ.get("FAULT_POISON_CUSTOMER")
    if poison:
        import stream.pipeline as pipeline

        evaluate = pipeline.evaluate

        def poisoned(inputs, ctx):
            if any(c.customer_id == poison for c in inputs):
                print(f"FAULT-PROBE poison raised for {poison}", flush=True)
                raise RuntimeError(f"injected scoring fault for customer {poison}")
            return evaluate(inputs, ctx)

        pipeline.evaluate = poisoned


try:
    _install()
except Exception as exc:  # never stop the interpreter; the test sees the missing lines
    print(f"FAULT-PROBE not installed: {exc!r}", file=sys.stderr, flush=True)
'''


def install(directory: Path, **flags: str) -> dict[str, str]:
    """Write the hooks into ``directory``; the env vars that activate them in a worker."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **flags}


def start_worker(dep: object, tmp: Path, **env: str) -> object:
    """``dep.start_worker`` with extra environment for this one worker only."""
    saved = dict(dep.env)  # type: ignore[attr-defined]
    dep.env.update(env)  # type: ignore[attr-defined]
    try:
        return dep.start_worker(tmp)  # type: ignore[attr-defined]
    finally:
        dep.env = saved  # type: ignore[attr-defined]


def lines(log: Path, marker: str = "FAULT-PROBE") -> list[str]:
    """The probe's lines in a worker log."""
    return [ln for ln in log.read_text(errors="replace").splitlines() if marker in ln]
