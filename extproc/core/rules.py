"""Segment rules: an ordered list of CEL conditions that pin a request to a version (or a sub-split).

Evaluated after the features (stored and derived) are known; the first rule that holds
decides; none holding leaves the choice to Envoy's live weighted split. Pure: the caller
supplies the random draw, so tests and sticky keys can make it deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.expressions import EvaluationError, Expression, Inputs

# Outcomes, also the `outcome` label of model_broker_rules_total.
MATCHED, NO_MATCH, WITHDRAWN, ERROR = "matched", "no_match", "withdrawn", "error"


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    when: Expression
    # (version, weight): one entry pins a version; several are a sub-split.
    split: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class RuleDecision:
    """Which rule decided (None: none held) and the version it pinned (None: Envoy's weights decide)."""

    rule: str | None
    version: str | None
    outcome: str
    # Rules whose condition could not be evaluated (counted as not holding), with why.
    errors: tuple[tuple[str, str], ...] = ()


def pick(split: tuple[tuple[str, int], ...], withdrawn: frozenset[str], draw: float) -> str | None:
    """The version `draw` (in [0, 1)) lands on among the split's versions still in traffic."""
    live = [(version, weight) for version, weight in split if version not in withdrawn and weight > 0]
    total = sum(weight for _, weight in live)
    if not total:
        return None
    point = draw * total
    for version, weight in live:
        point -= weight
        if point < 0:
            return version
    return live[-1][0]


def sticky_draw(key: str) -> float:
    """A stable draw from a sticky key: the same user lands on the same version of a sub-split."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_version(
    rules: tuple[CompiledRule, ...], rows: Sequence[Inputs], withdrawn: frozenset[str], draw: float
) -> RuleDecision:
    """The first rule that holds decides: for every row of `rows` (one request goes to one version, so
    a batch is in a segment when all its rows are). A version taken out of traffic (rolled back, or
    set to 0 live) is never chosen: its rule's request goes to the live weighted split instead."""
    errors: list[tuple[str, str]] = []
    for rule in rules:
        held = _holds(rule.when, rows)
        if isinstance(held, EvaluationError):
            errors.append((rule.name, f"`{rule.when.source}`: {held.message}"))
            continue
        if held:
            version = pick(rule.split, withdrawn, draw)
            outcome = MATCHED if version is not None else WITHDRAWN
            return RuleDecision(rule.name, version, outcome, tuple(errors))
    return RuleDecision(None, None, NO_MATCH, tuple(errors))


def _holds(when: Expression, rows: Sequence[Inputs]) -> bool | EvaluationError:
    """True when `when` holds for every row; the first row that fails to evaluate is an error (named
    by its index in a batch)."""
    for i, inputs in enumerate(rows):
        held = inputs.evaluate(when)
        if isinstance(held, EvaluationError):
            return held if len(rows) == 1 else EvaluationError(f"row {i}: {held.message}")
        if not held:
            return False
    return bool(rows)
