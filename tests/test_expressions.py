"""CEL expressions: what `check` refuses, and what one evaluation yields (pure, no I/O)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from extproc.expressions import (
    MAX_CHARS,
    EvaluationError,
    Expression,
    Inputs,
    ResultType,
    compile_expression,
    settle,
)

DECLARED = ("debt", "income", "segment", "history", "driver:rate")


def compiled(source: str, result: ResultType = "double") -> Expression:
    expression = compile_expression(source, DECLARED, result)
    assert isinstance(expression, Expression), expression
    return expression


@pytest.mark.parametrize(
    ("source", "result", "expected"),
    [
        ("features.debt / features.incme", "double", "unknown feature 'incme' (this model's features: debt"),
        ("features['nope'] > 1.0", "bool", "unknown feature 'nope'"),
        ("now() < now", "bool", "now() is not deterministic"),
        ("random() * 2.0", "double", "random() is not deterministic"),
        ("1 + 'a'", "double", "found no matching overload for '_+_' applied to '(int, string)' (at 1:3)"),
        ("customer.tier == 'gold'", "bool", "undeclared reference to 'customer.tier' (at 1:9)"),
        ("'text'", "double", "the expression returns string, not double"),
        ("features.debt > 1.0", "double", "the expression returns bool, not double"),
        ("features.debt +", "double", "Syntax error"),
        ("size(features) > 2", "bool", "read features by name"),
        (
            "body.items.exists(x, body.items.all(y, x >= y))",
            "bool",
            "comprehensions (all, exists, map, filter) may not nest",
        ),
        ("[" + ", ".join(["features.debt"] * 60) + "].size() > 0", "bool", "nodes; the limit is 100"),
        (" + ".join(["features.debt"] * 40), "double", "Exceeded max recursion depth of 32 when parsing."),
        ("1.0" + " " * MAX_CHARS, "double", f"the limit is {MAX_CHARS}"),
    ],
    ids=[
        "unknown-feature",
        "unknown-feature-index",
        "now-function",
        "random-function",
        "type-error",
        "unknown-name",
        "wrong-result-type",
        "bool-for-double",
        "syntax",
        "features-whole",
        "nested-loop",
        "too-many-nodes",
        "too-deep",
        "too-long",
    ],
)
def test_check_refuses(source: str, result: ResultType, expected: str) -> None:
    """Each kind of bad expression is refused at load with a message saying what is wrong."""
    problem = compile_expression(source, DECLARED, result)
    assert isinstance(problem, str)
    assert expected in problem


def test_reads_are_recorded() -> None:
    """The compiled expression knows the body fields and features it reads (only those are converted)."""
    rule = compiled("body.country == 'DE' || features.segment == 'premium' || features['driver:rate'] > 0.5", "bool")
    assert rule.body_fields == ("country",)
    assert rule.features == ("driver:rate", "segment")
    assert not rule.uses_now
    assert compiled("size(body) > 1", "bool").body_fields is None
    assert compiled("now.getDayOfWeek() in [0, 6]", "bool").uses_now
    # A loop variable named like a variable shadows it; it is not read as the features map.
    assert compiled("features.history.exists(features, features > 1.0)", "bool").features == ("history",)


def evaluate(source: str, result: ResultType, body: dict[str, Any], features: dict[str, Any]) -> Any:
    now = datetime.datetime(2026, 12, 5, 10, 0, tzinfo=datetime.UTC)  # a Saturday
    return Inputs(body, features, now).evaluate(compiled(source, result))


@pytest.mark.parametrize(
    ("source", "result", "features", "expected"),
    [
        ("features.debt / features.income", "double", {"debt": 25000, "income": 100000}, 0.25),
        ("int(features.debt) / 7", "int", {"debt": 700}, 100),
        ("features.debt * 2.0", "int", {"debt": 3}, 6),
        ("features.segment == 'premium'", "bool", {"segment": "premium"}, True),
        ("features.segment.upperAscii()", "string", {"segment": "premium"}, "PREMIUM"),
        ("now.getDayOfWeek() in [0, 6]", "bool", {}, True),
        ("math.greatest(features.debt, 10.0)", "double", {"debt": 3}, 10.0),
        ("has(features.debt) ? features.debt : 0.0", "double", {}, 0.0),
    ],
    ids=["ratio-of-integers", "int", "integral-double-as-int", "bool", "strings-ext", "now", "math-ext", "has"],
)
def test_values(source: str, result: ResultType, features: dict[str, Any], expected: Any) -> None:
    """JSON numbers are doubles (no integer truncation), results come back as the declared JSON type."""
    value = evaluate(source, result, {}, features)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("source", "result", "features", "expected"),
    [
        ("features.debt / features.income", "double", {"debt": 1, "income": 0}, "the result is inf"),
        ("int(features.debt) / int(features.income)", "int", {"debt": 1, "income": 0}, "divide by zero"),
        ("features.debt / features.income", "double", {"debt": 1}, 'missing input: "income"'),
        ("features.segment + 1.0", "double", {"segment": "gold"}, "type mismatch: _+_(string, double)"),
        ("features.segment", "double", {"segment": "gold"}, "the result is str, not double"),
        ("features.debt", "double", {"debt": None}, "the result is null, not double"),
        ("features.debt / 3.0", "int", {"debt": 10}, "is not a whole number"),
        ("features.history.all(x, x >= 0.0)", "bool", {"history": list(range(10_001))}, "Iteration budget exceeded"),
    ],
    ids=[
        "double-div-zero",
        "int-div-zero",
        "missing",
        "type-mismatch",
        "wrong-type",
        "null",
        "fraction-as-int",
        "budget",
    ],
)
def test_runtime_errors(source: str, result: ResultType, features: dict[str, Any], expected: str) -> None:
    """Runtime failures are values naming the cause, never exceptions."""
    value = evaluate(source, result, {}, features)
    assert isinstance(value, EvaluationError)
    assert expected in value.message


def test_settle_refuses_out_of_range() -> None:
    """A double too large for a 64-bit int is an error, not an overflowed number."""
    assert isinstance(settle(1e30, "int"), EvaluationError)
    assert settle(True, "double") == EvaluationError("the result is bool, not double")
