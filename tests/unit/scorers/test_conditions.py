"""The segment condition language: parsing, null semantics, hysteresis, vectorised evaluation."""

from __future__ import annotations

import builtins
import math
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scorers.conditions import Columns, Condition, ConditionError, compile_condition

NAN = float("nan")


def ev(text: str, slack: dict[str, float] | None = None, **values: Any) -> bool:
    return compile_condition(text).evaluate(values, slack)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "values", "expected"), [
    ("a > 1 or b > 1 and c > 1", {"a": 2, "b": 0, "c": 0}, True),  # and binds tighter
    ("(a > 1 or b > 1) and c > 1", {"a": 2, "b": 0, "c": 0}, False),
    ("not a > 1 and b > 1", {"a": 0, "b": 2}, True),  # not binds tighter than and
    ("not (a > 1 and b > 1)", {"a": 2, "b": 0}, True),
    ("a + b * 2 == 7", {"a": 1, "b": 3}, True),  # * before +
    ("(a + b) * 2 == 8", {"a": 1, "b": 3}, True),
    ("a - b - 1 == 0", {"a": 3, "b": 2}, True),  # left associative
    ("a / b / 2 == 1", {"a": 8, "b": 4}, True),
    ("-a < -2", {"a": 3}, True),
    ("a between 1 and 3 and b in [1, 2]", {"a": 3, "b": 2}, True),
    ("a not between 1 and 3", {"a": 4}, True),
    ("a not in [1, 2]", {"a": 2}, False),
    ("A > 1 AND NOT (b Is NuLL)", {"A": 2, "b": 0}, True),  # keywords are case-insensitive
    ("true and not false", {}, True),
    ("rfm in ['555', \"554\"]", {"rfm": "554"}, True),
    ("s == 'it\\'s'", {"s": "it's"}, True),
    ("x >= 1e3 and x < .5e4", {"x": 1000}, True),
    ("(((x > 1)))", {"x": 2}, True),
])
def test_precedence_and_forms(text: str, values: dict[str, Any], expected: bool) -> None:
    assert compile_condition(text).evaluate(values) is expected


@pytest.mark.parametrize(("text", "column", "fragment"), [
    ("x >", 4, "expected a value"),
    ("x > 3 and", 10, "expected a value"),
    ("(x > 3", 7, "expected ')'"),
    ("x = 3", 3, "'=='"),
    ("x > 3 )", 7, "unexpected ')'"),
    ("'abc", 1, "unterminated string"),
    ("x @ 3", 3, "unexpected character '@'"),
    ("1 < x < 3", 7, "chained"),
    ("x", 1, "is a value, not a condition"),
    ("x + 1 and y > 2", 1, "is a value"),
    ("x in [y]", 7, "numbers and strings only"),
    ("x is 3", 6, "'null'"),
    ("x == null", 6, "is null"),
    ("x > 'a' + 1", 5, "arithmetic needs numbers"),
    ("'a' < 3", 5, "string with a number"),
    ("x between 1 or 2", 13, "'and'"),
    ("(x > 1) + 2 > 3", 1, "expected a value, found a condition"),
    ("", 1, "empty"),
    ("x > 1 x", 7, "unexpected 'x'"),
])
def test_errors_name_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(ConditionError) as info:
        compile_condition(text)
    assert info.value.column == column
    assert fragment in str(info.value)
    assert str(info.value).endswith(f"at column {column}")


def test_unknown_name_is_named_with_its_column_and_a_suggestion() -> None:
    with pytest.raises(ConditionError, match=r"unknown name 'recency' \(did you mean "
                                            r"'recency_days'\?\) at column 15"):
        compile_condition("rfm_r > 1 and recency > 3", known={"rfm_r", "recency_days"})
    assert compile_condition("rfm_r > 1", known={"rfm_r"}).names == {"rfm_r"}


@pytest.mark.parametrize("text", [
    "__import__('os')",
    "__import__('os').system('touch pwned')",
    "open('/etc/passwd')",
    "eval('1')",
    "x.__class__",
    "().__class__.__bases__",
    "lambda: 1",
    "[c for c in x]",
    "x if y else z",
    "x ** 2 > 1",
    "x; y",
    "`x`",
    "x[0] > 1",
])
def test_code_is_never_executed(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: Any, **__: Any) -> Any:
        raise AssertionError("eval/exec must never be called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    with pytest.raises(ConditionError):
        compile_condition(text)


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(ConditionError, match="nested too deeply"):
        compile_condition("(" * 500 + "x > 1" + ")" * 500)
    with pytest.raises(ConditionError):
        compile_condition("-" * 5000 + "x > 1")
    with pytest.raises(ConditionError, match="longer than"):
        compile_condition("x > 1 and " * 2000 + "x > 1")


@pytest.mark.parametrize("open_,close", [("(", ")"), ("not ", ""), ("-", "")])
def test_64_levels_of_parentheses_not_or_minus_are_accepted_and_65_refused(
        open_: str, close: str) -> None:
    """README: "at most 64 levels of parentheses and `not`" (a unary minus is a level too).
    An even number of `not` or `-` is the plain comparison."""
    c = compile_condition(open_ * 64 + "x > 1" + close * 64)
    assert [c.evaluate({"x": v}) for v in (2.0, 0.0)] == [True, False]
    assert c.evaluate_columns(Columns({"x": [2.0, 0.0]}, 2)).tolist() == [True, False]
    assert "x=2" in c.explain({"x": 2.0})
    with pytest.raises(ConditionError, match="nested too deeply"):
        compile_condition(open_ * 65 + "x > 1" + close * 65)


def test_long_arithmetic_chains_are_an_error_at_compile_time_not_at_evaluation() -> None:
    # Evaluation recurses through the operands of each operation: a chain the parser
    # accepts must evaluate (also as columns and explained), and a longer one is refused.
    ok = compile_condition(" + ".join(["x"] * 65) + " > 1")  # 64 operations
    assert ok.evaluate({"x": 1.0}) is True
    assert ok.evaluate_columns(Columns({"x": [1.0, 0.0]}, 2)).tolist() == [True, False]
    assert ok.explain({"x": 1.0}).startswith("x=1 + x=1 + x=1")
    with pytest.raises(ConditionError, match="expression nested too deeply"):
        compile_condition(" + ".join(["x"] * 66) + " > 1")
    with pytest.raises(ConditionError, match="expression nested too deeply"):
        compile_condition("x > " + " * ".join(["2"] * 500))
    with pytest.raises(ConditionError, match="nested too deeply"):
        compile_condition("-(" * 40 + "x" + ")" * 40 + " > 1")


def test_names_collects_every_reference() -> None:
    c = compile_condition("a > 1 and (b + c) / 2 between d and 3 or e in [1] or f is null")
    assert c.names == {"a", "b", "c", "d", "e", "f"}
    assert str(c).startswith("a > 1")


# ---------------------------------------------------------------- null semantics


@pytest.mark.parametrize("null", [None, NAN, np.float64("nan"), "missing"])
def test_comparisons_with_null_are_false_and_their_negation_true(null: Any) -> None:
    values = {} if null == "missing" else {"x": null}
    for text in ("x > 3", "x <= 3", "x == 3", "x != 3", "x between 1 and 5", "x in [1, 3]",
                 "x + 1 > 0", "0 < x"):
        c = compile_condition(text)
        assert c.evaluate(values) is False, text
        assert compile_condition(f"not ({text})").evaluate(values) is True, text
    assert compile_condition("x is null").evaluate(values)
    assert not compile_condition("x is not null").evaluate(values)
    assert compile_condition("x is not null and x <= 3 or x is null").evaluate(values)


def test_division_by_zero_and_mixed_types_are_null_like() -> None:
    assert not ev("x / y > 0", x=1, y=0)
    assert ev("x / y is null", x=1, y=0)
    assert ev("(x - x) / (y - y) is null", x=float("inf"), y=1)
    assert not ev("cluster == 3", cluster="3")
    assert not ev("cluster != 3", cluster="3")
    assert ev("cluster < 'b'", cluster="a")
    assert ev("x == 1", x=True)
    assert ev("x is null", x=[1, 2])  # not a number or a string: null


# ---------------------------------------------------------------- hysteresis


def test_slack_relaxes_thresholds_toward_true() -> None:
    s = {"x": 5.0}
    assert not ev("x >= 30", x=26)
    assert ev("x >= 30", s, x=26)
    assert not ev("x >= 30", s, x=24)
    assert ev("x < 10", s, x=14)
    assert ev("30 <= x", s, x=26)  # the name may stand on either side
    assert ev("x between 10 and 20", s, x=6)
    assert ev("x between 10 and 20", s, x=24)
    assert not ev("x between 10 and 20", s, x=26)


def test_slack_under_negation_moves_the_other_way() -> None:
    s = {"x": 5.0}
    # not (x >= 30) is made more likely true by making x >= 30 harder: threshold 35.
    assert ev("not (x >= 30)", s, x=33)
    assert not ev("not (x >= 30)", x=33)
    assert not ev("not (x >= 30)", s, x=36)
    assert ev("not not (x >= 30)", s, x=26)
    # negated between narrows: x in [15, 15] counts as "between" only at 15.
    assert ev("x not between 10 and 20", s, x=12)
    assert not ev("x not between 10 and 20", s, x=15)


def test_slack_leaves_equality_in_and_null_alone() -> None:
    s = {"x": 5.0, "s": 3.0}
    assert not ev("x == 30", s, x=29)
    assert not ev("x != 30", s, x=30)
    assert not ev("x in [30]", s, x=29)
    assert not ev("x >= 30", s, x=None)
    assert not ev("s >= 'b'", s, s="a")


def test_slack_uses_the_largest_amount_of_the_names_in_an_atom() -> None:
    s = {"f": 0.5, "m": 1.0}
    assert ev("(f + m) / 2 >= 4", s, f=3, m=4)
    assert not ev("(f + m) / 2 >= 4", {"other": 9.0}, f=3, m=4)


# ---------------------------------------------------------------- explain


def test_explain_names_the_deciding_atoms_with_values() -> None:
    c = compile_condition("recency_days >= 30 and rfm_f >= 4")
    assert c.explain({"recency_days": 45, "rfm_f": 4}) == "recency_days=45 >= 30 and rfm_f=4 >= 4"
    assert c.explain({"recency_days": 5, "rfm_f": 4}) == "not (recency_days=5 >= 30)"
    c = compile_condition("a > 1 or b is null or x in ['p', 'q']")
    assert c.explain({"a": 0, "b": None}) == "b is null"
    assert c.explain({"a": 0, "b": 1, "x": None}) == (
        "not (a=0 > 1) and b=1 is not null and not (x=null in ['p', 'q'])")
    c = compile_condition("(f + m) / 2 >= 4")
    assert c.explain({"f": 4, "m": 4.5}) == "(f=4 + m=4.5) / 2 >= 4"
    assert c.explain({"f": 3, "m": 4}, {"f": 0.5}) == "(f=3 + m=4) / 2 >= 4 (within hysteresis 0.5)"
    assert compile_condition("s == 'a\"b'").explain({"s": 'a"b'}) == 's="a\\"b" == \'a"b\''


# ---------------------------------------------------------------- vectorised == row by row


NUM_NAMES = ("x", "y")
num_literal = st.sampled_from(["0", "1", "2.5", "-1", "3", "1e300"])
num_value = st.recursive(
    st.one_of(st.sampled_from(NUM_NAMES), num_literal),
    lambda inner: st.tuples(inner, st.sampled_from("+-*/"), inner).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})"),
    max_leaves=3,
)
atoms = st.one_of(
    st.tuples(num_value, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), num_value).map(
        " ".join),
    st.tuples(num_value, num_value, num_value).map(
        lambda t: f"{t[0]} between {t[1]} and {t[2]}"),
    st.tuples(num_value, st.lists(num_literal, min_size=1, max_size=3)).map(
        lambda t: f"{t[0]} in [{', '.join(t[1])}]"),
    num_value.map(lambda v: f"{v} is null"),
    num_value.map(lambda v: f"{v} is not null"),
    st.sampled_from(['s == "a"', 's != "b"', 's in ["a", 1]', 's < "b"', "s > 1", "s is null",
                     "true", "false", "s >= x"]),
)
conditions = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda c: f"not ({c})"),
    ),
    max_leaves=6,
)
numbers = st.one_of(
    st.sampled_from([None, NAN, 0, 1, 2, 2.5, 3, -1, 30, float("inf")]),
    st.floats(-10, 10),
    st.integers(-5, 5),
)
texts = st.sampled_from([None, "a", "b", "c", 1.0, NAN])
rows = st.fixed_dictionaries({"x": numbers, "y": numbers, "s": texts})
slacks = st.one_of(st.none(), st.dictionaries(st.sampled_from(["x", "y", "s"]),
                                              st.floats(0, 5)))


def _numeric(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


@settings(max_examples=300, deadline=None)
@given(text=conditions, data=st.lists(rows, min_size=1, max_size=12), slack=slacks,
       as_objects=st.booleans())
def test_evaluate_columns_matches_evaluate_row_by_row(
        text: str, data: list[dict[str, Any]], slack: dict[str, float] | None,
        as_objects: bool) -> None:
    c = compile_condition(text)
    xs = [r["x"] for r in data]
    columns: dict[str, Any] = {
        "x": np.array(xs, dtype=object) if as_objects else _numeric(xs),
        "y": _numeric([r["y"] for r in data]),
        "s": np.array([r["s"] for r in data], dtype=object),
    }
    got = c.evaluate_columns(columns, slack)
    assert got.dtype == np.bool_
    assert got.tolist() == [c.evaluate(r, slack) for r in data]


@settings(max_examples=300, deadline=None)
@given(text=conditions, data=st.lists(rows, min_size=1, max_size=12), slack=slacks)
def test_evaluate_columns_of_plain_lists_matches_evaluate(
        text: str, data: list[dict[str, Any]], slack: dict[str, float] | None) -> None:
    """Columns given as lists, as a caller has them: a list mixing text and numbers
    (["a", 1.0]) kept its numbers as numbers (numpy alone makes "1.0" of them)."""
    c = compile_condition(text)
    columns = {k: [r[k] for r in data] for k in ("x", "y", "s")}
    assert c.evaluate_columns(columns, slack).tolist() == [c.evaluate(r, slack) for r in data]
    mixed = compile_condition("s > 0.5")
    assert mixed.evaluate_columns({"s": ["a", 1.0]}).tolist() == [False, True]
    with pytest.raises(ValueError, match="shape"):  # a string is one value, not a column
        mixed.evaluate_columns({"s": "ab"}, size=2)


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(conditions, min_size=1, max_size=4),
       data=st.lists(rows, min_size=1, max_size=12), slack=slacks)
def test_one_set_of_columns_serves_many_conditions(
        texts: list[str], data: list[dict[str, Any]], slack: dict[str, float] | None) -> None:
    """Columns are shared by every condition of a catalogue and by the hysteresis pass,
    so what one evaluation keeps in them (arithmetic columns) must not change another's.
    """
    columns = Columns({"x": _numeric([r["x"] for r in data]),
                       "y": _numeric([r["y"] for r in data]),
                       "s": np.array([r["s"] for r in data], dtype=object)}, len(data))
    for text in texts * 2:
        c = compile_condition(text)  # new nodes each time: ids may be reused
        for sl in (None, slack):
            assert c.evaluate_columns(columns, sl).tolist() == [c.evaluate(r, sl) for r in data]


def test_evaluate_columns_edge_cases() -> None:
    c = compile_condition("x > 1 or z is null")
    assert c.evaluate_columns({"x": [0.0, 2.0]}).tolist() == [True, True]  # z missing: null
    assert compile_condition("true").evaluate_columns({}, size=3).tolist() == [True] * 3
    with pytest.raises(ValueError, match="row count"):
        compile_condition("true").evaluate_columns({})
    with pytest.raises(ValueError, match="differ in length"):
        c.evaluate_columns({"x": [1.0], "z": [1.0, 2.0]})
    strings = compile_condition("rfm in ['555']").evaluate_columns({"rfm": ["555", "455"]})
    assert strings.tolist() == [True, False]


def test_condition_is_immutable_and_reusable() -> None:
    c = compile_condition("x > 1")
    assert isinstance(c, Condition)
    with pytest.raises(AttributeError):
        c.text = "y"  # type: ignore[misc]
    assert [c.evaluate({"x": v}) for v in (0, 2, math.inf)] == [False, True, True]


_SHOWN = re.compile(r"^(not \()?x=(\S+) (<|<=|>|>=|==|!=) (?:y=)?(\S+?)\)?$")


@given(st.floats(-1e6, 1e6, allow_nan=False), st.floats(-1e6, 1e6, allow_nan=False),
       st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), st.booleans(),
       st.integers(0, 6))
@settings(max_examples=400, deadline=None)
def test_a_reason_is_true_of_the_values_it_shows(a: float, b: float, op: str,
                                                 literal: bool, near: int) -> None:
    """A reason names the values that decided: read back as shown, the comparison comes out
    as it did on the values themselves (104.99 < 105 was shown as "105 < 105")."""
    if near:  # values within a few units of the last shown digit of each other
        b = float(f"{a:.4g}") + (near - 3) * 10.0 ** (math.floor(math.log10(abs(a) or 1)) - 5)
    right = repr(b) if literal else "y"
    c = compile_condition(f"x {op} {right}")
    env = {"x": a, "y": b}
    m = _SHOWN.match(c.explain(env))
    assert m is not None, c.explain(env)
    shown_a, shown_b = float(m.group(2)), float(m.group(4))
    holds = {"<": shown_a < shown_b, "<=": shown_a <= shown_b, ">": shown_a > shown_b,
             ">=": shown_a >= shown_b, "==": shown_a == shown_b, "!=": shown_a != shown_b}[op]
    assert holds == c.evaluate(env) == (m.group(1) is None), c.explain(env)


@pytest.mark.parametrize("text,env,want", [
    ("spend_7d < 105", {"spend_7d": 104.99}, "spend_7d=104.99 < 105"),
    ("spend_7d > 2000", {"spend_7d": 2000.001}, "spend_7d=2000.001 > 2000"),
    ("p_alive < 0.3", {"p_alive": 0.29996}, "p_alive=0.29996 < 0.3"),
    # four digits where they tell the truth
    ("p_alive < 0.3", {"p_alive": 0.123456}, "p_alive=0.1235 < 0.3"),
    ("x between 1 and 2", {"x": 2.00001}, "not (x=2.00001 between 1 and 2)"),
    ("x in [1, 2]", {"x": 1.000001}, "not (x=1.000001 in [1, 2])"),
])
def test_reasons_show_as_many_digits_as_the_comparison_needs(text: str, env: dict[str, Any],
                                                             want: str) -> None:
    assert compile_condition(text).explain(env) == want


_SHOWN_DIFF = re.compile(r"^(not \()?x=(\S+) - y=(\S+) (<|<=|>|>=|==|!=) (\S+?)\)?$")


@given(st.floats(-1e6, 1e6, allow_nan=False), st.floats(-1e3, 1e3, allow_nan=False),
       st.floats(-10, 10, allow_nan=False), st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
@settings(max_examples=300, deadline=None)
def test_a_reason_with_arithmetic_is_true_of_the_operands_it_shows(x: float, dy: float,
                                                                   c: float, op: str) -> None:
    """The operands of arithmetic are what a reason shows: computed back from them, the
    comparison comes out as it did (``x=100 - y=100 > 0.02`` for 100.04 and 100.01)."""
    cond = compile_condition(f"x - y {op} {c!r}")
    env = {"x": x, "y": x - dy}
    m = _SHOWN_DIFF.match(cond.explain(env))
    assert m is not None, cond.explain(env)
    got = float(m.group(2)) - float(m.group(3))
    want = float(m.group(5))
    holds = {"<": got < want, "<=": got <= want, ">": got > want, ">=": got >= want,
             "==": got == want, "!=": got != want}[m.group(4)]
    assert holds == cond.evaluate(env) == (m.group(1) is None), cond.explain(env)


@pytest.mark.parametrize("text,env,want", [
    ("x - y > 0.02", {"x": 100.04, "y": 100.01}, "x=100.04 - y=100.01 > 0.02"),
    ("x - y > 0", {"x": 1000.004, "y": 999.999}, "x=1000.004 - y=999.999 > 0"),
    ("(rfm_f + rfm_m) / 2 >= 4", {"rfm_f": 3.0, "rfm_m": 5.0}, "(rfm_f=3 + rfm_m=5) / 2 >= 4"),
])
def test_reasons_with_arithmetic_show_the_digits_the_result_needs(
        text: str, env: dict[str, Any], want: str) -> None:
    assert compile_condition(text).explain(env) == want
