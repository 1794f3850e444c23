"""Next-best action: which outreach a segment migration triggers, hold-out groups and lift.

Pure logic only. A catalogue of rules maps a migration (scheme, from, to) to an action; the
per-customer :class:`NbaState` enforces cooldowns and a frequency cap and remembers exposures
until their attribution window closes, so purchases can be credited to the treated or the
hold-out arm. Counters are flat ``"{action_id}|{segment}|{arm}|{kind}"`` fields, ready for
Redis ``HINCRBY``; :func:`lift_table` turns them into uplift with a significance test.

>>> cat = load_actions('''
... defaults: {holdout_share: 0.0, cooldown_days: 7, attribution_days: 14}
... rules:
...   - {scheme: rfm, to: At Risk, action_id: win-back, channel: email, priority: 10}
... ''')
>>> state, decision = decide(cat, NbaState(), "c1", "rfm", "Loyal", "At Risk", at_ms=0)
>>> decision
Decision(action_id='win-back', channel='email', priority=10, holdout=False)
>>> state, conversions = on_purchase(state, ts_ms=DAY_MS)
>>> [c.action_id for c in conversions], state.pending
(['win-back'], ())
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from features.record import record
from scorers.rules import (
    MAX_DAYS,
    Number,
    RulesError,
    Whole,
    parse_yaml,
    read_catalogue_text,
    short_repr,
)

#: This module's functions: pydantic must take the methods of its models for methods,
#: not fields, also when the module runs compiled (see stream.native), where a function
#: is not a ``types.FunctionType``.
_FUNCTIONS = (type(lambda: None),)

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
Channel = Literal["email", "push", "sms", "call", "webhook", "in_app"]
Arm = Literal["treated", "holdout"]
Kind = Literal["exposed", "converted"]
_SEP = "|"


class ActionCatalogueError(ValueError):
    """The action catalogue is malformed or names unknown schemes or segments."""


# -- catalogue ----------------------------------------------------------------------------


class ActionDefaults(BaseModel):
    """Values a rule inherits when it does not set them."""

    model_config = ConfigDict(ignored_types=_FUNCTIONS, extra="forbid", frozen=True,
                              allow_inf_nan=False)

    holdout_share: Number = Field(default=0.1, ge=0.0, le=1.0)
    cooldown_days: Number = Field(default=14.0, ge=0.0, le=MAX_DAYS)
    attribution_days: Number = Field(default=14.0, gt=0.0, le=MAX_DAYS)


class ActionRule(BaseModel):
    """On entering ``to`` (from one of ``from``, or from anywhere), send an action."""

    model_config = ConfigDict(ignored_types=_FUNCTIONS, extra="forbid", frozen=True,
                              populate_by_name=True, allow_inf_nan=False)

    scheme: str = Field(min_length=1)
    to: str = Field(min_length=1)
    from_: tuple[str | None, ...] | None = Field(default=None, alias="from")
    action_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")
    channel: Channel
    priority: Whole = 0
    cooldown_days: Number | None = Field(default=None, ge=0.0, le=MAX_DAYS)
    attribution_days: Number | None = Field(default=None, gt=0.0, le=MAX_DAYS)
    holdout_share: Number | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("from_", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("to", "from_")
    @classmethod
    def _no_separator(cls, v: Any) -> Any:
        names = v if isinstance(v, tuple) else (v,)
        if any(n is not None and _SEP in n for n in names):
            raise ValueError(f"segment names must not contain {_SEP!r}")
        return v

    @model_validator(mode="after")
    def _can_fire(self) -> ActionRule:
        if self.from_ is not None and not self.from_:
            raise ValueError("'from' is empty, so the rule never fires; leave it out to act "
                             "on entering 'to' from anywhere")
        if self.from_ and all(f == self.to for f in self.from_):
            raise ValueError(f"'from' names only 'to' ({self.to!r}), so the rule never fires: "
                             "a customer never moves from a segment to the same one")
        return self

    def matches(self, scheme: str, from_segment: str | None, to_segment: str) -> bool:
        """Whether a migration of ``scheme`` from ``from_segment`` to ``to_segment`` fires."""
        return (
            self.scheme == scheme
            and self.to == to_segment
            and (self.from_ is None or from_segment in self.from_)
        )

    @property
    def cooldown_ms(self) -> int:
        return int((self.cooldown_days or 0.0) * DAY_MS)

    @property
    def attribution_ms(self) -> int:
        return int((self.attribution_days or 0.0) * DAY_MS)

    @property
    def share(self) -> float:
        return self.holdout_share or 0.0


class ActionCatalogue(BaseModel):
    """Validated rules with every default filled in."""

    model_config = ConfigDict(ignored_types=_FUNCTIONS, extra="forbid", frozen=True)

    defaults: ActionDefaults = ActionDefaults()
    max_actions_per_7d: Whole = Field(default=3, ge=0)
    holdout_salt: str = ""
    rules: tuple[ActionRule, ...] = ()

    @model_validator(mode="after")
    def _resolve(self) -> ActionCatalogue:
        d = self.defaults
        resolved = tuple(
            r.model_copy(
                update={
                    "cooldown_days": d.cooldown_days
                    if r.cooldown_days is None
                    else r.cooldown_days,
                    "attribution_days": (
                        d.attribution_days if r.attribution_days is None else r.attribution_days
                    ),
                    "holdout_share": d.holdout_share
                    if r.holdout_share is None
                    else r.holdout_share,
                }
            )
            for r in self.rules
        )
        # One action id is one treatment: its arm and windows must not depend on the rule.
        seen: dict[str, ActionRule] = {}
        for r in resolved:
            first = seen.setdefault(r.action_id, r)
            for name in ("channel", "cooldown_days", "attribution_days", "holdout_share"):
                if getattr(first, name) != getattr(r, name):
                    raise ValueError(f"action {r.action_id!r} has two different {name} values")
        object.__setattr__(self, "rules", resolved)
        return self

    @functools.cached_property
    def version(self) -> str:
        """Short sha256 of the canonical content (equal catalogues, equal versions).

        Cached (the catalogue is frozen): every batch's scoring context names it."""
        doc = self.model_dump(mode="json", by_alias=True)
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def candidates(
        self, scheme: str, from_segment: str | None, to_segment: str
    ) -> list[ActionRule]:
        """Matching rules, highest priority first (catalogue order breaks ties)."""
        rules = self._by_target.get((scheme, to_segment), ())
        hits = [r for r in rules if r.matches(scheme, from_segment, to_segment)]
        return sorted(hits, key=lambda r: -r.priority)

    def rule_for(self, action_id: str) -> ActionRule | None:
        return self._by_action.get(action_id)

    @functools.cached_property
    def _by_target(self) -> dict[tuple[str, str], tuple[ActionRule, ...]]:
        """Rules per (scheme, target segment), in catalogue order."""
        out: dict[tuple[str, str], tuple[ActionRule, ...]] = {}
        for r in self.rules:
            out[(r.scheme, r.to)] = (*out.get((r.scheme, r.to), ()), r)
        return out

    @functools.cached_property
    def _by_action(self) -> dict[str, ActionRule]:
        """The first rule of each action id (:meth:`rule_for` runs for every customer)."""
        out: dict[str, ActionRule] = {}
        for r in self.rules:
            out.setdefault(r.action_id, r)
        return out


def _check_names(cat: ActionCatalogue, schemes: Mapping[str, Sequence[str]]) -> None:
    problems: list[str] = []
    for i, r in enumerate(cat.rules):
        if r.scheme not in schemes:
            problems.append(f"rules[{i}]: unknown scheme {short_repr(r.scheme)} "
                            f"(known: {', '.join(sorted(schemes))})")
            continue
        known = set(schemes[r.scheme])
        for name in (r.to, *(r.from_ or ())):
            if name is not None and name not in known:
                problems.append(f"rules[{i}]: unknown segment {short_repr(name)} "
                                f"in scheme {r.scheme!r}")
    if problems:
        raise ActionCatalogueError("invalid action catalogue: " + "; ".join(problems))


def load_actions(
    source: str | Path, schemes: Mapping[str, Sequence[str]] | None = None
) -> ActionCatalogue:
    """Load and validate an action catalogue from a YAML file (a ``Path`` or a path string)
    or from YAML text; with ``schemes`` every scheme and segment name must be known."""
    if isinstance(source, Path) or ("\n" not in source and _is_file(source)):
        try:
            text = read_catalogue_text(source)
        except ValueError as exc:
            raise ActionCatalogueError(
                f"cannot read action catalogue {short_repr(str(source))}: {exc}") from None
    else:
        text = source
    try:
        doc = parse_yaml(text)  # the segment catalogue's loader: no duplicate keys, no aliases
    except RulesError as exc:
        raise ActionCatalogueError(f"action catalogue: {exc}") from None
    if not isinstance(doc, dict):
        hint = (f" (no such file: {short_repr(source)})"
                if isinstance(doc, str) and "\n" not in text else "")
        raise ActionCatalogueError(f"action catalogue must be a mapping with a 'rules' list{hint}")
    try:
        cat = ActionCatalogue.model_validate(doc)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        ]
        raise ActionCatalogueError("invalid action catalogue: " + "; ".join(lines)) from None
    if schemes is not None:
        _check_names(cat, schemes)
    return cat


def _is_file(source: str) -> bool:
    try:
        return Path(source).is_file()
    except (OSError, ValueError):  # a name too long for a path, say: YAML text then
        return False


def default_actions(schemes: Mapping[str, Sequence[str]] | None = None) -> ActionCatalogue:
    """The packaged default catalogue (``scorers/actions.yaml``)."""
    text = importlib.resources.files("scorers").joinpath("actions.yaml").read_text("utf-8")
    return load_actions(text, schemes)


# -- hold-out assignment ------------------------------------------------------------------


def holdout_point(customer_id: str, action_id: str, salt: str = "") -> float:
    """A customer's uniform position in [0, 1) for one action.

    >>> 0.0 <= holdout_point("c1", "win-back") < 1.0
    True
    """
    msg = f"{salt}\x1f{customer_id}\x1f{action_id}".encode()
    digest = hashlib.blake2b(msg, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def in_holdout(customer_id: str, action_id: str, share: float, salt: str = "") -> bool:
    """Whether the customer is in the action's hold-out group (stable for a given salt).

    >>> in_holdout("c1", "win-back", 0.0), in_holdout("c1", "win-back", 1.0)
    (False, True)
    """
    return holdout_point(customer_id, action_id, salt) < share


# -- per-customer state -------------------------------------------------------------------


@record
class Exposure:
    """An action decided for a customer (either arm), awaiting a purchase until ``until_ms``."""

    action_id: str
    segment: str
    holdout: bool
    at_ms: int
    until_ms: int

    def __init__(self, action_id: str, segment: str, holdout: bool, at_ms: int,
                 until_ms: int) -> None:
        w: Any = self
        w.action_id = action_id
        w.segment = segment
        w.holdout = holdout
        w.at_ms = at_ms
        w.until_ms = until_ms


@record
class Conversion:
    """A purchase credited to an exposure."""

    action_id: str
    segment: str
    holdout: bool
    at_ms: int
    purchase_ms: int

    def __init__(self, action_id: str, segment: str, holdout: bool, at_ms: int,
                 purchase_ms: int) -> None:
        w: Any = self
        w.action_id = action_id
        w.segment = segment
        w.holdout = holdout
        w.at_ms = at_ms
        w.purchase_ms = purchase_ms


@record
class Decision:
    """The action a migration triggers; ``holdout`` means: record it, do not send it."""

    action_id: str
    channel: str
    priority: int
    holdout: bool

    def __init__(self, action_id: str, channel: str, priority: int, holdout: bool) -> None:
        w: Any = self
        w.action_id = action_id
        w.channel = channel
        w.priority = priority
        w.holdout = holdout

    def as_event(self) -> dict[str, Any]:
        """The ``action`` field of a migration event (DESIGN §3)."""
        return {"action_id": self.action_id, "channel": self.channel, "holdout": self.holdout}


@record
class NbaState:
    """What a customer has been sent: last send per action, recent sends, open exposures.

    >>> s = NbaState({"a": 5}, (5,), (Exposure("a", "Lost", True, 5, 9),))
    >>> NbaState.from_dict(s.to_dict()) == s
    True
    """

    last_sent: dict[str, int] = field(default_factory=dict)
    recent: tuple[int, ...] = ()
    pending: tuple[Exposure, ...] = ()

    def __init__(self, last_sent: dict[str, int] | None = None, recent: tuple[int, ...] = (),
                 pending: tuple[Exposure, ...] = ()) -> None:
        w: Any = self
        w.last_sent = {} if last_sent is None else last_sent
        w.recent = recent
        w.pending = pending

    @property
    def is_empty(self) -> bool:
        return not (self.last_sent or self.recent or self.pending)

    def to_dict(self) -> dict[str, Any]:
        """Plain msgpack-able form."""
        return {
            "last_sent": dict(self.last_sent),
            "recent": list(self.recent),
            "pending": [
                [e.action_id, e.segment, e.holdout, e.at_ms, e.until_ms] for e in self.pending
            ],
        }

    @staticmethod
    def is_canonical(doc: Mapping[str, Any]) -> bool:
        """Whether ``doc`` has the shape :meth:`to_dict` writes (its keys, nothing more).

        >>> NbaState.is_canonical(NbaState().to_dict()), NbaState.is_canonical({})
        (True, False)
        """
        return len(doc) == 3 and "last_sent" in doc and "recent" in doc and "pending" in doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> NbaState:
        return cls(
            last_sent={str(k): int(v) for k, v in dict(doc.get("last_sent") or {}).items()},
            recent=tuple(int(t) for t in doc.get("recent") or ()),
            pending=tuple(
                Exposure(str(a), str(s), bool(h), int(t0), int(t1))
                for a, s, h, t0, t1 in doc.get("pending") or ()
            ),
        )


def decide(
    catalogue: ActionCatalogue,
    state: NbaState,
    customer_id: str,
    scheme: str,
    from_segment: str | None,
    to_segment: str,
    at_ms: int,
) -> tuple[NbaState, Decision | None]:
    """Pick the highest-priority action not in cooldown, unless the frequency cap is reached.

    Cooldown and cap count both arms, so hold-out customers are treated identically except
    for the send itself; the exposure is recorded for attribution in either arm.
    """
    recent = tuple(t for t in state.recent if t > at_ms - WEEK_MS)
    pruned = NbaState(state.last_sent, recent, state.pending)
    if from_segment == to_segment:
        return pruned, None
    if sum(1 for t in recent if t <= at_ms) >= catalogue.max_actions_per_7d:
        return pruned, None
    for rule in catalogue.candidates(scheme, from_segment, to_segment):
        last = state.last_sent.get(rule.action_id)
        if last is not None and abs(at_ms - last) < rule.cooldown_ms:
            continue
        holdout = in_holdout(customer_id, rule.action_id, rule.share, catalogue.holdout_salt)
        exposure = Exposure(rule.action_id, to_segment, holdout, at_ms, at_ms + rule.attribution_ms)
        new = NbaState(
            last_sent={**state.last_sent, rule.action_id: at_ms},
            recent=(*recent, at_ms),
            pending=(*state.pending, exposure),
        )
        return new, Decision(rule.action_id, rule.channel, rule.priority, holdout)
    return pruned, None


def on_purchase(state: NbaState, ts_ms: int) -> tuple[NbaState, list[Conversion]]:
    """Credit a purchase at ``ts_ms`` to every exposure with ``at_ms < ts_ms <= until_ms``."""
    converted: list[Conversion] = []
    keep: list[Exposure] = []
    for e in state.pending:
        if e.at_ms < ts_ms <= e.until_ms:
            converted.append(Conversion(e.action_id, e.segment, e.holdout, e.at_ms, ts_ms))
        else:
            keep.append(e)
    if not converted:
        return state, []
    return NbaState(state.last_sent, state.recent, tuple(keep)), converted


#: The most exposures a customer keeps waiting for a purchase: windows stay open as long as
#: the customer's partition accepts purchases inside them, which a topic that stays quiet
#: would make forever; past this many the oldest are dropped (unconverted).
MAX_PENDING_EXPOSURES = 16


def expire(
    state: NbaState,
    now_ms: int,
    lateness_ms: int,
    catalogue: ActionCatalogue | None = None,
    settled_now_ms: int | None = None,
) -> NbaState:
    """Drop exposures whose window closed more than ``lateness_ms`` before ``settled_now_ms``
    (the customer's partition's time; default ``now_ms``) and all but the newest
    :data:`MAX_PENDING_EXPOSURES`, and sends too old at ``now_ms`` to matter for the cap
    (and, given the catalogue, for any cooldown)."""
    horizon = now_ms - lateness_ms
    settled = (now_ms if settled_now_ms is None else settled_now_ms) - lateness_ms
    pending = tuple(e for e in state.pending if e.until_ms >= settled)[-MAX_PENDING_EXPOSURES:]
    recent = tuple(t for t in state.recent if t + WEEK_MS >= horizon)
    last_sent = state.last_sent
    if catalogue is not None:
        last_sent = {}
        for aid, ts in state.last_sent.items():
            rule = catalogue.rule_for(aid)
            if rule is None or ts + rule.cooldown_ms >= horizon:
                last_sent[aid] = ts
    return NbaState(last_sent, recent, pending)


def is_quiet(
    doc: Mapping[str, Any],
    purchase_ts: Iterable[int],
    now_ms: int,
    lateness_ms: int,
    catalogue: ActionCatalogue | None = None,
    settled_now_ms: int | None = None,
) -> bool:
    """Whether a stored state (a :meth:`NbaState.to_dict`) stays exactly as it is.

    True when :func:`on_purchase` at each of ``purchase_ts`` credits nothing, then
    :func:`expire` with these arguments drops nothing, and ``doc`` has the shape
    :meth:`NbaState.to_dict` writes: callers can keep ``doc`` without decoding it.

    >>> doc = NbaState({"a": 5}, (5,), (Exposure("a", "Lost", True, 5, 9),)).to_dict()
    >>> is_quiet(doc, [], 9, 0), is_quiet(doc, [7], 9, 0), is_quiet(doc, [], 10, 0)
    (True, False, False)
    """
    if not NbaState.is_canonical(doc):
        return False
    horizon = now_ms - lateness_ms
    settled = (now_ms if settled_now_ms is None else settled_now_ms) - lateness_ms
    times = list(purchase_ts)
    if len(doc["pending"]) > MAX_PENDING_EXPOSURES:
        return False
    for _action, _segment, _holdout, at_ms, until_ms in doc["pending"]:
        if until_ms < settled or any(at_ms < ts <= until_ms for ts in times):
            return False
    if any(t + WEEK_MS < horizon for t in doc["recent"]):
        return False
    if catalogue is not None:
        for aid, ts in doc["last_sent"].items():
            rule = catalogue.rule_for(aid)
            if rule is not None and ts + rule.cooldown_ms < horizon:
                return False
    return True


# -- counters and lift --------------------------------------------------------------------


def counter_field(action_id: str, segment: str, holdout: bool, kind: Kind) -> str:
    """The counter name of one action, segment, arm and kind.

    >>> counter_field("win-back", "At Risk", True, "exposed")
    'win-back|At Risk|holdout|exposed'
    """
    arm: Arm = "holdout" if holdout else "treated"
    return _SEP.join((action_id, segment, arm, kind))


def counter_fields(
    exposures: Iterable[Exposure] = (), conversions: Iterable[Conversion] = ()
) -> dict[str, int]:
    """Increments (field -> amount) for new exposures and conversions.

    >>> counter_fields([Exposure("a", "Lost", False, 0, 1)])
    {'a|Lost|treated|exposed': 1}
    """
    out: dict[str, int] = {}
    for e in exposures:
        k = counter_field(e.action_id, e.segment, e.holdout, "exposed")
        out[k] = out.get(k, 0) + 1
    for c in conversions:
        k = counter_field(c.action_id, c.segment, c.holdout, "converted")
        out[k] = out.get(k, 0) + 1
    return out


def parse_counter_field(name: str) -> tuple[str, str, str, str]:
    """``(action_id, segment, arm, kind)`` of a counter name."""
    action_id, rest = name.split(_SEP, 1)
    segment, arm, kind = rest.rsplit(_SEP, 2)
    return action_id, segment, arm, kind


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default).

    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def two_proportion_p_value(x1: int, n1: int, x2: int, n2: int) -> float | None:
    """Two-sided p-value of the pooled two-proportion z-test (None when undefined).

    >>> round(two_proportion_p_value(30, 100, 20, 100), 4)
    0.1025
    """
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return None
    z = (x1 / n1 - x2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


def lift_table(
    counters: Mapping[str, int] | Mapping[bytes, bytes] | Mapping[Any, Any],
) -> list[dict[str, Any]]:
    """Per action and segment: counts and rates per arm, uplift, relative lift, p-value and
    95% Wilson intervals. Accepts ``HGETALL`` output (bytes) as well as str -> int."""
    cells: dict[tuple[str, str], dict[str, int]] = {}
    for raw_key, raw_val in counters.items():
        action_id, segment, arm, kind = parse_counter_field(_text(raw_key))
        val = raw_val if isinstance(raw_val, int) else int(_text(raw_val))
        cell = cells.setdefault((action_id, segment), {})
        cell[f"{arm}_{kind}"] = cell.get(f"{arm}_{kind}", 0) + val
    rows: list[dict[str, Any]] = []
    for (action_id, segment), c in sorted(cells.items()):
        te, tc = c.get("treated_exposed", 0), c.get("treated_converted", 0)
        he, hc = c.get("holdout_exposed", 0), c.get("holdout_converted", 0)
        tr = tc / te if te else None
        hr = hc / he if he else None
        rows.append(
            {
                "action_id": action_id,
                "segment": segment,
                "treated_exposed": te,
                "treated_converted": tc,
                "holdout_exposed": he,
                "holdout_converted": hc,
                "treated_rate": tr,
                "holdout_rate": hr,
                "uplift": tr - hr if tr is not None and hr is not None else None,
                "relative_lift": tr / hr - 1 if tr is not None and hr else None,
                "p_value": two_proportion_p_value(tc, te, hc, he),
                "treated_ci": wilson_interval(tc, te) if te else None,
                "holdout_ci": wilson_interval(hc, he) if he else None,
            }
        )
    return rows
