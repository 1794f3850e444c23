"""The hand-written ``__init__`` of the step's value classes (``features.record``).

A dataclass whose class defines ``__init__`` keeps that one; these tests check, for every
such dataclass of the compiled modules, that it takes the fields in their order with their
defaults (``None`` for a ``default_factory`` field) and stores each argument in its field,
compiled (as the worker runs them) or not.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

from features.record import RECORDS, record
from stream.native import MODULES


def _own_init_dataclasses() -> list[type]:
    found: dict[str, type] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and obj.__module__ == name
                    and dataclasses.is_dataclass(obj) and "__init__" in obj.__dict__):
                init = obj.__dict__["__init__"]
                # the dataclasses module's own __init__ is compiled from a string
                if getattr(getattr(init, "__code__", None), "co_filename", "") != "<string>":
                    found[f"{name}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


CLASSES = _own_init_dataclasses()


def test_the_step_classes_are_found() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {"RawRecord", "ClickEvent", "TransactionEvent", "Profile", "LabelState",
            "Observation", "NbaState", "Outcome", "CustomerState"} <= names
    assert set(RECORDS) <= set(CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_init_takes_the_fields_in_order_with_their_defaults(cls: type) -> None:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f.name
        if f.default_factory is not dataclasses.MISSING:
            assert p.default is None, f.name
        elif f.default is not dataclasses.MISSING:
            assert p.default == f.default and type(p.default) is type(f.default), f.name
        else:
            assert p.default is inspect.Parameter.empty, f.name


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_init_stores_every_argument_in_its_field(cls: type) -> None:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    values = {f.name: object() for f in fields}
    by_keyword = cls(**values)
    by_position = cls(*values.values())
    for f in fields:
        assert getattr(by_keyword, f.name) is values[f.name], f.name
        assert getattr(by_position, f.name) is values[f.name], f.name
    assert dataclasses.replace(by_keyword) == by_keyword


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_omitted_arguments_take_the_field_defaults_and_factories_are_not_shared(
        cls: type) -> None:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    required = {f.name: object() for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    a, b = cls(**required), cls(**required)
    for f in fields:
        if f.default_factory is not dataclasses.MISSING:
            assert getattr(a, f.name) == f.default_factory()
            assert getattr(a, f.name) is not getattr(b, f.name), f.name
        elif f.default is not dataclasses.MISSING:
            assert getattr(a, f.name) == f.default, f.name


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__qualname__)
def test_records_compare_and_hash_by_their_fields(cls: type) -> None:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    a = cls(*(f"v{i}" for i in range(len(fields))))
    b = cls(*(f"v{i}" for i in range(len(fields))))
    c = cls(*(f"w{i}" for i in range(len(fields))))
    assert a == b and hash(a) == hash(b)
    assert a != c


def test_a_record_without_its_own_init_is_refused() -> None:
    with pytest.raises(TypeError, match="must define its own __init__"):
        @record
        class Plain:
            x: int
