"""``segstream rules``: check a segment catalogue before deploying it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from scorers.rules import Catalogue, RulesError, default_catalogue, load_catalogue

rules_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="Segment schemes: validate and show a catalogue.")


@rules_app.callback()
def _rules() -> None:
    """Segment schemes: validate and show a catalogue."""


def _describe(cat: Catalogue, source: str) -> str:
    lines = [f"{source}: valid, version {cat.version}"]
    for name, scheme in cat.schemes.items():
        af = []
        if scheme.min_dwell_days:
            af.append(f"min dwell {scheme.min_dwell_days:g} days")
        if scheme.hysteresis:
            af.append("hysteresis " + ", ".join(f"{k} {v:g}" for k, v in scheme.hysteresis.items()))
        lines.append(f"\nscheme {name}" + (f" ({'; '.join(af)})" if af else ""))
        for i, seg in enumerate(scheme.segments, start=1):
            when = " ".join(seg.when.split())
            lines.append(f"  {i:>2}. {seg.name}: {when}")
        lines.append(f"      fallback: {scheme.fallback}")
    return "\n".join(lines)


@rules_app.command()
def validate(
    file: Annotated[
        Path | None,
        typer.Argument(help="Catalogue YAML file; the packaged default when omitted.",
                       dir_okay=False, show_default=False),
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Check a catalogue and list its schemes, segments and version; exit 1 when invalid."""
    source = str(file) if file is not None else "default catalogue"
    try:
        cat = load_catalogue(file) if file is not None else default_catalogue()
    except RulesError as e:
        if json_:
            doc = {"valid": False, "file": source, "errors": e.problems}
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        else:
            typer.echo(f"{source}: invalid", err=True)
            for problem in e.problems:
                typer.echo(f"  - {problem}", err=True)
        raise typer.Exit(1) from None
    if json_:
        doc = {"valid": True, "file": source, **cat.to_json()}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        typer.echo(_describe(cat, source))


__all__ = ["rules_app"]
