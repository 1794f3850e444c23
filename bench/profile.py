"""Summaries of a py-spy speedscope profile: where the engine worker spends its CPU.

>>> doc = {"shared": {"frames": [{"name": "run", "file": "a.py", "line": 1},
...                              {"name": "decode", "file": "b.py", "line": 7},
...                              {"name": "decode", "file": "b.py", "line": 9}]},
...        "profiles": [{"type": "sampled", "samples": [[0, 1], [0, 2], [0]],
...                      "weights": [1, 1, 1]}]}
>>> [(f["function"], f["self_pct"], f["total_pct"]) for f in top_functions(doc, 2)]
[('decode', 66.7, 66.7), ('run', 33.3, 100.0)]
>>> [f["function"] for f in top_functions(doc, 1, by="total")]
['run']
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


def top_functions(doc: dict[str, Any], n: int = 10, by: str = "self",
                  under: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The ``n`` functions with the most own (``by="self"``) or total samples.

    ``under`` keeps only functions whose shortened file path starts with one of these.
    """
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
    ranked = (own if by == "self" else total).most_common()
    out = []
    for name, file in (k for k, _ in ranked):
        short = _short(file)
        if under and not short.startswith(under):
            continue
        out.append({"function": name, "file": short,
                    "self_pct": round(100 * own[(name, file)] / weight_sum, 1),
                    "total_pct": round(100 * total[(name, file)] / weight_sum, 1)})
        if len(out) >= n:
            break
    return out


def summarise(path: Path, n: int = 10) -> dict[str, list[dict[str, Any]]]:
    """Of a speedscope file written by ``py-spy record``: the top functions by own time,
    and the project's own functions (``stream/``, ``features/``, ``scorers/``) by total."""
    doc = orjson.loads(path.read_bytes())
    project = top_functions(doc, n + 2, by="total", under=("stream/", "features/", "scorers/"))
    # The command-line entry frames hold the whole main thread and say nothing.
    project = [f for f in project if f["file"] != "stream/cli.py"][:n]
    return {"top_self": top_functions(doc, n), "project_top_total": project}
