"""Compiled hot-path modules: loaded only when built from the current source, same results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream import native

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SEGSTREAM_NATIVE")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, text=True,
                          capture_output=True, timeout=300)


WHERE = ("import features.serial as m, sys; "
         "print(m.__spec__.origin, m.decode.__module__, 'serial' in sys.modules, m.__file__)")


@pytest.fixture(scope="module")
def one_module_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("native")
    states = native.build(directory, modules=["features.serial"], jobs=1)
    by_module = {s.module: s for s in states}
    assert by_module["features.serial"].compiled is not None
    assert by_module["features.state"].reason == "not built"
    return directory


def test_a_build_is_loaded_only_while_its_source_is_unchanged(one_module_build: Path) -> None:
    d = str(one_module_build)
    out = _python(WHERE, SEGSTREAM_NATIVE_DIR=d)
    assert out.returncode == 0, out.stderr
    file, module_name, stray, source = out.stdout.split()
    assert file.startswith(d) and file.endswith(native._abi())
    # named after its package, not registered as a top-level module of its own
    assert module_name == "features.serial" and stray == "False"
    # __file__ names the source it was built from (pytest's doctests and inspect read it)
    assert source == str(ROOT / "features" / "serial.py")

    out = _python(WHERE, SEGSTREAM_NATIVE_DIR=d, SEGSTREAM_NATIVE="0")
    assert out.stdout.split()[0] == str(ROOT / "features" / "serial.py")

    manifest = one_module_build / native.MANIFEST
    doc = json.loads(manifest.read_text())
    real = doc["modules"]["features.serial"]["source_sha256"]
    doc["modules"]["features.serial"]["source_sha256"] = "0" * 64  # as after an edit
    manifest.write_text(json.dumps(doc))
    try:
        reasons = {s.module: s.reason for s in native.status(one_module_build)}
        assert reasons["features.serial"] == "source changed since the build"
        out = _python(WHERE, SEGSTREAM_NATIVE_DIR=d)
        assert out.stdout.split()[0] == str(ROOT / "features" / "serial.py")
    finally:
        doc["modules"]["features.serial"]["source_sha256"] = real
        manifest.write_text(json.dumps(doc))


def test_a_build_for_other_directives_is_not_loaded(one_module_build: Path) -> None:
    manifest = one_module_build / native.MANIFEST
    original = manifest.read_text()
    doc = json.loads(original)
    doc["directives"] = {**doc["directives"], "annotation_typing": True}
    manifest.write_text(json.dumps(doc))
    try:
        assert all(s.compiled is None for s in native.status(one_module_build))
    finally:
        manifest.write_text(original)


def _compiled(directory: Path, module: str) -> Path:
    path = {s.module: s.compiled for s in native.status(directory)}[module]
    assert path is not None
    return path


def test_a_rebuild_writes_new_files_and_keeps_unchanged_modules(one_module_build: Path,
                                                                 ) -> None:
    so = _compiled(one_module_build, "features.serial")
    # named after the hash of the source it was built from
    assert native._digest(ROOT / "features" / "serial.py")[:16] in so.name
    before = so.stat().st_ino
    native.build(one_module_build, modules=["features.serial"], jobs=1)
    assert so.stat().st_ino == before  # unchanged source: nothing compiled again
    manifest = one_module_build / native.MANIFEST
    doc = json.loads(manifest.read_text())
    doc["modules"]["features.serial"]["source_sha256"] = "0" * 64
    manifest.write_text(json.dumps(doc))
    states = {s.module: s for s in native.build(one_module_build, modules=["features.serial"],
                                                jobs=1)}
    assert states["features.serial"].compiled == so
    # A new file, not the old one rewritten: a process that has it loaded keeps its copy.
    assert so.stat().st_ino != before
    assert not list(one_module_build.glob(".*.tmp"))


def test_clean_removes_a_build_and_nothing_else(tmp_path: Path, one_module_build: Path
                                                ) -> None:
    other = tmp_path / "not-a-build"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        native.clean(other)
    assert (other / "keep.txt").exists()
    copy = tmp_path / "build"
    copy.mkdir()
    for f in one_module_build.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "notes.txt").write_text("mine")
    assert native.clean(copy) == 2  # the compiled module and the manifest
    assert sorted(p.name for p in copy.iterdir()) == ["notes.txt"]


def test_a_wrong_switch_fails_at_start_naming_it() -> None:
    out = _python("import stream", SEGSTREAM_NATIVE="sometimes")
    assert out.returncode != 0
    assert "SEGSTREAM_NATIVE" in out.stderr and "sometimes" in out.stderr


PIPELINE = """
import asyncio, json
from bench import profile_pipeline as pp
from stream import native
r = asyncio.run(pp.run(4_000, 400, seed=3, warm=0))
live = asyncio.run(pp.run(2_000, 300, seed=4, live=3_000, warm=0))
print(json.dumps({"digest": r.digest, "migrations": r.migrations, "live": live.digest,
                  "live_migrations": live.migrations, "loaded": native.loaded()}))
"""


def test_the_compiled_modules_compute_exactly_what_their_source_does() -> None:
    stale = [f"{s.module}: {s.reason}" for s in native.status() if s.compiled is None]
    assert not stale, f"run `segstream native build` first ({'; '.join(stale)})"
    runs = {}
    for switch in ("1", "0"):
        out = _python(PIPELINE, SEGSTREAM_NATIVE=switch)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[switch] = json.loads(out.stdout.strip().splitlines()[-1])
    compiled, source = runs["1"], runs["0"]
    assert compiled["loaded"] and all(compiled["loaded"].values())
    assert not any(source["loaded"].values())
    assert compiled["migrations"] > 0 and compiled["live_migrations"] > 0
    for key in ("digest", "migrations", "live", "live_migrations"):
        assert compiled[key] == source[key], key

