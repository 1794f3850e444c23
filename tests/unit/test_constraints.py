"""constraints.txt pins every dependency the project declares, inside its declared range,
and the set-up installed exactly those versions."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, ver = line.partition("==")
        assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        assert _norm(name) not in pins, f"constraints.txt pins {name} twice"
        pins[_norm(name)] = Version(ver)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return [Requirement(r) for r in reqs]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    for req in _declared():
        pin = pins.get(_norm(req.name))
        assert pin is not None, f"{req.name} is declared in pyproject.toml, not in constraints.txt"
        assert req.specifier.contains(pin, prereleases=True), (
            f"constraints.txt pins {req.name}=={pin}, outside pyproject.toml's {req.specifier}")


def test_the_project_itself_is_not_pinned() -> None:
    assert "segstream" not in _pins()


def test_the_installed_dependencies_are_the_pinned_versions() -> None:
    pins = _pins()
    for req in _declared():
        try:
            installed = Version(version(req.name))
        except PackageNotFoundError:
            continue  # an extra this environment did not install
        assert installed == pins[_norm(req.name)], (
            f"{req.name} {installed} is installed, constraints.txt pins "
            f"{pins[_norm(req.name)]}: run scripts/setup")
