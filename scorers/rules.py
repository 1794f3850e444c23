"""Segment schemes: ordered, named rules loaded from YAML, and assignment with anti-flapping.

A catalogue holds schemes; a scheme is an ordered list of segments, each with a condition
(see :mod:`scorers.conditions`), plus a fallback for customers no rule matches. The first
matching segment wins, so segments are mutually exclusive by order.

Anti-flapping keeps a customer from bouncing between segments near a boundary:

- ``min_dwell_days``: after a move, the customer stays put for at least this long;
- ``hysteresis``: while a customer is in a segment, that segment's condition is evaluated
  with thresholds relaxed by these absolute amounts (per feature or score), so leaving it takes
  a clear move past the boundary. A higher-priority segment still wins when it matches strictly.

>>> cat = load_catalogue('''
... schemes:
...   value:
...     anti_flapping: {min_dwell_days: 0, hysteresis: {monetary_total: 10}}
...     segments:
...       - {name: High, when: "monetary_total >= 100"}
...     fallback: Low
... ''')
>>> scheme = cat.schemes["value"]
>>> scheme.segment_names
('High', 'Low')
>>> a = assign(scheme, {"monetary_total": 120.0}, None, now_ms=0)
>>> a.segment, a.reason
('High', 'High: monetary_total=120 >= 100')
>>> assign(scheme, {"monetary_total": 95.0}, SegmentState("High", 0), now_ms=1).segment
'High'
>>> assign(scheme, {"monetary_total": 85.0}, SegmentState("High", 0), now_ms=1).reason
'fallback Low: no rule matched'
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import reprlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml  # type: ignore[import-untyped, unused-ignore]
from numpy.typing import NDArray
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from features.record import record
from features.state import FEATURE_NAMES, iso
from features.text import CONTROL, shows_nothing
from scorers.conditions import Columns, Condition, ConditionError, compile_condition
from scorers.names import SCORE_NAMES, TEXT_SCORES

#: This module's functions: pydantic must take the methods of its models for methods,
#: not fields, also when the module runs compiled (see stream.native), where a function
#: is not a ``types.FunctionType``.
_FUNCTIONS = (type(lambda: None),)

MS_PER_DAY = 86_400_000
#: Names a segment condition may use by default: every feature and every score.
KNOWN_NAMES: tuple[str, ...] = FEATURE_NAMES + SCORE_NAMES
_SCHEME_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # whole name: fullmatch (a "$" lets "\n" end it)
#: The longest period a catalogue may set (a dwell, a cooldown), in days: a century. Longer
#: means nothing and would overflow the millisecond timestamps derived from it.
MAX_DAYS = 36_500
#: How deep a catalogue's YAML may nest (a real one needs about six levels): deeper input
#: would exhaust the stack, which compiled code (see stream.native) cannot catch.
_MAX_YAML_DEPTH = 64
_MESSAGE_CHARS = 200
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


class RulesError(ValueError):
    """An invalid catalogue; ``problems`` lists every problem found, each naming where."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        text = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(
            problems)
        super().__init__(text)


def short_repr(value: Any) -> str:
    """``repr(value)`` cut short, so a message stays readable whatever the input holds.

    >>> short_repr(list(range(100)))
    '[0, 1, 2, 3, 4, 5, ...]'
    >>> len(short_repr("x" * 10**6))
    80
    """
    text = _REPR.repr(value)
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS - 3] + "..."


# ---------------------------------------------------------------- YAML schema


class _Strict(BaseModel):
    model_config = ConfigDict(ignored_types=_FUNCTIONS, extra="forbid", strict=False,
                              allow_inf_nan=False)


class _SegmentSpec(_Strict):
    name: str = Field(min_length=1)
    when: str = Field(min_length=1)
    description: str = ""


def _written_as_number(v: Any) -> Any:
    """A catalogue's number must be written as one: pydantic would read YAML's ``true`` as 1
    and ``"5"`` as 5 (an integral float such as 10.0 is still a whole number)."""
    if isinstance(v, bool | str):
        raise ValueError(f"Input should be a valid number, not {short_repr(v)}")
    return v


#: A float or an int of a catalogue, written as a number.
Number = Annotated[float, BeforeValidator(_written_as_number)]
Whole = Annotated[int, BeforeValidator(_written_as_number)]


class _AntiFlappingSpec(_Strict):
    min_dwell_days: Number = Field(default=0.0, ge=0, le=MAX_DAYS)
    hysteresis: dict[str, Number] = Field(default_factory=dict)


class _SchemeSpec(_Strict):
    description: str = ""
    anti_flapping: _AntiFlappingSpec = Field(default_factory=_AntiFlappingSpec)
    segments: list[_SegmentSpec] = Field(min_length=1)
    fallback: str = Field(min_length=1)


class _CatalogueSpec(_Strict):
    version: int | str | None = None
    schemes: dict[str, _SchemeSpec] = Field(min_length=1)


class _CatalogueLoader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]
    """Safe YAML loader that rejects duplicate mapping keys instead of keeping the last,
    aliases, and nesting deeper than ``_MAX_YAML_DEPTH``.

    A catalogue never needs an alias, and refusing them rules out an alias bomb (a few lines
    that stand for billions of values).
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a catalogue; write the value out",
                event.start_mark)
        if self._depth >= _MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {_MAX_YAML_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:  # a list or mapping as key: `? [a]`
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or mapping",
                key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {short_repr(key)}", key_node.start_mark)
        seen.add(key)
    return dict(loader.construct_mapping(node))


_CatalogueLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.2 reads 1e9 as a number; PyYAML (YAML 1.1) wants a dot (1.0e9) and gave a string,
# which the catalogue's number fields then refused. (The class gets its own resolver table.)
_CatalogueLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_catalogue_text(path: str | Path) -> str:
    """A catalogue file's text; raises ``ValueError`` saying why it cannot be read (for text
    that is not UTF-8, where the first bad byte is)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(e.strerror or type(e).__name__) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, start) + 1
        column = len(data[start:e.start].decode("utf-8")) + 1
        raise ValueError(f"not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, "
                         f"column {column}") from None


def parse_yaml(text: str) -> Any:
    """Parse catalogue YAML safely: no duplicate keys, no aliases, bounded nesting.

    Raises :class:`RulesError` naming the problem and, where YAML knows it, line and column.

    >>> parse_yaml("{a: 1, b: [2]}")
    {'a': 1, 'b': [2]}
    >>> parse_yaml("{a: 1, a: 2}")
    Traceback (most recent call last):
    ...
    scorers.rules.RulesError: invalid YAML: duplicate key 'a' at line 1, column 8
    """
    try:
        return yaml.load(text, Loader=_CatalogueLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RulesError([f"invalid YAML: {e.problem}{at}"]) from None
    except yaml.YAMLError as e:
        raise RulesError([f"invalid YAML: {e}"]) from None


# ---------------------------------------------------------------- compiled catalogue


@dataclass(frozen=True)
class Segment:
    """One named segment and its condition."""

    name: str
    condition: Condition
    description: str = ""

    @property
    def when(self) -> str:
        return self.condition.text


@dataclass(frozen=True)
class Scheme:
    """An ordered list of segments, a fallback and the anti-flapping policy."""

    name: str
    segments: tuple[Segment, ...]
    fallback: str
    description: str = ""
    min_dwell_days: float = 0.0
    hysteresis: Mapping[str, float] = field(default_factory=dict)

    @functools.cached_property
    def segment_names(self) -> tuple[str, ...]:
        """Segment names in priority order, then the fallback."""
        return (*(s.name for s in self.segments), self.fallback)

    @property
    def min_dwell_ms(self) -> int:
        return round(self.min_dwell_days * MS_PER_DAY)

    @functools.cached_property
    def names(self) -> frozenset[str]:
        """Every feature and score the scheme's conditions read."""
        return frozenset().union(*(s.condition.names for s in self.segments))

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "anti_flapping": {"min_dwell_days": self.min_dwell_days,
                              "hysteresis": dict(self.hysteresis)},
            "segments": [{"name": s.name, "when": s.when, "description": s.description}
                         for s in self.segments],
            "fallback": self.fallback,
        }


@dataclass(frozen=True)
class Catalogue:
    """Validated schemes; ``version`` is a short sha256 of the canonical content."""

    version: str
    schemes: dict[str, Scheme]
    declared_version: int | str | None = None

    def without_anti_flapping(self) -> Catalogue:
        """The same rules with no dwell and no hysteresis (for batch recomputations).

        The version is kept: it identifies the rules, which are unchanged.
        """
        schemes = {k: replace(s, min_dwell_days=0.0, hysteresis={})
                   for k, s in self.schemes.items()}
        return replace(self, schemes=schemes)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "declared_version": self.declared_version,
                "schemes": {k: s.to_json() for k, s in self.schemes.items()}}


# ---------------------------------------------------------------- loading


def _where(loc: tuple[int | str, ...], raw: Any) -> str:
    parts: list[str] = []
    rest = list(loc)
    if len(rest) >= 2 and rest[0] == "schemes":
        scheme = rest[1]
        parts.append(f"scheme {short_repr(scheme)}")
        rest = rest[2:]
        if len(rest) >= 2 and rest[0] == "segments" and isinstance(rest[1], int):
            i = rest[1]
            try:
                name = raw["schemes"][scheme]["segments"][i]["name"]
                parts.append(f"segment {short_repr(name)}")
            except (KeyError, IndexError, TypeError):
                parts.append(f"segment #{i + 1}")
            rest = rest[2:]
    parts.append(".".join(str(p) for p in rest)[:_MESSAGE_CHARS] or "catalogue")
    return ", ".join(parts[:-1]) + (": " if len(parts) > 1 else "") + parts[-1]


def _looks_like_path(source: str) -> bool:
    if "\n" in source or not source.strip():
        return False
    if source.strip().endswith((".yaml", ".yml")):
        return True
    try:
        return Path(source).is_file()
    except (OSError, ValueError):
        return False


def _parse(source: str | Path | Mapping[str, Any]) -> Any:
    if isinstance(source, Mapping):
        return source
    text: str
    if isinstance(source, Path) or _looks_like_path(source):
        try:
            text = read_catalogue_text(source)
        except ValueError as e:
            raise RulesError([f"cannot read catalogue {short_repr(str(source))}: {e}"]) from None
    else:
        text = source
    return parse_yaml(text)


def _compile_scheme(name: str, spec: _SchemeSpec, known: frozenset[str],
                    problems: list[str]) -> Scheme:
    where = f"scheme {short_repr(name)}"
    if not _SCHEME_NAME.fullmatch(name):
        problems.append(f"{where}: name must use letters, digits, '_', '.', '-' only")
    segments: list[Segment] = []
    first_index: dict[str, int] = {}
    for what, text in [*((f"segment #{i} name", seg.name)
                         for i, seg in enumerate(spec.segments, start=1)),
                       ("fallback", spec.fallback)]:
        wrong = _name_problem(text)
        if wrong:
            problems.append(f"{where}: {what} {short_repr(text)} {wrong}")
    for i, seg in enumerate(spec.segments, start=1):
        if seg.name in first_index:
            problems.append(f"{where}: duplicate segment name {short_repr(seg.name)} "
                            f"(segments #{first_index[seg.name]} and #{i})")
        first_index.setdefault(seg.name, i)
        try:
            cond = compile_condition(seg.when, known)
        except ConditionError as e:
            problems.append(f"{where}, segment {short_repr(seg.name)}: "
                            f"bad condition {short_repr(seg.when)}: {e}")
            continue
        segments.append(Segment(seg.name, cond, seg.description))
    if spec.fallback in first_index:
        problems.append(f"{where}: fallback {short_repr(spec.fallback)} collides with a "
                        "segment name")
    read = frozenset().union(*(seg.condition.names for seg in segments))
    for key, amount in spec.anti_flapping.hysteresis.items():
        if key not in known:
            problems.append(f"{where}: hysteresis on unknown name {short_repr(key)}")
        elif key in TEXT_SCORES:
            problems.append(f"{where}: hysteresis on {key!r}, a text score, has no meaning")
        elif key not in read and len(segments) == len(spec.segments):
            problems.append(f"{where}: hysteresis on {key!r}, which no condition of the "
                            "scheme reads, would change nothing")
        if amount < 0:
            problems.append(f"{where}: hysteresis for {short_repr(key)} must be >= 0, "
                            f"got {amount:g}")
    return Scheme(name, tuple(segments), spec.fallback, spec.description,
                  spec.anti_flapping.min_dwell_days, dict(spec.anti_flapping.hysteresis))


def _name_problem(name: str) -> str | None:
    """Why a segment name cannot be one (blank, padded, a control character), or None.

    >>> _name_problem("At Risk"), _name_problem(" "), _name_problem("High "), _name_problem("a\\nb")
    (None, 'is blank', 'starts or ends with whitespace', 'holds a control character')
    """
    if shows_nothing(name):
        return "is blank"
    if name != name.strip():
        return "starts or ends with whitespace"
    if CONTROL.search(name):
        return "holds a control character"
    return None


def load_catalogue(
    source: str | Path | Mapping[str, Any], known: Collection[str] = KNOWN_NAMES
) -> Catalogue:
    """Load and validate a catalogue from a file path, YAML text or an already parsed mapping.

    Raises :class:`RulesError` listing every problem, each naming scheme and segment.
    """
    raw = _parse(source)
    if not isinstance(raw, Mapping):
        raise RulesError(["catalogue: expected a mapping with a 'schemes' key"])
    try:
        spec = _CatalogueSpec.model_validate(raw)
    except ValidationError as e:
        found = []
        for err in e.errors():
            got = f" (got {short_repr(err['input'])})" if err["type"] not in (
                "missing", "extra_forbidden") else ""
            found.append(f"{_where(err['loc'], raw)}: {err['msg']}{got}")
        raise RulesError(found) from None
    problems: list[str] = []
    names = frozenset(known)
    schemes = {k: _compile_scheme(k, s, names, problems) for k, s in spec.schemes.items()}
    if problems:
        raise RulesError(problems)
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    version = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    return Catalogue(version, schemes, spec.version)


@functools.cache
def default_catalogue() -> Catalogue:
    """The catalogue packaged with segstream (``scorers/catalogue.yaml``)."""
    text = resources.files("scorers").joinpath("catalogue.yaml").read_text(encoding="utf-8")
    return load_catalogue(text)


# ---------------------------------------------------------------- assignment


@record(slots=False)
class SegmentState:
    """A customer's current segment in one scheme and when they entered it."""

    segment: str
    since_ms: int

    def __init__(self, segment: str, since_ms: int) -> None:
        w: Any = self
        w.segment = segment
        w.since_ms = since_ms


@record(slots=False)
class Assignment:
    """The outcome of :func:`assign`; ``held`` means the minimum dwell kept the customer."""

    segment: str
    changed: bool
    reason: str
    held: bool = False

    def __init__(self, segment: str, changed: bool, reason: str, held: bool = False) -> None:
        w: Any = self
        w.segment = segment
        w.changed = changed
        w.reason = reason
        w.held = held

    def state(self, current: SegmentState | None, now_ms: int) -> SegmentState:
        """The customer's segment state after this assignment."""
        if current is not None and not self.changed:
            return current
        return SegmentState(self.segment, now_ms)


def _days(d: float) -> str:
    return f"{d:g} day" + ("" if d == 1 else "s")


def assign(
    scheme: Scheme, values: Mapping[str, Any], current: SegmentState | None, now_ms: int,
    *, explain: bool = True,
) -> Assignment:
    """Place one customer in ``scheme`` given their features and scores, with anti-flapping.

    A current segment the scheme no longer has is ignored (no dwell, no hysteresis).
    With ``explain=False`` the reason is left empty (a caller that only needs the segment
    saves building it).
    """
    stays = current is not None and current.segment in scheme.segment_names
    if current is not None and stays:
        until = current.since_ms + scheme.min_dwell_ms
        if now_ms < until:
            return Assignment(current.segment, False, f"held in {current.segment} until "
                              f"{iso(until)} (minimum dwell {_days(scheme.min_dwell_days)})"
                              if explain else "", held=True)
    incumbent = current.segment if current is not None and stays else None
    segment, reason = scheme.fallback, ""
    for seg in scheme.segments:
        slack = scheme.hysteresis if seg.name == incumbent and scheme.hysteresis else None
        if seg.condition.evaluate(values, slack):
            segment = seg.name
            if explain:
                reason = f"{seg.name}: {seg.condition.explain(values, slack)}"
            break
    else:
        if explain:
            reason = f"fallback {scheme.fallback}: no rule matched"
    changed = current is None or segment != current.segment
    return Assignment(segment, changed, reason)


def assign_columns(
    scheme: Scheme, columns: Mapping[str, Any], *, size: int | None = None
) -> NDArray[np.object_]:
    """Segment names row by row, without anti-flapping (as :func:`assign` with no current).

    >>> s = default_catalogue().schemes["rfm"]
    >>> assign_columns(s, {"rfm_r": [5, 1, None], "rfm_f": [5, 1, None],
    ...                    "rfm_m": [5, 1, None]}).tolist()
    ['Champions', 'Lost', 'Prospects']
    """
    cols = Columns(columns, size)
    out = np.full(cols.n, scheme.fallback, dtype=object)
    free = np.ones(cols.n, dtype=np.bool_)
    for seg in scheme.segments:
        hit = seg.condition.evaluate_columns(cols) & free
        out[hit] = seg.name
        free &= ~hit
    return out


def assign_all(
    catalogue: Catalogue,
    values: Mapping[str, Any],
    current: Mapping[str, SegmentState],
    now_ms: int,
) -> dict[str, Assignment]:
    """:func:`assign` in every scheme of the catalogue; ``current`` is keyed by scheme."""
    return {name: assign(s, values, current.get(name), now_ms)
            for name, s in catalogue.schemes.items()}


__all__ = [
    "KNOWN_NAMES",
    "MAX_DAYS",
    "Assignment",
    "Catalogue",
    "RulesError",
    "Scheme",
    "Segment",
    "SegmentState",
    "assign",
    "assign_all",
    "assign_columns",
    "default_catalogue",
    "load_catalogue",
    "parse_yaml",
    "read_catalogue_text",
    "short_repr",
]
