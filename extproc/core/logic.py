"""A model's request-time logic: derived features, then segment rules, compiled once per registry.

`compile_logic` builds the plan from a registry model `check` already accepted (every
expression compiles; the programs are cached, so this costs nothing twice);
`apply_logic` runs it for one request.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc import metrics
from extproc.core.derived import Derivation, DerivedFeature, body_view, derive, read_body
from extproc.core.missing import settle_missing
from extproc.core.rules import CompiledRule, RuleDecision, choose_version, sticky_draw
from extproc.errors import BrokerError
from extproc.expressions import Expression, Inputs, compile_expression
from extproc.registry import MissingPolicy, Model, expression_scopes, rule_name


@dataclass(frozen=True, slots=True)
class ModelLogic:
    derived: tuple[DerivedFeature, ...]
    rules: tuple[CompiledRule, ...]
    missing_features: MissingPolicy
    # The body fields any expression reads (None: the whole body); whether any reads `now`.
    body_fields: tuple[str, ...] | None
    uses_now: bool
    # A rule reads a derived feature: its inputs are rebuilt after derivation.
    rules_read_derived: bool
    # OIP models: the client input tensors read (`body.inputs.<name>`); None for all of them.
    body_inputs: tuple[str, ...] | None = ()


def compile_logic(model: Model) -> ModelLogic | None:
    """The compiled plan, or None when the model has neither derived features nor rules."""
    if not model.derived and not model.rules:
        return None
    programs: list[Expression] = []
    for path, _, source, result, visible in expression_scopes(model):
        compiled = compile_expression(source, visible, result)
        if isinstance(compiled, str):  # parse_registry refused this registry already
            raise ValueError(f"{model.name}.{path}: {compiled}")
        programs.append(compiled)
    derived_names = {d.name for d in model.derived}
    derived = tuple(
        DerivedFeature(spec.name, program, bool(derived_names & set(program.features)))
        for spec, program in zip(model.derived, programs, strict=False)
    )
    rule_programs = programs[len(model.derived) :]
    rules = tuple(
        CompiledRule(rule_name(spec, k), program, spec.targets())
        for k, (spec, program) in enumerate(zip(model.rules, rule_programs, strict=True))
    )
    return ModelLogic(
        derived=derived,
        rules=rules,
        missing_features=model.missing_features,
        body_fields=read_body(tuple(programs)),
        uses_now=any(p.uses_now for p in programs),
        rules_read_derived=any(derived_names & set(r.when.features) for r in rules),
        body_inputs=_inputs_read(programs),
    )


def _inputs_read(programs: list[Expression]) -> tuple[str, ...] | None:
    names: set[str] = set()
    for program in programs:
        if program.body_fields is None or "inputs" in program.opaque_fields:
            return None
        names.update(name for section, name in program.body_paths if section == "inputs")
    return tuple(sorted(names))


def _derive(
    logic: ModelLogic, doc: Mapping[str, Any], features: dict[str, Any], started_at: float
) -> tuple[Derivation, dict[str, Any], datetime.datetime | None]:
    now = datetime.datetime.fromtimestamp(started_at, datetime.UTC) if logic.uses_now else None
    derivation = derive(logic.derived, body_view(doc, logic.body_fields), features, now)
    return derivation, {**features, **derivation.values}, now


def derived_features(
    logic: ModelLogic, doc: Mapping[str, Any], features: dict[str, Any], *, started_at: float, degraded: str
) -> dict[str, Any] | BrokerError:
    """Stored plus derived features after the missing-features policy, without the rules: an ensemble
    member is called through its egress route, whose weighted split decides its version."""
    if not logic.derived:
        return features
    derivation, merged, _ = _derive(logic, doc, features, started_at)
    if degraded:
        return merged
    settled, _ = settle_missing(logic.missing_features, merged, derivation.errors)
    return settled


@dataclass(frozen=True, slots=True)
class LogicOutcome:
    """The features to inject (stored + derived, after the missing-features policy), why they are
    degraded (or ""), the derived values and failures (for the audit), and the rule decision."""

    features: dict[str, Any]
    degraded: str
    derived: dict[str, Any]
    derived_errors: dict[str, str]
    decision: RuleDecision | None


def apply_logic(
    logic: ModelLogic,
    doc: Mapping[str, Any],
    features: dict[str, Any],
    *,
    started_at: float,
    degraded: str,
    withdrawn: frozenset[str],
    sticky: str | None,
) -> LogicOutcome | BrokerError:
    """Derive, settle failures by the model's policy, then let the rules pick a version.

    A request already degraded (store down under fail_open, unknown entity forwarded) has no
    stored features to derive from: derived features that fail are left out, not refused.
    """
    derivation, merged, now = _derive(logic, doc, features, started_at)
    body = body_view(doc, logic.body_fields)
    settled: dict[str, Any] | BrokerError = merged
    if not degraded:
        settled, degraded = settle_missing(logic.missing_features, merged, derivation.errors)
    if isinstance(settled, BrokerError):
        return settled
    decision = None
    if logic.rules:
        inputs = Inputs(body, merged, now) if logic.rules_read_derived else derivation.inputs
        # A sticky key lands on the same version of a sub-split every time; otherwise a random draw.
        draw = sticky_draw(sticky) if sticky is not None else random.random()  # a traffic split, not a secret
        decision = choose_version(logic.rules, (inputs,), withdrawn, draw)
    return LogicOutcome(settled, degraded, derivation.values, derivation.errors, decision)


def audit_rule(decision: RuleDecision | None) -> dict[str, Any] | None:
    """The rule decision as the audit record keeps it; None for a model without rules."""
    if decision is None:
        return None
    return {
        "name": decision.rule,
        "outcome": decision.outcome,
        "version": decision.version,
        "errors": dict(decision.errors),
    }


def record_logic(model: str, failed_features: Iterable[str], decision: RuleDecision | None) -> None:
    """Count one request's derived-feature failures and rule decision, on JSON and OIP routes alike."""
    metrics.record_logic(
        model,
        failed_features,
        decision.rule if decision is not None else None,
        decision.outcome if decision is not None else None,
        (rule for rule, _ in decision.errors) if decision is not None else (),
    )
