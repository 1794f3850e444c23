"""A customer's scoring-side state: segments, sketch contribution, labels, actions, history.

Features live in :class:`features.state.CustomerState`; everything the scoring
step remembers about a customer between evaluations lives here, stored next to
it in the same partition and committed in the same atomic step.

>>> p = Profile(segments={"rfm": ("Loyal", 5)}, rfm=("r:1", "f:2", "m:3"))
>>> Profile.from_bytes(p.to_bytes()) == p
True
"""

from __future__ import annotations

from dataclasses import field, replace
from typing import Any

import msgpack

from features.record import record
from features.serial import packb

_FORMAT = 1
#: Migrations kept per customer for ``customer --json`` and the API.
HISTORY_LIMIT = 20


@record(slots=False)
class Profile:
    """What the scoring step keeps per customer."""

    #: scheme -> (segment, event time the customer entered it)
    segments: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: the fields this customer adds to the RFM population sketch
    rfm: tuple[str, str, str] | None = None
    #: pending delayed-label observations (``scorers.labels`` state as a plain dict)
    labels: dict[str, Any] = field(default_factory=dict)
    #: next-best-action state (``scorers.nba`` state as a plain dict)
    nba: dict[str, Any] = field(default_factory=dict)
    #: newest migrations last: [at_ms, scheme, from, to, migration_id, action_id|None]
    history: tuple[tuple[Any, ...], ...] = ()
    #: migrations of this customer so far (all schemes); part of every migration id, so two
    #: moves with the same cause and segments (a flip back and forth at one engine time)
    #: still get distinct ids, while a redelivery recomputes the same one
    migrations: int = 0
    #: what the last evaluation used besides the customer's own state and the population
    #: (``ScoringContext.context_key``; "" unknown), its engine day, and the RFM score it
    #: ranked the customer at: a timer sweep skips a customer for whom all are still current
    context: str = ""
    context_day: int = -1
    rfm_score: str | None = None

    def __init__(self, segments: dict[str, tuple[str, int]] | None = None,
                 rfm: tuple[str, str, str] | None = None, labels: dict[str, Any] | None = None,
                 nba: dict[str, Any] | None = None, history: tuple[tuple[Any, ...], ...] = (),
                 migrations: int = 0, context: str = "", context_day: int = -1,
                 rfm_score: str | None = None) -> None:
        w: Any = self
        w.segments = {} if segments is None else segments
        w.rfm = rfm
        w.labels = {} if labels is None else labels
        w.nba = {} if nba is None else nba
        w.history = history
        w.migrations = migrations
        w.context = context
        w.context_day = context_day
        w.rfm_score = rfm_score

    def to_bytes(self) -> bytes:
        # Fields added later go last, so that an older reader ignores them.
        return packb(
            [_FORMAT, {k: list(v) for k, v in self.segments.items()},
             list(self.rfm) if self.rfm else None, self.labels, self.nba,
             [list(h) for h in self.history], self.migrations, self.context, self.rfm_score,
             self.context_day],
        )

    @classmethod
    def from_bytes(cls, blob: bytes | None) -> Profile:
        if not blob:
            return cls()
        fmt, segs, rfm, labels, nba, hist, *rest = msgpack.unpackb(blob, raw=False,
                                                                   strict_map_key=False)
        if fmt != _FORMAT:
            raise ValueError(f"unknown profile format {fmt}")
        return cls(
            segments={k: (v[0], int(v[1])) for k, v in segs.items()},
            rfm=(rfm[0], rfm[1], rfm[2]) if rfm else None,
            labels=labels or {},
            nba=nba or {},
            history=tuple(tuple(h) for h in hist),
            migrations=int(rest[0]) if rest else len(hist),
            context=str(rest[1]) if len(rest) > 1 and rest[1] else "",
            rfm_score=str(rest[2]) if len(rest) > 2 and rest[2] else None,
            context_day=int(rest[3]) if len(rest) > 3 else -1,
        )

    def with_migration(self, entry: tuple[Any, ...]) -> Profile:
        return replace(self, history=(*self.history, entry)[-HISTORY_LIMIT:])
