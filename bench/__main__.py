"""``python -m bench``: the ``segstream bench`` command on its own."""

from __future__ import annotations

import typer

from stream.cli_bench import bench


def main() -> None:
    typer.run(bench)


if __name__ == "__main__":
    main()
