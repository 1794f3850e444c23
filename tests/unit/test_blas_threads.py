"""The engine's processes run numpy's and scipy's BLAS on one thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import stream

PROBE = """
import json, stream, numpy, scipy.linalg, threadpoolctl
print(json.dumps([(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()
                  if i["user_api"] == "blas"]))
"""


def _blas_threads(env: dict[str, str]) -> list[tuple[str, int]]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return [tuple(x) for x in json.loads(out.stdout)]


def _env_without_limits() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in stream.BLAS_THREAD_VARIABLES}


def test_importing_stream_first_limits_blas_to_one_thread() -> None:
    pools = _blas_threads(_env_without_limits())
    assert pools, "numpy and scipy load a BLAS"
    assert all(n == 1 for _, n in pools), pools


def test_a_limit_the_user_set_is_kept() -> None:
    pools = _blas_threads({**_env_without_limits(), "OPENBLAS_NUM_THREADS": "2"})
    assert pools and all(n == 2 for _, n in pools), pools
