"""A model's request-time logic in CEL: derived (on-demand) features and segment rules.

The shape is validated by pydantic; `logic_problems` (run by `checks`) compiles every
expression (type errors, unknown names, non-deterministic functions, size limits).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Annotated, Literal, Protocol

from pydantic import Field, model_validator

from extproc.expressions import ResultType, compile_expression
from extproc.registry.common import FeatureName, Strict
from extproc.registry.patterns import DNS_LABEL

Expr = Annotated[str, Field(min_length=1)]
Weight = Annotated[int, Field(ge=0, le=1_000_000)]


class Derived(Strict):
    """`debt_to_income = features.debt / features.income`: computed after the fetch, injected like a stored feature."""

    name: FeatureName
    expr: Expr
    # The JSON type the model receives; a value of another type is a runtime failure.
    type: Literal["double", "int", "bool", "string"] = "double"


class Rule(Strict):
    """`when` holds → this request goes to `version` (or one of `split`, by weight); first match wins."""

    name: Annotated[str, Field(pattern=DNS_LABEL)] | None = None
    when: Expr
    version: Annotated[str, Field(pattern=DNS_LABEL)] | None = None
    # Version names are checked against the model's versions by `logic_problems`.
    split: dict[str, Weight] | None = None

    @model_validator(mode="after")
    def _one_target(self) -> Rule:
        if (self.version is None) == (self.split is None):
            raise ValueError("declare exactly one of 'version' or 'split'")
        if self.split is not None and not any(self.split.values()):
            raise ValueError("'split' needs at least one weight above 0")
        return self

    def targets(self) -> tuple[tuple[str, int], ...]:
        """(version, weight) pairs: one pair with weight 1 for a pinned version."""
        if self.version is not None:
            return ((self.version, 1),)
        return tuple((self.split or {}).items())


# What a model does with a feature it needs and cannot have (absent from the store, or a derived
# one whose expression failed at run time): refuse, forward marked degraded, or send null.
MissingPolicy = Literal["reject", "forward_degraded", "null"]


class HasLogic(Protocol):
    name: str
    features: tuple[str, ...]
    derived: tuple[Derived, ...]
    rules: tuple[Rule, ...]


def rule_name(rule: Rule, index: int) -> str:
    """The rule's name in metrics, audit and `/models`: declared, else its position."""
    return rule.name or f"rule-{index}"


def expression_scopes(model: HasLogic) -> Iterator[tuple[str, str, str, ResultType, tuple[str, ...]]]:
    """Every expression of a model with what it may read: (field path, label, source, result type,
    feature names visible). A derived feature sees the stored ones and the derived ones before it;
    rules see them all."""
    visible = list(model.features)
    for j, derived in enumerate(model.derived):
        yield f"derived[{j}].expr", f"derived '{derived.name}'", derived.expr, derived.type, tuple(visible)
        visible.append(derived.name)
    for k, rule in enumerate(model.rules):
        yield f"rules[{k}].when", f"rule '{rule_name(rule, k)}'", rule.when, "bool", tuple(visible)


def logic_problems(model: HasLogic, versions: Collection[str]) -> Iterator[tuple[str, str]]:
    """(field path under the model, message naming the model and the expression) for each problem."""
    stored = set(model.features)
    seen: set[str] = set()
    for j, derived in enumerate(model.derived):
        if derived.name in stored or derived.name in seen:
            yield f"derived[{j}].name", f"'{derived.name}' is already a feature of {model.name}"
        seen.add(derived.name)
    names: set[str] = set()
    for k, rule in enumerate(model.rules):
        if rule_name(rule, k) in names:
            yield f"rules[{k}].name", f"duplicate rule name '{rule_name(rule, k)}'"
        names.add(rule_name(rule, k))
        for version, _ in rule.targets():
            if version not in versions:
                where = "version" if rule.version is not None else f"split.{version}"
                yield f"rules[{k}].{where}", f"'{version}' is not a version of {model.name}"
    for path, label, source, result, visible in expression_scopes(model):
        compiled = compile_expression(source, visible, result)
        if isinstance(compiled, str):
            yield path, f"{model.name}: {label} `{source}`: {compiled}"
