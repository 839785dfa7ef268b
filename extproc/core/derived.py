"""On-demand features: values computed per request from the body and the fetched features.

Each is a CEL expression checked at registry load (`expressions.py`); here they run in
declared order, each seeing the stored features and the derived ones before it.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.expressions import EvaluationError, Expression, Inputs


@dataclass(frozen=True, slots=True)
class DerivedFeature:
    name: str
    expression: Expression
    # Reads a derived feature declared before it: the inputs must be rebuilt first.
    reads_derived: bool = False


@dataclass(frozen=True, slots=True)
class Derivation:
    """The derived values computed, why the others failed, and the inputs last built (for rules)."""

    values: dict[str, Any]
    errors: dict[str, str]
    inputs: Inputs


def read_body(expressions: tuple[Expression, ...]) -> tuple[str, ...] | None:
    """The body fields a set of expressions reads: () for none, None for the whole body."""
    fields: set[str] = set()
    for expression in expressions:
        if expression.body_fields is None:
            return None
        fields.update(expression.body_fields)
    return tuple(sorted(fields))


def body_view(body: Mapping[str, Any], fields: tuple[str, ...] | None) -> Mapping[str, Any]:
    """Only what the expressions read is converted for CEL: a large body costs nothing extra."""
    if fields is None:
        return body
    return {name: body[name] for name in fields if name in body}


def derive(
    derived: tuple[DerivedFeature, ...],
    body: Mapping[str, Any],
    features: Mapping[str, Any],
    now: datetime.datetime | None,
) -> Derivation:
    """Every derived feature in order; a failure is kept with the expression and cause named."""
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    inputs = Inputs(body, features, now)
    for feature in derived:
        if feature.reads_derived:
            inputs = Inputs(body, {**features, **values}, now)
        value = inputs.evaluate(feature.expression)
        if isinstance(value, EvaluationError):
            errors[feature.name] = f"`{feature.expression.source}`: {value.message}"
        else:
            values[feature.name] = value
    return Derivation(values, errors, inputs)
