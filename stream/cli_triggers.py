"""``segstream triggers``: run the reference trigger consumer until Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from dataclasses import asdict

import typer
from rich.console import Console
from rich.markup import escape

from stream import redact
from stream.errors import SegstreamError, SettingsError
from stream.settings import load_settings

err = Console(stderr=True)


def triggers(
    webhook: str = typer.Option(..., "--webhook", help="URL that receives one POST per action."),
    group: str | None = typer.Option(
        None, "--group", help="Consumer group (default: <SEGSTREAM_APP_ID>-triggers)."
    ),
    max_attempts: int = typer.Option(
        10, "--max-attempts", min=1,
        help="Attempts per migration before giving up (exit 1; invalid options exit 2)."
    ),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds per request."),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", min=1, max=65535,
        help="Serve Prometheus metrics at GET /metrics on SEGSTREAM_WEB_HOST and this port."
    ),
    json_: bool = typer.Option(
        False, "--json", help="Print the run's counts as one JSON document."
    ),
) -> None:
    """POST every actionable, non-hold-out segment migration to a webhook (at least once)."""
    from stream.triggers import TriggerOptionError, run_triggers

    try:
        s = load_settings()
    except SegstreamError as exc:
        err.print(f"[red]{escape(str(exc))}")
        raise typer.Exit(2) from None
    redact.install_from_settings(s)
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> dict[str, int]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stats = await run_triggers(
            s, webhook, group=group, max_attempts=max_attempts, stop=stop,
            request_timeout_s=timeout, metrics_port=metrics_port,
        )
        return asdict(stats)

    try:
        counts = asyncio.run(run())
    except (TriggerOptionError, SettingsError) as exc:  # wrong input: as a usage error
        err.print(f"[red]{escape(str(exc))}")
        raise typer.Exit(2) from None
    except SegstreamError as exc:  # a service failed, or delivery gave up
        err.print(f"[red]{escape(str(exc))}")
        raise typer.Exit(1) from None
    if json_:
        sys.stdout.write(json.dumps(counts) + "\n")
    else:
        err.print(", ".join(f"{k} {v}" for k, v in counts.items()))
