"""Summaries of a py-spy speedscope profile: where the engine worker spends its CPU.

>>> doc = {"shared": {"frames": [{"name": "run", "file": "a.py", "line": 1},
...                              {"name": "decode", "file": "b.py", "line": 7},
...                              {"name": "decode", "file": "b.py", "line": 9}]},
...        "profiles": [{"type": "sampled", "samples": [[0, 1], [0, 2], [0]],
...                      "weights": [1, 1, 1]}]}
>>> [(f["function"], f["self_pct"], f["total_pct"]) for f in top_functions(doc, 2)]
[('decode', 66.7, 66.7), ('run', 33.3, 100.0)]
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson

ROOT = str(Path(__file__).resolve().parent.parent) + "/"


def _short(path: str) -> str:
    if path.startswith(ROOT):
        return path[len(ROOT):]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1].lstrip(".0123456789/")
    return path


def top_functions(doc: dict[str, Any], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` functions with the most own (self) samples, over every thread."""
    frames = doc["shared"]["frames"]
    keys = [(f.get("name", "?"), f.get("file", "")) for f in frames]
    own: Counter[tuple[str, str]] = Counter()
    total: Counter[tuple[str, str]] = Counter()
    weight_sum = 0.0
    for prof in doc.get("profiles", []):
        weights = prof.get("weights") or [1] * len(prof.get("samples", []))
        for stack, w in zip(prof.get("samples", []), weights, strict=False):
            if not stack:
                continue
            weight_sum += w
            own[keys[stack[-1]]] += w
            for k in {keys[i] for i in stack}:
                total[k] += w
    if not weight_sum:
        return []
    return [
        {"function": name, "file": _short(file),
         "self_pct": round(100 * w / weight_sum, 1),
         "total_pct": round(100 * total[(name, file)] / weight_sum, 1)}
        for (name, file), w in own.most_common(n)
    ]


def summarise(path: Path, n: int = 10) -> list[dict[str, Any]]:
    """Top functions by own time of a speedscope file written by ``py-spy record``."""
    return top_functions(orjson.loads(path.read_bytes()), n)
