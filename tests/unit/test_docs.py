"""The README and the performance page: every relative link reaches a file and, when it
names one, a heading of it; every result a page cites, by its path or (in the tables, under
a ``bench/results/20261205T…`` header) by its time alone, is one file of ``bench/results``."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = ("README.md", "docs/performance.md")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to
    hyphens."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    in_code = False
    out: set[str] = set()
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(slug(line))
    return frozenset(out)


def test_slug_follows_github() -> None:
    assert slug("### Redis' append-only file") == "redis-append-only-file"
    assert slug("## Figures of `b7f141d` (2026-12-05, before the step's value classes)") == (
        "figures-of-b7f141d-2026-12-05-before-the-steps-value-classes")


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page: str) -> None:
    source = ROOT / page
    broken = []
    for target in LINK.findall(source.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (source.parent / path).resolve() if path else source
        if not dest.exists() or (anchor and dest.suffix == ".md"
                                 and anchor not in anchors(dest)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES)
def test_cited_results_exist(page: str) -> None:
    cited = set(re.findall(r"bench/results/(\d{8}T\d{6}Z)", (ROOT / page).read_text()))
    assert cited, "the page cites no benchmark result"
    missing = sorted(c for c in cited if not (ROOT / "bench" / "results" / f"{c}.json").exists())
    assert missing == []


@pytest.mark.parametrize("page", PAGES)
def test_results_cited_by_time_are_one_file(page: str) -> None:
    stamps = set(re.findall(r"`(\d{6}Z)`", (ROOT / page).read_text()))
    assert stamps, "the page cites no result by its time"
    results = [p.name for p in (ROOT / "bench" / "results").glob("*.json")]
    unclear = {t: n for t in sorted(stamps)
               if (n := sum(name.endswith(f"T{t}.json") for name in results)) != 1}
    assert unclear == {}


def _documented_defaults() -> dict[str, str]:
    """``SEGSTREAM_X`` -> its default as the README's settings table writes it, for the rows
    that name each setting in full and give as many backticked defaults."""
    out: dict[str, str] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = line.split("|")
        if len(cells) < 4 or not cells[1].strip().startswith("`SEGSTREAM_"):
            continue
        names = re.findall(r"`(SEGSTREAM_[A-Z0-9_]+)`", cells[1])
        values = re.findall(r"`([^`]*)`", cells[2])
        if names and len(names) == len(values) and "," not in cells[2].replace("`, `", ""):
            out.update(zip(names, values, strict=True))
    return out


def test_settings_table_gives_each_default_as_the_code_has_it() -> None:
    from stream.settings import Settings, env_name

    documented = _documented_defaults()
    checked = []
    for name, f in Settings.model_fields.items():
        doc = documented.get(env_name(name))
        default = f.default
        if doc is None or isinstance(default, Path) or default is None:
            continue
        if isinstance(default, bool):
            assert doc == str(default).lower(), env_name(name)
        elif isinstance(default, int | float):
            assert float(doc) == float(default), (env_name(name), doc, default)
        elif hasattr(default, "get_secret_value"):
            continue
        else:
            assert doc == str(default), env_name(name)
        checked.append(name)
    # the table's numeric and boolean rows are all compared, not silently skipped
    assert {"kafka_fetch_max_wait_ms", "kafka_fetch_coalesce_ms", "batch_max",
            "batch_within_s", "gc_freeze", "sweep_max_share"} <= set(checked)
    assert len(checked) >= 25
