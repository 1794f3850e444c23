"""``@record``: the value classes of the micro-batch step, immutable to the type checker and
cheap to build.

A micro-batch builds about a dozen small value objects per event (the event, its label
observations and state, the profile, the next-best-action state, the outcome, ...). As
``@dataclass(frozen=True)`` each construction ran the ``__init__`` the dataclasses module
generates, interpreted even inside the compiled modules (:mod:`stream.native`), and set every
field through ``object.__setattr__`` past the class's refusing ``__setattr__``: about 0.54 µs
for five fields, against 0.13 µs for a compiled ``__init__`` of plain assignments.

So a ``@record`` class writes its own ``__init__`` (compiled with its module), and is a
dataclass for everything else: fields, ``==``, ``hash``, ``repr``, ``dataclasses.replace``.
It is frozen for the type checker (:func:`typing.dataclass_transform`: mypy rejects any
assignment to a field), not at run time. Its ``__init__`` assigns through an ``Any`` alias of
``self`` (the one place that may). ``tests/unit/test_record.py`` checks that every record's
``__init__`` takes its fields in order, with their defaults, and stores each one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import Field, dataclass, field
from typing import TypeVar, dataclass_transform, overload

T = TypeVar("T")

#: Every ``@record`` class, for the test of their ``__init__``.
RECORDS: list[type] = []


@overload
def record(cls: type[T], /) -> type[T]: ...
@overload
def record(*, slots: bool = True) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field, Field))
def record(cls: type[T] | None = None, /, *, slots: bool = True
           ) -> type[T] | Callable[[type[T]], type[T]]:
    """A dataclass with ``eq`` and a field hash (as ``frozen=True`` gives), ``slots`` by
    default, and the class's own ``__init__``; a class without one is refused.

    A field with a ``default_factory`` takes ``None`` in ``__init__`` for a new default.
    """

    def wrap(c: type[T]) -> type[T]:
        if "__init__" not in c.__dict__:
            raise TypeError(f"@record class {c.__qualname__} must define its own __init__")
        out = dataclass(c, slots=slots, unsafe_hash=True)
        RECORDS.append(out)
        return out

    return wrap if cls is None else wrap(cls)
