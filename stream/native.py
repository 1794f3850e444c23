"""Compiled builds of the hot-path modules, used only while they match their source.

The micro-batch step is plain Python spread over a dozen modules (feature transitions, label
and segment rules, scoring, decoding). Compiled with Cython as they are (no annotations are
used for typing, so the semantics are the interpreter's), they take about a fifth less CPU.
``segstream native build`` compiles them into ``build/native/`` beside the packages,
with a manifest of each source's SHA-256; :func:`install` (run by each package's
``__init__``) adds an import finder that loads a compiled module only when its source still
has that hash (checked once, when the process first imports a package), so an edited module
runs from its source in every process started after the edit. ``SEGSTREAM_NATIVE=0``
turns the compiled modules off (for cProfile, whose view they hide, or to compare).

Run ``segstream native status`` to see which modules a process would load compiled.

Compiled code does not count Python's recursion limit: deep recursion on input must be bounded
by the code itself (the condition parser bounds nesting and arithmetic chains), since a
compiled module would not raise ``RecursionError`` but overflow the C stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: The modules compiled, in the order the micro-batch step meets them.
MODULES = (
    "stream.schemas",
    "stream.pipeline",
    "features.events",
    "features.serial",
    "features.state",
    "scorers.profile",
    "scorers.labels",
    "scorers.rfm",
    "scorers.clv",
    "scorers.personas",
    "scorers.online",
    "scorers.conditions",
    "scorers.rules",
    "scorers.nba",
    "scorers.scoring",
)
#: Where the packages live: the directory holding ``stream/``, ``features/``, ``scorers/``.
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "build" / "native"
MANIFEST = "manifest.json"
#: Cython directives: the language of the sources, annotations left as documentation, and
#: no second copy of each docstring for doctest (the functions keep theirs).
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True,
              "autotestdict": False}
ENV_SWITCH = "SEGSTREAM_NATIVE"
ENV_DIR = "SEGSTREAM_NATIVE_DIR"


def _source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def native_dir() -> Path:
    """Where the compiled modules are (absolute: a later ``chdir`` does not move it)."""
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR).absolute()


def enabled() -> bool:
    """Whether compiled modules may be loaded (``SEGSTREAM_NATIVE``, default on)."""
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_SWITCH}={value!r}: expected 1 or 0")


def _abi() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[0]


@dataclass(frozen=True)
class ModuleState:
    """Whether one module would be imported compiled, and why not."""

    module: str
    compiled: Path | None
    reason: str


def status(directory: Path | None = None) -> list[ModuleState]:
    """Per module of :data:`MODULES`: the compiled file that matches its source, or why none."""
    directory = directory or native_dir()
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        return [ModuleState(m, None, "not built") for m in MODULES]
    entries = manifest.get("modules")
    entries = entries if isinstance(entries, dict) else {}
    out = []
    for module in MODULES:
        entry = entries.get(module)
        if manifest.get("abi") != _abi() or manifest.get("directives") != DIRECTIVES:
            out.append(ModuleState(module, None, "built for another interpreter "
                                   "or with other directives"))
            continue
        if not isinstance(entry, dict):
            out.append(ModuleState(module, None, "not built"))
            continue
        path = directory / str(entry.get("file", ""))
        source = _source(module)
        if not path.is_file():
            out.append(ModuleState(module, None, "compiled file missing"))
        elif not source.is_file() or _digest(source) != entry.get("source_sha256"):
            out.append(ModuleState(module, None, "source changed since the build"))
        else:
            out.append(ModuleState(module, path, "compiled"))
    return out


class _CompiledLoader(importlib.machinery.ExtensionFileLoader):
    """Loads a compiled module; its ``__file__`` names the source it was built from.

    The spec's origin keeps the compiled file. ``__file__`` is what pytest's doctest
    collection, ``inspect.getsource`` and tracebacks look for: the source, unchanged since.
    """

    def __init__(self, fullname: str, path: str, source: str) -> None:
        super().__init__(fullname, path)
        self.source = source

    def exec_module(self, module: ModuleType) -> None:
        super().exec_module(module)
        module.__file__ = self.source


class _Finder(importlib.abc.MetaPathFinder):
    """Loads the compiled twin of a module when it was built from the current source."""

    def __init__(self, compiled: dict[str, Path]) -> None:
        self.compiled = compiled

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        file = self.compiled.get(fullname)
        if file is None or not file.is_file():  # e.g. removed since the process started
            return None
        loader = _CompiledLoader(fullname, str(file), str(_source(fullname)))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def install() -> dict[str, Path]:
    """Add the finder of compiled modules (once per process); returns what it will load."""
    for finder in sys.meta_path:
        if isinstance(finder, _Finder):
            return finder.compiled
    compiled: dict[str, Path] = {}
    try:
        on = enabled()
    except ValueError as exc:  # at import: exit with the message, not a traceback
        # as the CLI reports a setting error: "error: ...", exit status 2
        sys.stderr.write(f"error: invalid setting: {exc}\n")
        raise SystemExit(2) from None
    if on:
        compiled = {s.module: s.compiled for s in status() if s.compiled is not None}
    sys.meta_path.insert(0, _Finder(compiled))
    return compiled


def loaded() -> dict[str, bool]:
    """Per module of :data:`MODULES` already imported: whether this process runs it compiled."""
    out = {}
    for module in MODULES:
        spec = getattr(sys.modules.get(module), "__spec__", None)
        if spec is not None:
            out[module] = isinstance(spec.loader, _CompiledLoader)
    return out


def _replace(data: bytes, target: Path) -> None:
    """Write ``target`` as a new file: a process that has the old one mapped keeps it intact."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def build(directory: Path | None = None, modules: Sequence[str] = MODULES,
          jobs: int | None = None) -> list[ModuleState]:
    """Compile ``modules`` into ``directory`` and write its manifest; unchanged ones are kept."""
    from Cython.Build import cythonize
    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    directory = directory or native_dir()
    directory.mkdir(parents=True, exist_ok=True)
    fresh = {s.module for s in status(directory) if s.compiled is not None}
    try:
        old = json.loads((directory / MANIFEST).read_text()).get("modules", {})
    except (OSError, ValueError, AttributeError):
        old = {}
    todo = [m for m in modules if m not in fresh]
    entries = {m: old[m] for m in fresh if m in old}
    if todo:
        with tempfile.TemporaryDirectory(prefix="segstream-native-") as tmp:
            work = Path(tmp)
            sources, digests = [], {}
            for module in todo:
                # Compile a copy, so that no generated C file lands beside the sources.
                target = work.joinpath(*module.split(".")).with_suffix(".py")
                target.parent.mkdir(parents=True, exist_ok=True)
                # Cython names a module after the packages around it (their __init__
                # files): without them "scorers.profile" would be compiled as "profile".
                for parent in target.relative_to(work).parents:
                    if parent != Path("."):
                        (work / parent / "__init__.py").touch()
                # The hash recorded is that of the very bytes compiled, even if the source
                # changes meanwhile.
                data = _source(module).read_bytes()
                target.write_bytes(data)
                digests[module] = hashlib.sha256(data).hexdigest()
                sources.append(str(target.relative_to(work)))
            cwd = os.getcwd()
            os.chdir(work)
            try:
                extensions = cythonize(  # type: ignore[no-untyped-call]
                    sources, compiler_directives=DIRECTIVES, quiet=True,
                    nthreads=jobs or os.cpu_count() or 1)
                for ext in extensions:
                    ext.extra_compile_args = ["-w"]  # generated C: its warnings are Cython's
                dist = Distribution({"ext_modules": extensions})
                cmd = build_ext(dist)
                cmd.build_lib = str(work / "lib")
                cmd.build_temp = str(work / "tmp")
                cmd.parallel = jobs or os.cpu_count() or 1
                cmd.ensure_finalized()
                cmd.run()
                outputs = [Path(o) for o in cmd.get_outputs()]
            finally:
                os.chdir(cwd)
            for module in todo:
                *package, last = module.split(".")
                tail = Path(*package, last + _abi())
                built = [o for o in outputs if o.parts[-len(tail.parts):] == tail.parts]
                if len(built) != 1:
                    raise RuntimeError(f"the build of {module} produced no {_abi()} file")
                # Named after the source's hash: a manifest can only point at a file
                # built from the source it names, whatever order builds finish in.
                name = f"{module}.{digests[module][:16]}{_abi()}"
                _replace(built[0].read_bytes(), directory / name)
                entries[module] = {"file": name, "source_sha256": digests[module]}
    manifest = {"abi": _abi(), "python": sys.version.split()[0], "directives": DIRECTIVES,
                "modules": dict(sorted(entries.items()))}
    _replace((json.dumps(manifest, indent=2) + "\n").encode(), directory / MANIFEST)
    kept = {e["file"] for e in entries.values()}
    for path in _compiled_files(directory):
        if path.name not in kept:  # an older build's (a process using it keeps its copy)
            path.unlink(missing_ok=True)
    return status(directory)


def _compiled_files(directory: Path) -> list[Path]:
    return [p for p in directory.glob(f"*{_abi()}")
            if any(p.name.startswith(m + ".") for m in MODULES)]


def clean(directory: Path | None = None) -> int:
    """Remove a build (only its own files); returns how many files were removed."""
    directory = directory or native_dir()
    if not directory.exists():
        return 0
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{directory} holds no build of compiled modules (no {MANIFEST}); "
                         "nothing removed")
    files = [*_compiled_files(directory), *directory.glob(".*.tmp"), manifest]
    for path in files:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()  # only when nothing else is left in it
    return len(files)
