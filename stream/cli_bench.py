"""``segstream bench``: the engine's throughput, latency and costs against its limits.

The main CLI registers :func:`bench` as a command; the work is done by :mod:`bench.run`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"


def bench(
    events: Annotated[int, typer.Option(min=1, help="Input events to produce")] = 1_000_000,
    customers: Annotated[int, typer.Option(min=1, help="Customers they belong to")] = 100_000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the synthetic generator")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    skip_latency: Annotated[bool, typer.Option(help="Skip the latency measurements")] = False,
    workers: Annotated[int, typer.Option(
        min=1, help="Also run E with this many workers and report the scaling vs 1")] = 1,
    profile: Annotated[bool, typer.Option(
        help="Record the E worker with py-spy (speedscope file in bench/results)")] = False,
    latency_seconds: Annotated[float, typer.Option(
        min=1, max=3600, help="Seconds of offered load per latency measurement")] = 15.0,
    latency_eps: Annotated[float, typer.Option(
        min=1, max=1_000_000, help="The fixed offered load of the headline latency")] = 5_000.0,
    results_dir: Annotated[Path, typer.Option(help="Where the JSON results go")] = RESULTS_DIR,
    models: Annotated[str, typer.Option(
        help="serving: E starts with trained online models, personas and CLV parameters "
             "in the registry (a deployment's steady state); cold: a fresh deployment, "
             "whose first evaluations skip those scores")] = "serving",
    live_event_time: Annotated[str, typer.Option(
        help="wall: the live events' event times advance with the wall clock, as real "
             "traffic's do; synthetic: they keep the generator's pace (days of event time "
             "per second, so day boundaries, label horizons and dwell times pass during "
             "the measurement)")] = "wall",
) -> None:
    """Measure the engine (E) against a bare consumer (L) and a Faust floor (F).

    Produces the synthetic input once into a fresh isolated deployment on the
    configured Kafka and Redis, measures L, F and E throughput, latency at a fixed
    offered load and at 80% of E, Redis round trips and bytes, worker RSS and CPU, then
    deletes everything it created. The JSON result is always written to results-dir.
    """
    from bench.report import table
    from bench.run import Options, run

    err = Console(stderr=True)
    if models not in ("serving", "cold"):
        raise typer.BadParameter("must be serving or cold", param_hint="--models")
    if live_event_time not in ("wall", "synthetic"):
        raise typer.BadParameter("must be wall or synthetic", param_hint="--live-event-time")
    _results_dir(results_dir)
    doc = run(Options(events=events, customers=customers, seed=seed, skip_latency=skip_latency,
                      workers=workers, profile=profile, latency_seconds=latency_seconds,
                      latency_eps=latency_eps, results_dir=results_dir, models=models,
                      live_event_time=live_event_time),
              console=err)
    if json_:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        Console().print(table(doc))


def _results_dir(path: Path) -> None:
    """Create the results directory, or fail naming ``--results-dir``, before the run: the
    result is written at its end, after minutes of measurements."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a directory",
                                 param_hint="--results-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way to it, or no permission
        raise typer.BadParameter(f"cannot create the directory {path}: {exc.strerror or exc}",
                                 param_hint="--results-dir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"the directory {path} is not writable",
                                 param_hint="--results-dir")
