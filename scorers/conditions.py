"""A small, safe condition language for segment rules.

Conditions are parsed by a hand-written tokenizer and recursive-descent parser into a tree
that is evaluated directly; nothing is ever handed to ``eval``. Grammar, loosest first::

    condition  := conj ("or" conj)*
    conj       := neg ("and" neg)*
    neg        := "not" neg | predicate
    predicate  := sum [ cmp sum | ["not"] "between" sum "and" sum
                      | ["not"] "in" "[" literal ("," literal)* "]" | "is" ["not"] "null" ]
    sum        := product (("+" | "-") product)*
    product    := factor (("*" | "/") factor)*
    factor     := "-" factor | number | string | name | "true" | "false" | "(" condition ")"
    cmp        := "<" | "<=" | ">" | ">=" | "==" | "!="

Keywords are case-insensitive; names are feature or score names.

Null semantics (SQL-like): a missing value, ``None`` or NaN is null. Any comparison,
``between`` or ``in`` with a null operand is false, and so is a comparison of a string with a
number. Hence ``not (x > 3)`` is *true* when ``x`` is null; write ``x is not null and x <= 3``
to exclude nulls. Arithmetic with a null operand, or a division by zero, yields null.

Hysteresis (``slack``): each comparison atom that mentions a name listed in ``slack`` has its
threshold moved by that amount (the largest, if it mentions several) in the direction that makes
the whole condition more likely true; under ``not`` it moves the other way. ``between`` widens
(or, negated, narrows) both ends; ``==``, ``!=``, ``in`` and ``is null`` are never relaxed.

>>> c = compile_condition("recency_days >= 30 and rfm_f >= 4")
>>> sorted(c.names)
['recency_days', 'rfm_f']
>>> c.evaluate({"recency_days": 45, "rfm_f": 4})
True
>>> c.explain({"recency_days": 45, "rfm_f": 4})
'recency_days=45 >= 30 and rfm_f=4 >= 4'
>>> c.evaluate({"recency_days": 27, "rfm_f": 4}, slack={"recency_days": 5})
True
>>> compile_condition("not (x > 3)").evaluate({"x": None})
True
>>> compile_condition("x > 1e400")
Traceback (most recent call last):
...
scorers.conditions.ConditionError: number 1e400 is out of range at column 5
>>> compile_condition("__import__('os')")
Traceback (most recent call last):
...
scorers.conditions.ConditionError: function calls are not supported at column 11
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

Scalar = float | str | None
Slack = Mapping[str, float]
Env = Mapping[str, Any]
#: A compiled value: the scalar of a value node for one customer's values.
ValueFn = Callable[[Env], Scalar]
#: A compiled condition: whether it holds for one customer's values.
Predicate = Callable[[Env], bool]
BoolArray = NDArray[np.bool_]
Column = NDArray[Any]

MAX_LENGTH = 10_000
MAX_DEPTH = 64
_ORDER = frozenset({"<", "<=", ">", ">="})
_CMP: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq, "!=": operator.ne,
}
_KEYWORDS = frozenset({"and", "or", "not", "between", "in", "is", "null", "true", "false"})
_TOKEN = re.compile(
    r"""(?P<ws>\s+)
    |(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    |(?P<op><=|>=|==|!=|<|>|[-+*/()\[\],])""",
    re.VERBOSE,
)


class ConditionError(ValueError):
    """A condition that does not parse or names something unknown.

    ``position`` is 0-based, ``column`` 1-based; the message ends with the column.
    """

    def __init__(self, message: str, text: str = "", position: int = 0) -> None:
        self.reason = message
        self.text = text
        self.position = position
        self.column = position + 1
        super().__init__(f"{message} at column {self.column}")

    def pointer(self) -> str:
        """The condition text with a caret under the offending column."""
        return f"{self.text}\n{' ' * self.position}^"


# ---------------------------------------------------------------- values


def scalar(v: Any) -> Scalar:
    """Normalise one input value: numbers to float, strings kept, everything else null.

    >>> scalar(3), scalar(float("nan")), scalar("545"), scalar(None)
    (3.0, None, '545', None)
    """
    t = type(v)  # exact types first: this runs for every value of every rule
    if t is float:
        return None if v != v else v
    if t is int:
        return float(v)
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, numbers.Real):
        f = float(v)
        return None if math.isnan(f) else f
    return None


def _fmt(v: Scalar, digits: int = 4) -> str:
    """A value as a reason shows it: four significant digits (two decimals from 1,000 up)
    unless ``digits`` asks for more (see :func:`_digits`); 17 is the exact value."""
    if v is None:
        return "null"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if digits >= 17:
        return repr(v)
    if abs(v) >= 1000:
        return f"{v:.{digits - 2}f}".rstrip("0").rstrip(".")
    return f"{v:.{digits}g}"


#: The precisions a reason tries, fewest digits first.
_PRECISIONS = (4, 6, 8, 10, 12, 17)


def _shown(v: Scalar, digits: int) -> Scalar:
    return float(_fmt(v, digits)) if isinstance(v, float) else v


def _digits(op: str, a: Scalar, b: Scalar, a_exact: bool = False, b_exact: bool = False
            ) -> int:
    """The fewest digits with which ``a <op> b``, as shown, is as true as it is.

    104.99 < 105 shown with four digits read "105 < 105"; a reason must be a true
    statement about the values it shows. A side shown exactly (a literal, as written) is
    not rounded.

    >>> _digits("<", 104.99, 105.0), _digits(">=", 3.0, 2.0), _digits("<", 0.29996, 0.3)
    (6, 4, 6)
    """
    if not (isinstance(a, float) and isinstance(b, float)) or (
            a.is_integer() and b.is_integer()):
        return 4
    # Four digits move a value by at most 5e-4 of it (0.005 from 1,000 up, two decimals):
    # values further apart than both errors together compare the same once shown.
    if abs(a - b) > 1e-3 * max(abs(a), abs(b)) + 0.01:
        return 4
    truth, same = _compare(op, a, b, 0.0), a == b
    for digits in _PRECISIONS:
        sa = a if a_exact else _shown(a, digits)
        sb = b if b_exact else _shown(b, digits)
        if _compare(op, sa, sb, 0.0) == truth and (sa == sb) == same:
            return digits
    return 17


def _digits_of(op: str, left: _Value, right: _Value, env: Mapping[str, Any]) -> int:
    """:func:`_digits` for two sides of a comparison as a reason renders them.

    With arithmetic on a side its operands are what is shown, so each precision is judged
    on the result of the shown operands: ``x - y > 0.02`` with 100.04 and 100.01 read
    ``x=100 - y=100 > 0.02`` at four digits.
    """
    a, b = left.value(env), right.value(env)
    if not (isinstance(left, _Arith) or isinstance(right, _Arith)):
        return _digits(op, a, b, isinstance(left, _Literal), isinstance(right, _Literal))
    if not (isinstance(a, float) and isinstance(b, float)):
        return 4
    truth, same = _compare(op, a, b, 0.0), a == b
    for digits in _PRECISIONS:
        sa, sb = left.shown(env, digits), right.shown(env, digits)
        if _compare(op, sa, sb, 0.0) == truth and (sa == sb) == same:
            return digits
    return 17


def _compare(op: str, a: Scalar, b: Scalar, shift: float) -> bool:
    if a is None or b is None:
        return False
    if isinstance(a, float) and isinstance(b, float):
        return bool(_CMP[op](a, b + shift)) if op in _ORDER else bool(_CMP[op](a, b))
    if isinstance(a, str) and isinstance(b, str):
        return bool(_CMP[op](a, b))
    return False


def _arith(op: str, a: Scalar, b: Scalar) -> Scalar:
    if not isinstance(a, float) or not isinstance(b, float):
        return None
    if op == "/":
        if b == 0.0:
            return None
        r = a / b
    else:
        r = a + b if op == "+" else a - b if op == "-" else a * b
    return None if math.isnan(r) else r


class Columns:
    """Input columns normalised once (float64 with NaN for null, else objects); reusable."""

    def __init__(self, columns: Mapping[str, Any], size: int | None) -> None:
        self.raw = columns
        self.cache: dict[str, Column] = {}
        #: columns of arithmetic nodes, by the node's id (see ``_Arith.column``)
        self.values: dict[int, tuple[Any, Column]] = {}
        if size is None:
            lengths = {len(np.asarray(c)) for c in columns.values()}
            if len(lengths) > 1:
                raise ValueError(f"columns differ in length: {sorted(lengths)}")
            if not lengths:
                raise ValueError("no columns to infer the row count from; pass size")
            size = lengths.pop()
        self.n = size

    def get(self, name: str) -> Column:
        if name not in self.cache:
            self.cache[name] = self._normalise(self.raw.get(name))
        return self.cache[name]

    def _normalise(self, col: Any) -> Column:
        if col is None:
            return np.full(self.n, np.nan)
        arr = np.asarray(col)
        if arr.dtype.kind in "US" and not isinstance(col, np.ndarray | str | bytes):
            # numpy makes text of every item of a list mixing text and numbers (5.0 became
            # "5.0"): keep the items as they were
            arr = np.empty(len(col), dtype=object)
            arr[:] = list(col)
        if arr.shape != (self.n,):
            raise ValueError(f"column of shape {arr.shape}, expected ({self.n},)")
        if arr.dtype.kind in "biuf":
            return arr.astype(np.float64)
        items = [scalar(v) for v in arr.tolist()]
        if any(isinstance(v, str) for v in items):
            out = np.empty(self.n, dtype=object)
            out[:] = items
            return out
        return np.array([np.nan if v is None else v for v in items], dtype=np.float64)

    def const(self, v: Scalar) -> Column:
        if isinstance(v, float):
            return np.full(self.n, v)
        out = np.empty(self.n, dtype=object)
        out[:] = [v] * self.n
        return out


def _is_num(col: Column) -> bool:
    return col.dtype == np.float64


def _as_objects(col: Column) -> list[Scalar]:
    if _is_num(col):
        return [None if math.isnan(x) else x for x in col.tolist()]
    return list(col.tolist())


def _rowwise(n: int, f: Callable[..., bool], *cols: Column) -> BoolArray:
    rows = zip(*(_as_objects(c) for c in cols), strict=True)
    return np.fromiter((f(*r) for r in rows), dtype=np.bool_, count=n)


# ---------------------------------------------------------------- value nodes


class _Value:
    names: frozenset[str] = frozenset()
    #: levels of arithmetic operations below and including this node
    depth: int = 0

    def value(self, env: Mapping[str, Any]) -> Scalar:
        raise NotImplementedError

    def column(self, cols: Columns) -> Column:
        raise NotImplementedError

    def render(self, env: Mapping[str, Any], digits: int = 4) -> str:
        raise NotImplementedError

    def shown(self, env: Mapping[str, Any], digits: int) -> Scalar:
        """The value a reader computes from :meth:`render` with these digits."""
        raise NotImplementedError

    def compiled(self) -> ValueFn:
        """A closure computing :meth:`value`."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Literal(_Value):
    v: float | str
    source: str

    def value(self, env: Mapping[str, Any]) -> Scalar:
        return self.v

    def column(self, cols: Columns) -> Column:
        return cols.const(self.v)

    def render(self, env: Mapping[str, Any], digits: int = 4) -> str:
        return self.source

    def shown(self, env: Mapping[str, Any], digits: int) -> Scalar:
        return self.v

    def compiled(self) -> ValueFn:
        v = self.v
        return lambda env: v


@dataclass(frozen=True)
class _Ref(_Value):
    name: str
    names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", frozenset({self.name}))

    def value(self, env: Mapping[str, Any]) -> Scalar:
        return scalar(env.get(self.name))

    def column(self, cols: Columns) -> Column:
        return cols.get(self.name)

    def render(self, env: Mapping[str, Any], digits: int = 4) -> str:
        return f"{self.name}={_fmt(self.value(env), digits)}"

    def shown(self, env: Mapping[str, Any], digits: int) -> Scalar:
        v = self.value(env)
        if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
            return v  # shown as it is
        return _shown(v, digits)

    def compiled(self) -> ValueFn:
        name = self.name
        return lambda env: scalar(env.get(name))


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass(frozen=True)
class _Arith(_Value):
    op: str
    left: _Value
    right: _Value
    names: frozenset[str] = field(init=False)
    depth: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", self.left.names | self.right.names)
        object.__setattr__(self, "depth", 1 + max(self.left.depth, self.right.depth))

    def value(self, env: Mapping[str, Any]) -> Scalar:
        return _arith(self.op, self.left.value(env), self.right.value(env))

    def column(self, cols: Columns) -> Column:
        # Computed once per set of columns: hysteresis evaluates a condition twice. The
        # node is kept with its column, so its id cannot be reused while the entry lives.
        got = cols.values.get(id(self))
        if got is None:
            got = cols.values[id(self)] = (self, self._column(cols))
        return got[1]

    def _column(self, cols: Columns) -> Column:
        a = self.left.column(cols)
        if _is_num(a) and isinstance(self.right, _Literal) and isinstance(self.right.v, float):
            v = self.right.v  # "value <op> number": no column of the constant
            if self.op == "/" and v == 0.0:
                return np.full(cols.n, np.nan)
            with np.errstate(all="ignore"):
                r = a / v if self.op == "/" else a + v if self.op == "+" else (
                    a - v if self.op == "-" else a * v)
            return np.asarray(r, dtype=np.float64)
        b = self.right.column(cols)
        if not (_is_num(a) and _is_num(b)):
            out = np.empty(cols.n, dtype=object)
            pairs = zip(_as_objects(a), _as_objects(b), strict=True)
            out[:] = [_arith(self.op, x, y) for x, y in pairs]
            return cols._normalise(out)
        with np.errstate(all="ignore"):
            if self.op == "/":
                r = np.where(b == 0.0, np.nan, a / np.where(b == 0.0, 1.0, b))
            else:
                r = a + b if self.op == "+" else a - b if self.op == "-" else a * b
        return np.asarray(r, dtype=np.float64)

    def render(self, env: Mapping[str, Any], digits: int = 4) -> str:
        p = _PRECEDENCE[self.op]

        def side(node: _Value, right: bool) -> str:
            s = node.render(env, digits)
            if isinstance(node, _Arith) and (
                _PRECEDENCE[node.op] < p or (right and _PRECEDENCE[node.op] == p)
            ):
                return f"({s})"
            return s

        return f"{side(self.left, False)} {self.op} {side(self.right, True)}"

    def shown(self, env: Mapping[str, Any], digits: int) -> Scalar:
        return _arith(self.op, self.left.shown(env, digits), self.right.shown(env, digits))

    def compiled(self) -> ValueFn:
        op, left, right = self.op, self.left.compiled(), self.right.compiled()
        return lambda env: _arith(op, left(env), right(env))


# ---------------------------------------------------------------- condition nodes


class _Bool:
    def eval(self, env: Mapping[str, Any], slack: Slack, pol: int) -> bool:
        raise NotImplementedError

    def columns(self, cols: Columns, slack: Slack, pol: int) -> BoolArray:
        raise NotImplementedError

    def explain(self, env: Mapping[str, Any], slack: Slack, pol: int) -> tuple[bool, str]:
        """The outcome and a true statement about the values that decided it."""
        raise NotImplementedError

    def compiled(self, slack: Slack, pol: int) -> Predicate:
        """A closure computing :meth:`eval` with this slack and polarity."""
        raise NotImplementedError


def _slack_of(names: frozenset[str], slack: Slack) -> float:
    return max((float(slack[n]) for n in names if n in slack), default=0.0)


def _shift(op: str, amount: float, pol: int) -> float:
    """Added to the right side of ``op`` so that the atom is relaxed (pol=1) or tightened."""
    if op not in _ORDER or amount == 0.0:
        return 0.0
    return amount * pol * (1.0 if op in ("<", "<=") else -1.0)


def _note(amount: float, ok: bool, strict: bool) -> str:
    """Marks an atom that holds only thanks to the hysteresis slack."""
    return f" (within hysteresis {_fmt(amount)})" if ok and not strict else ""


@dataclass(frozen=True)
class _Const(_Bool):
    v: bool

    def eval(self, env: Mapping[str, Any], slack: Slack, pol: int) -> bool:
        return self.v

    def columns(self, cols: Columns, slack: Slack, pol: int) -> BoolArray:
        return np.full(cols.n, self.v, dtype=np.bool_)

    def explain(self, env: Mapping[str, Any], slack: Slack, pol: int) -> tuple[bool, str]:
        return self.v, "true" if self.v else "not true"

    def compiled(self, slack: Slack, pol: int) -> Predicate:
        v = self.v
        return lambda env: v


@dataclass(frozen=True)
class _Cmp(_Bool):
    op: str
    left: _Value
    right: _Value

    def _amount(self, slack: Slack) -> float:
        return _slack_of(self.left.names | self.right.names, slack) if slack else 0.0

    def eval(self, env: Mapping[str, Any], slack: Slack, pol: int) -> bool:
        shift = _shift(self.op, self._amount(slack), pol)
        return _compare(self.op, self.left.value(env), self.right.value(env), shift)

    def columns(self, cols: Columns, slack: Slack, pol: int) -> BoolArray:
        shift = _shift(self.op, self._amount(slack), pol)
        a = self.left.column(cols)
        if _is_num(a) and isinstance(self.right, _Literal) and isinstance(self.right.v, float):
            # the usual "value <op> number", as compiled(): no column of the constant
            bound = self.right.v + shift if self.op in _ORDER else self.right.v
            return np.asarray(_CMP[self.op](a, bound) & ~np.isnan(a), dtype=np.bool_)
        b = self.right.column(cols)
        if _is_num(a) and _is_num(b):
            with np.errstate(invalid="ignore"):
                res = _CMP[self.op](a, b + shift if shift else b)
            return np.asarray(res & ~np.isnan(a) & ~np.isnan(b), dtype=np.bool_)
        return _rowwise(cols.n, lambda x, y: _compare(self.op, x, y, shift), a, b)

    def explain(self, env: Mapping[str, Any], slack: Slack, pol: int) -> tuple[bool, str]:
        amount = self._amount(slack)
        shift = _shift(self.op, amount, pol)
        a, b = self.left.value(env), self.right.value(env)
        ok = _compare(self.op, a, b, shift)
        d = _digits_of(self.op, self.left, self.right, env)
        text = f"{self.left.render(env, d)} {self.op} {self.right.render(env, d)}"
        note = _note(amount, ok, _compare(self.op, a, b, 0.0))
        return ok, (text + note) if ok else f"not ({text})"

    def compiled(self, slack: Slack, pol: int) -> Predicate:
        shift = _shift(self.op, self._amount(slack), pol)
        cmp, order = _CMP[self.op], self.op in _ORDER
        left, right = self.left.compiled(), self.right.compiled()
        if isinstance(self.right, _Literal) and isinstance(self.right.v, float):
            # the usual "value <op> number": only a float on the left can compare true
            bound = self.right.v + shift if order else self.right.v
            return lambda env: isinstance(a := left(env), float) and bool(cmp(a, bound))

        def run(env: Env) -> bool:  # _compare, specialised
            a, b = left(env), right(env)
            if a is None or b is None:
                return False
            if isinstance(a, float) and isinstance(b, float):
                return bool(cmp(a, b + shift)) if order else bool(cmp(a, b))
            if isinstance(a, str) and isinstance(b, str):
                return bool(cmp(a, b))
            return False

        return run


@dataclass(frozen=True)
class _Between(_Bool):
    subject: _Value
    lo: _Value
    hi: _Value

    def _atoms(self) -> tuple[_Cmp, _Cmp]:
        return _Cmp(">=", self.subject, self.lo), _Cmp("<=", self.subject, self.hi)

    def eval(self, env: Mapping[str, Any], slack: Slack, pol: int) -> bool:
        lo, hi = self._atoms()
        return lo.eval(env, slack, pol) and hi.eval(env, slack, pol)

    def columns(self, cols: Columns, slack: Slack, pol: int) -> BoolArray:
        lo, hi = self._atoms()
        return lo.columns(cols, slack, pol) & hi.columns(cols, slack, pol)

    def explain(self, env: Mapping[str, Any], slack: Slack, pol: int) -> tuple[bool, str]:
        lo, _ = self._atoms()
        amount = lo._amount(slack)
        ok = self.eval(env, slack, pol)
        d = max(_digits_of(">=", self.subject, self.lo, env),
                _digits_of("<=", self.subject, self.hi, env))
        text = (f"{self.subject.render(env, d)} between {self.lo.render(env, d)}"
                f" and {self.hi.render(env, d)}")
        note = _note(amount, ok, self.eval(env, {}, pol))
        return ok, (text + note) if ok else f"not ({text})"

    def compiled(self, slack: Slack, pol: int) -> Predicate:
        lo, hi = (atom.compiled(slack, pol) for atom in self._atoms())
        return lambda env: lo(env) and hi(env)


@dataclass(frozen=True)
class _In(_Bool):
    subject: _Value
    items: tuple[_Literal, ...]

    def _has(self, x: Scalar) -> bool:
        return any(_compare("==", x, item.v, 0.0) for item in self.items)

    def eval(self, env: Mapping[str, Any], slack: Slack, pol: int) -> bool:
        return self._has(self.subject.value(env))

    def columns(self, cols: Columns, slack: Slack, pol: int) -> BoolArray:
        col = self.subject.column(cols)
        if _is_num(col) and all(isinstance(i.v, float) for i in self.items):
            return np.isin(col, np.array([i.v for i in self.items], dtype=np.float64))
        return _rowwise(cols.n, self._has, col)

    def explain(self, env: Mapping[str, Any], slack: Slack, pol: int) -> tuple[bool, str]:
        ok = self.eval(env, slack, pol)
        d = max((_digits_of("==", self.subject, i, env) for i in self.items), default=4)
        text = (f"{self.subject.render(env, d)} in "
                f"[{', '.join(i.source for i in self.items)}]")
        return ok, text if ok else f"not ({text})"

    def compiled(self, slack: Slack, pol: int) -> Predicate:
        has, subject = self._has, self.subject.compiled()
        return lambda env: has(subject(env))


@dataclass(frozen=True)
class _IsNull(_Bool):
    subject: _Value
    negated: bool

    def eval(self, env: Mapping[str, Any], slack: Slack, pol: int) -> bool:
        return (self.subject.value(env) is None) != self.negated

    def columns(self, cols: Columns, slack: Slack, pol: int) -> BoolArray:
        col = self.subject.column(cols)
        null = np.isnan(col) if _is_num(col) else np.array([v is None for v in col], dtype=bool)
        return np.asarray(null != self.negated, dtype=np.bool_)

    def explain(self, env: Mapping[str, Any], slack: Slack, pol: int) -> tuple[bool, str]:
        v = self.subject.value(env)
        ok = (v is None) != self.negated
        if v is None:
            return ok, f"{self.subject.render(env).removesuffix('=null')} is null"
        return ok, f"{self.subject.render(env)} is not null"

    def compiled(self, slack: Slack, pol: int) -> Predicate:
        subject, negated = self.subject.compiled(), self.negated
        return lambda env: (subject(env) is None) != negated


@dataclass(frozen=True)
class _Not(_Bool):
    child: _Bool

    def eval(self, env: Mapping[str, Any], slack: Slack, pol: int) -> bool:
        return not self.child.eval(env, slack, -pol)

    def columns(self, cols: Columns, slack: Slack, pol: int) -> BoolArray:
        return ~self.child.columns(cols, slack, -pol)

    def explain(self, env: Mapping[str, Any], slack: Slack, pol: int) -> tuple[bool, str]:
        ok, text = self.child.explain(env, slack, -pol)
        return not ok, text

    def compiled(self, slack: Slack, pol: int) -> Predicate:
        child = self.child.compiled(slack, -pol)
        return lambda env: not child(env)


@dataclass(frozen=True)
class _Junction(_Bool):
    conj: bool  # True: and, False: or
    children: tuple[_Bool, ...]

    def eval(self, env: Mapping[str, Any], slack: Slack, pol: int) -> bool:
        if self.conj:
            return all(c.eval(env, slack, pol) for c in self.children)
        return any(c.eval(env, slack, pol) for c in self.children)

    def columns(self, cols: Columns, slack: Slack, pol: int) -> BoolArray:
        parts = [c.columns(cols, slack, pol) for c in self.children]
        reduce = np.logical_and if self.conj else np.logical_or
        return np.asarray(reduce.reduce(parts, axis=0), dtype=np.bool_)

    def explain(self, env: Mapping[str, Any], slack: Slack, pol: int) -> tuple[bool, str]:
        texts = []
        for child in self.children:
            ok, text = child.explain(env, slack, pol)
            if ok != self.conj:  # a false conjunct or a true disjunct decides alone
                return ok, text
            texts.append(text)
        return self.conj, " and ".join(texts)

    def compiled(self, slack: Slack, pol: int) -> Predicate:
        children = tuple(c.compiled(slack, pol) for c in self.children)
        conj = self.conj

        def run(env: Env) -> bool:
            for child in children:
                if child(env) != conj:  # a false conjunct or a true disjunct decides
                    return not conj
            return conj

        return run


# ---------------------------------------------------------------- parser


@dataclass(frozen=True)
class _Token:
    kind: str  # num, str, name, kw, op, end
    text: str
    pos: int


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), body)


def tokenize(text: str) -> Iterator[_Token]:
    """Split a condition into tokens; raises :class:`ConditionError` on a stray character."""
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch in "\"'":
                raise ConditionError("unterminated string", text, pos)
            if ch == "=":
                raise ConditionError("use '==' to test equality", text, pos)
            if ch == "!":
                raise ConditionError("use 'not' for negation", text, pos)
            raise ConditionError(f"unexpected character {ch!r}", text, pos)
        kind = m.lastgroup or "ws"
        if kind != "ws":
            word = m.group()
            if kind == "name" and word.lower() in _KEYWORDS:
                yield _Token("kw", word.lower(), pos)
            else:
                yield _Token(kind, word, pos)
        pos = m.end()
    yield _Token("end", "", len(text))


def _describe(tok: _Token) -> str:
    return "end of condition" if tok.kind == "end" else repr(tok.text)


class _Parser:
    def __init__(self, text: str, known: Collection[str] | None) -> None:
        self.text = text
        self.known = None if known is None else frozenset(known)
        self.tokens = list(tokenize(text))
        self.i = 0
        # levels of parentheses, `not` and unary minus; the whole condition is level 0
        self.depth = -1

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def error(self, message: str, pos: int | None = None) -> ConditionError:
        return ConditionError(message, self.text, self.tok.pos if pos is None else pos)

    def take(self, kind: str, text: str | None = None) -> _Token | None:
        t = self.tok
        if t.kind == kind and (text is None or t.text == text):
            self.i += 1
            return t
        return None

    def expect(self, kind: str, text: str, what: str) -> None:
        if self.take(kind, text) is None:
            raise self.error(f"expected {what}, found {_describe(self.tok)}")

    def parse(self) -> _Bool:
        if not self.text.strip():
            raise self.error("empty condition", 0)
        node, pos = self.condition()
        if self.tok.kind != "end":
            raise self.error(f"unexpected {_describe(self.tok)}")
        return self.as_bool(node, pos)

    def as_bool(self, node: _Bool | _Value, pos: int) -> _Bool:
        if isinstance(node, _Bool):
            return node
        shown = self.text[pos:self.tokens[self.i - 1].pos + len(self.tokens[self.i - 1].text)]
        raise self.error(f"{shown.strip()!r} is a value, not a condition; compare it", pos)

    def as_value(self, node: _Bool | _Value, pos: int) -> _Value:
        if isinstance(node, _Value):
            return node
        raise self.error("expected a value, found a condition", pos)

    def condition(self) -> tuple[_Bool | _Value, int]:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error("condition nested too deeply")
        node, pos = self.junction("or", self.conj)
        self.depth -= 1
        return node, pos

    def conj(self) -> tuple[_Bool | _Value, int]:
        return self.junction("and", self.neg)

    def junction(
        self, word: str, part: Callable[[], tuple[_Bool | _Value, int]]
    ) -> tuple[_Bool | _Value, int]:
        first, pos = part()
        if self.tok.text != word or self.tok.kind != "kw":
            return first, pos
        children = [self.as_bool(first, pos)]
        while self.take("kw", word):
            node, p = part()
            children.append(self.as_bool(node, p))
        return _Junction(word == "and", tuple(children)), pos

    def neg(self) -> tuple[_Bool | _Value, int]:
        pos = self.tok.pos
        if self.take("kw", "not"):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.error("condition nested too deeply")
            node, p = self.neg()
            self.depth -= 1
            return _Not(self.as_bool(node, p)), pos
        return self.predicate()

    def predicate(self) -> tuple[_Bool | _Value, int]:
        node, pos = self.sum()
        t = self.tok
        if t.kind == "op" and t.text in _CMP:
            self.i += 1
            left = self.as_value(node, pos)
            right_node, rpos = self.sum()
            right = self.as_value(right_node, rpos)
            self.check_types(left, right, t.pos)
            if self.tok.kind == "op" and self.tok.text in _CMP:
                raise self.error("chained comparisons are not supported; use 'between' or 'and'")
            return _Cmp(t.text, left, right), pos
        negated = t.kind == "kw" and t.text == "not" and self.tokens[self.i + 1].text in (
            "between", "in") and self.tokens[self.i + 1].kind == "kw"
        if negated:
            self.i += 1
        if self.take("kw", "between"):
            subject = self.as_value(node, pos)
            lo_node, lpos = self.sum()
            self.expect("kw", "and", "'and' in 'between ... and ...'")
            hi_node, hpos = self.sum()
            lo, hi = self.as_value(lo_node, lpos), self.as_value(hi_node, hpos)
            self.check_types(subject, lo, lpos)
            self.check_types(subject, hi, hpos)
            between = _Between(subject, lo, hi)
            return (_Not(between) if negated else between), pos
        if self.take("kw", "in"):
            inside = _In(self.as_value(node, pos), self.literal_list())
            return (_Not(inside) if negated else inside), pos
        if self.take("kw", "is"):
            subject = self.as_value(node, pos)
            is_not = self.take("kw", "not") is not None
            self.expect("kw", "null", "'null' after 'is'")
            return _IsNull(subject, is_not), pos
        return node, pos

    def check_types(self, a: _Value, b: _Value, pos: int) -> None:
        kinds = {type(n.v) for n in (a, b) if isinstance(n, _Literal)}
        if isinstance(a, _Arith) or isinstance(b, _Arith):
            kinds.add(float)
        if len(kinds) > 1:
            raise self.error("cannot compare a string with a number", pos)

    def literal_list(self) -> tuple[_Literal, ...]:
        self.expect("op", "[", "'[' after 'in'")
        items: list[_Literal] = []
        while True:
            node, pos = self.sum()
            if not isinstance(node, _Literal):
                raise self.error("'in' lists hold numbers and strings only", pos)
            items.append(node)
            if self.take("op", "]"):
                return tuple(items)
            self.expect("op", ",", "',' or ']'")

    def sum(self) -> tuple[_Bool | _Value, int]:
        return self.arith(("+", "-"), self.product)

    def product(self) -> tuple[_Bool | _Value, int]:
        return self.arith(("*", "/"), self.factor)

    def arith(
        self, ops: tuple[str, ...], part: Callable[[], tuple[_Bool | _Value, int]]
    ) -> tuple[_Bool | _Value, int]:
        node, pos = part()
        while self.tok.kind == "op" and self.tok.text in ops:
            op = self.tok.text
            self.i += 1
            right, rpos = part()
            node = _Arith(op, self.number(node, pos), self.number(right, rpos))
            # Evaluating a node recurses through its operands: bound that as nesting is.
            if node.depth > MAX_DEPTH:
                raise self.error(f"expression nested too deeply (more than {MAX_DEPTH} "
                                 "operations in a chain)", rpos)
        return node, pos

    def number(self, node: _Bool | _Value, pos: int) -> _Value:
        value = self.as_value(node, pos)
        if isinstance(value, _Literal) and isinstance(value.v, str):
            raise self.error("arithmetic needs numbers, found a string", pos)
        return value

    def factor(self) -> tuple[_Bool | _Value, int]:
        t = self.tok
        self.i += 1
        if t.kind == "op" and t.text == "-":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.error("condition nested too deeply")
            node, pos = self.factor()
            self.depth -= 1
            operand = self.number(node, pos)
            if isinstance(operand, _Literal) and isinstance(operand.v, float):
                return _Literal(-operand.v, "-" + operand.source), t.pos
            return _Arith("-", _Literal(0.0, "0"), operand), t.pos
        if t.kind == "num":
            number = float(t.text)
            if not math.isfinite(number):
                raise self.error(f"number {t.text} is out of range", t.pos)
            return _Literal(number, t.text), t.pos
        if t.kind == "str":
            return _Literal(_unescape(t.text[1:-1]), t.text), t.pos
        if t.kind == "name":
            if self.tok.kind == "op" and self.tok.text == "(":
                raise self.error("function calls are not supported")
            self.check_name(t)
            return _Ref(t.text), t.pos
        if t.kind == "kw" and t.text in ("true", "false"):
            return _Const(t.text == "true"), t.pos
        if t.kind == "kw" and t.text == "null":
            raise self.error("test for null with 'is null' or 'is not null'", t.pos)
        if t.kind == "op" and t.text == "(":
            node, _ = self.condition()
            self.expect("op", ")", "')'")
            return node, t.pos
        self.i -= 1
        raise self.error(f"expected a value, found {_describe(t)}")

    def check_name(self, t: _Token) -> None:
        if self.known is None or t.text in self.known:
            return
        close = difflib.get_close_matches(t.text, sorted(self.known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise self.error(f"unknown name {t.text!r}{hint}", t.pos)


# ---------------------------------------------------------------- public API


def _names(node: _Bool | _Value) -> frozenset[str]:
    if isinstance(node, _Value):
        return node.names
    if isinstance(node, _Cmp):
        return node.left.names | node.right.names
    if isinstance(node, _Between):
        return node.subject.names | node.lo.names | node.hi.names
    if isinstance(node, (_In, _IsNull)):
        return node.subject.names
    if isinstance(node, _Not):
        return _names(node.child)
    if isinstance(node, _Junction):
        return frozenset().union(*(_names(c) for c in node.children))
    return frozenset()


@dataclass(frozen=True, eq=False)
class Condition:
    """A compiled condition; see the module docstring for the language and null semantics."""

    text: str
    root: _Bool = field(repr=False)
    names: frozenset[str] = field(init=False)
    _slack_names: tuple[str, ...] = field(init=False, repr=False)
    _predicates: dict[tuple[Any, ...], Predicate] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _names(self.root))
        object.__setattr__(self, "_slack_names", tuple(sorted(self.names)))
        object.__setattr__(self, "_predicates", {})

    def __getstate__(self) -> dict[str, Any]:
        # Compiled closures do not pickle; they are rebuilt on demand.
        return {"text": self.text, "root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "text", state["text"])
        object.__setattr__(self, "root", state["root"])
        self.__post_init__()

    def __str__(self) -> str:
        return self.text

    def evaluate(self, values: Mapping[str, Any], slack: Slack | None = None) -> bool:
        """Whether the condition holds for one customer's values (missing names are null)."""
        return self.predicate(slack)(values)

    def predicate(self, slack: Slack | None = None) -> Predicate:
        """:meth:`evaluate` with this slack, compiled once into a closure (and cached).

        >>> compile_condition("x > 1 or y is null").predicate()({"x": 2})
        True
        """
        # Only the slack of names the condition reads changes the compiled thresholds.
        key = tuple(slack.get(n) for n in self._slack_names) if slack else ()
        fn = self._predicates.get(key)
        if fn is None:
            fn = self._predicates[key] = self.root.compiled(slack or {}, 1)
        return fn

    def explain(self, values: Mapping[str, Any], slack: Slack | None = None) -> str:
        """The atoms that decided the outcome, with their values.

        >>> c = compile_condition("a >= 30 and (b < 2 or c in ['x', 'y'])")
        >>> c.explain({"a": 45, "b": 3, "c": "x"})
        'a=45 >= 30 and c="x" in [\\'x\\', \\'y\\']'
        >>> c.explain({"a": 10.5})
        'not (a=10.5 >= 30)'
        """
        return self.root.explain(values, slack or {}, 1)[1]

    def evaluate_columns(
        self,
        columns: Mapping[str, Any] | Columns,
        slack: Slack | None = None,
        *,
        size: int | None = None,
    ) -> BoolArray:
        """Row-wise :meth:`evaluate` over columns (arrays; NaN or None is null).

        >>> c = compile_condition("x between 1 and 3")
        >>> c.evaluate_columns({"x": np.array([0.0, 1.0, np.nan, 3.5])}).tolist()
        [False, True, False, False]
        """
        cols = columns if isinstance(columns, Columns) else Columns(columns, size)
        return self.root.columns(cols, slack or {}, 1)


def compile_condition(text: str, known: Collection[str] | None = None) -> Condition:
    """Parse ``text``; with ``known``, every name must be one of them.

    >>> compile_condition("x > 1 and agee > 3", known={"x", "age"})
    Traceback (most recent call last):
    ...
    scorers.conditions.ConditionError: unknown name 'agee' (did you mean 'age'?) at column 11
    """
    if len(text) > MAX_LENGTH:
        raise ConditionError(f"condition longer than {MAX_LENGTH} characters", text, MAX_LENGTH)
    try:
        return Condition(text, _Parser(text, known).parse())
    except RecursionError:
        raise ConditionError("condition nested too deeply", text, 0) from None


__all__ = ["Columns", "Condition", "ConditionError", "compile_condition", "scalar", "tokenize"]
