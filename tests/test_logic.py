"""Derived features and segment rules as pure functions: the plan from the registry, one request's outcome."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from extproc.core.logic import LogicOutcome, ModelLogic, apply_logic, compile_logic
from extproc.core.missing import DEGRADED_MISSING, settle_missing
from extproc.core.routing import compile_routes, describe_models, withdrawn_versions
from extproc.core.rules import pick, sticky_draw
from extproc.errors import BrokerError, ErrorCode
from extproc.registry import RegistryInvalid, parse_registry
from tests.conftest import demo_registry_doc

DERIVED = [
    {"name": "debt", "expr": "features.debt_ratio * features.income"},
    {"name": "ratio", "expr": "body.amount / body.divisor"},
    {"name": "heavy", "expr": "features.debt > 50000.0", "type": "bool"},
]
RULES = [
    {"name": "germany", "when": "body.country == 'DE'", "version": "v2"},
    {"name": "heavy", "when": "features.heavy", "split": {"v1": 1, "v2": 3}},
]
FEATURES = {"income": 100000, "debt_ratio": 0.6}


def doc_with(**model: Any) -> dict[str, Any]:
    doc = demo_registry_doc()
    doc["models"][0].update(copy.deepcopy(model))
    return doc


def logic(**model: Any) -> ModelLogic:
    plan = compile_logic(parse_registry(doc_with(derived=DERIVED, rules=RULES, **model)).models[0])
    assert plan is not None
    return plan


def run(plan: ModelLogic, body: dict[str, Any], *, withdrawn: frozenset[str] = frozenset(), draw: str = "k") -> Any:
    return apply_logic(plan, body, dict(FEATURES), started_at=0.0, degraded="", withdrawn=withdrawn, sticky=draw)


def problems(**model: Any) -> list[str]:
    with pytest.raises(RegistryInvalid) as refused:
        parse_registry(doc_with(**model))
    return [str(p) for p in refused.value.problems]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"derived": [{"name": "x", "expr": "features.nope"}]}, "models[0].derived[0].expr: credit-risk: derived 'x'"),
        ({"derived": [{"name": "income", "expr": "1.0"}]}, "models[0].derived[0].name: 'income' is already a feature"),
        ({"rules": [{"when": "true", "version": "v9"}]}, "models[0].rules[0].version: 'v9' is not a version"),
        (
            {"rules": [{"when": "true", "split": {"v1": 1, "v7": 1}}]},
            "models[0].rules[0].split.v7: 'v7' is not a version",
        ),
        ({"rules": [{"when": "true", "split": {"v1": 0}}]}, "'split' needs at least one weight above 0"),
        ({"rules": [{"when": "true", "version": "v1", "split": {"v1": 1}}]}, "exactly one of 'version' or 'split'"),
        (
            {"rules": [{"when": "'yes'", "version": "v1"}]},
            "`'yes'`: the expression returns string, not bool",
        ),
        ({"rules": [{"when": "rand() < 0.5", "version": "v1"}]}, "rand() is not deterministic"),
        (
            {"rules": [{"name": "a", "when": "true", "version": "v1"}, {"name": "a", "when": "true", "version": "v2"}]},
            "models[0].rules[1].name: duplicate rule name 'a'",
        ),
        ({"missing_features": None}, "write 'null' in quotes"),
        ({"derived": [{"name": "x", "expr": "features.income", "type": "float"}]}, "models[0].derived[0].type"),
    ],
    ids=[
        "unknown-feature",
        "name-clash",
        "unknown-version",
        "unknown-split-version",
        "zero-split",
        "both-targets",
        "not-bool",
        "non-deterministic",
        "duplicate-rule",
        "bare-null",
        "unknown-type",
    ],
)
def test_check_refuses(model: dict[str, Any], expected: str) -> None:
    """Each bad derived feature or rule is a `check` problem at its field path, naming the model and expression."""
    assert any(expected in p for p in problems(**model)), problems(**model)


def test_rules_only_see_derived_features_declared_before_them() -> None:
    """A derived feature reads only stored features and the derived ones before it."""
    found = problems(derived=[{"name": "a", "expr": "features.b"}, {"name": "b", "expr": "1.0"}])
    assert any("unknown feature 'b'" in p for p in found), found


def test_derived_values_and_the_first_matching_rule() -> None:
    """Derived values join the stored features; the first rule that holds pins its version."""
    outcome = run(logic(), {"amount": 10, "divisor": 4, "country": "DE"})
    assert isinstance(outcome, LogicOutcome)
    assert outcome.features == {**FEATURES, "debt": 60000.0, "ratio": 2.5, "heavy": True}
    assert outcome.derived == {"debt": 60000.0, "ratio": 2.5, "heavy": True}
    assert outcome.decision is not None
    assert (outcome.decision.rule, outcome.decision.version, outcome.decision.outcome) == ("germany", "v2", "matched")


def test_a_rule_on_a_derived_feature_and_no_match() -> None:
    """A rule may read a derived feature; when none holds, no version is pinned."""
    plan = logic()
    matched = run(plan, {"amount": 10, "divisor": 4, "country": "FR"})
    assert isinstance(matched, LogicOutcome) and matched.decision is not None
    assert matched.decision.rule == "heavy" and matched.decision.version in {"v1", "v2"}
    poorer = apply_logic(
        plan, {"amount": 1, "divisor": 1, "country": "FR"}, {"income": 1000, "debt_ratio": 0.1},
        started_at=0.0, degraded="", withdrawn=frozenset(), sticky=None,
    )  # fmt: skip
    assert isinstance(poorer, LogicOutcome) and poorer.decision is not None
    assert (poorer.decision.rule, poorer.decision.version, poorer.decision.outcome) == (None, None, "no_match")


def test_a_failed_condition_counts_as_not_holding() -> None:
    """A rule whose condition cannot be evaluated is skipped and reported; the next one may still hold."""
    plan = logic()
    outcome = run(plan, {"amount": 10, "divisor": 4})  # no `country`: rule 'germany' fails
    assert isinstance(outcome, LogicOutcome) and outcome.decision is not None
    assert outcome.decision.rule == "heavy"
    assert outcome.decision.errors[0][0] == "germany" and 'missing input: "country"' in outcome.decision.errors[0][1]


def test_withdrawn_versions_are_never_pinned() -> None:
    """A rule naming a version out of traffic falls to the live split; a sub-split keeps its live versions."""
    plan = logic()
    pinned = run(plan, {"amount": 1, "divisor": 1, "country": "DE"}, withdrawn=frozenset({"v2"}))
    assert isinstance(pinned, LogicOutcome) and pinned.decision is not None
    assert (pinned.decision.version, pinned.decision.outcome) == (None, "withdrawn")
    split = run(plan, {"amount": 1, "divisor": 1, "country": "FR"}, withdrawn=frozenset({"v2"}))
    assert isinstance(split, LogicOutcome) and split.decision is not None
    assert split.decision.version == "v1"


@pytest.mark.parametrize(
    ("draw", "expected"), [(0.0, "v1"), (0.2499, "v1"), (0.25, "v2"), (0.9999, "v2")], ids=["0", "edge-", "edge", "top"]
)
def test_pick_follows_the_weights(draw: float, expected: str) -> None:
    """A draw in [0, 1) lands on the versions in proportion to their weights (1:3 here)."""
    assert pick((("v1", 1), ("v2", 3)), frozenset(), draw) == expected


def test_sticky_draws_are_stable_and_spread() -> None:
    """The same key always draws the same number; many keys spread over [0, 1)."""
    assert sticky_draw("user-1") == sticky_draw("user-1")
    draws = [sticky_draw(f"user-{i}") for i in range(2000)]
    assert 0.45 < sum(d < 0.5 for d in draws) / 2000 < 0.55


@pytest.mark.parametrize(
    ("policy", "expected", "degraded"),
    [
        ("forward_degraded", {"income": 1}, DEGRADED_MISSING),
        ("null", {"income": 1, "ratio": None}, ""),
    ],
    ids=["forward-degraded", "null"],
)
def test_missing_features_policy(policy: Any, expected: dict[str, Any], degraded: str) -> None:
    """Forwarded without the feature and marked degraded, or sent with null."""
    assert settle_missing(policy, {"income": 1, "ratio": 2.0}, {"ratio": "`x`: divide by zero"}) == (expected, degraded)


def test_missing_features_reject_names_feature_and_cause() -> None:
    """`reject` is a 422 naming every failed feature with its expression and cause."""
    settled, _ = settle_missing("reject", {"a": 1}, {"ratio": "`body.amount / body.divisor`: divide by zero"})
    assert isinstance(settled, BrokerError) and settled.code is ErrorCode.MISSING_FEATURES and settled.status == 422
    assert "'ratio': `body.amount / body.divisor`: divide by zero" in settled.message


def test_degraded_requests_leave_failed_features_out() -> None:
    """A request already degraded by the store policy is not refused for derived features it cannot have."""
    outcome = apply_logic(
        logic(), {"amount": 1, "divisor": 0}, {}, started_at=0.0, degraded="unknown_entity",
        withdrawn=frozenset(), sticky=None,
    )  # fmt: skip
    assert isinstance(outcome, LogicOutcome)
    assert outcome.degraded == "unknown_entity" and "ratio" not in outcome.features
    assert set(outcome.derived_errors) == {"debt", "ratio", "heavy"}


def test_withdrawn_means_live_zero_where_the_registry_gave_weight() -> None:
    """Rolled back (declared > 0, live 0) is withdrawn; declared 0 (rules-only) is not."""
    declared = parse_registry(doc_with(derived=DERIVED, rules=RULES)).models[0]
    versions = tuple(v.model_copy(update={"weight": 0 if v.name == "v2" else 100}) for v in declared.versions)
    live = declared.model_copy(update={"versions": versions})
    assert withdrawn_versions(live, declared) == frozenset({"v2"})
    assert withdrawn_versions(declared, declared) == frozenset()


def test_models_document_and_routes_carry_the_logic() -> None:
    """`GET /models` lists derived features and rules; the compiled route holds the plan."""
    registry = parse_registry(doc_with(derived=DERIVED, rules=RULES, missing_features="null"))
    described = describe_models(registry)["models"][0]
    assert described["derived"][2] == {"name": "heavy", "expr": "features.debt > 50000.0", "type": "bool"}
    assert described["rules"] == [
        {"name": "germany", "when": "body.country == 'DE'", "version": "v2"},
        {"name": "heavy", "when": "features.heavy", "split": {"v1": 1, "v2": 3}},
    ]
    assert described["missing_features"] == "null"
    route = compile_routes(registry)["credit-risk"]
    assert route.logic is not None and [r.name for r in route.logic.rules] == ["germany", "heavy"]
    assert route.logic.body_fields == ("amount", "country", "divisor")
