"""Ensemble answers: what each member did → one JSON answer, its status, and the combiners.

Pure: the fan-out (`fanout.py`) hands over every member's outcome in declared
order; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.core.oip import output_element
from extproc.errors import BrokerError, ErrorCode
from extproc.registry import AggregationMethod

# A shortfall caused only by these is a timing problem (504), not a refusal (502).
TIMEOUT_CODES = frozenset({ErrorCode.UPSTREAM_TIMEOUT, ErrorCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True, slots=True)
class MemberResult:
    """A member that answered 2xx with JSON.

    `request_id` is Envoy's id of the member call and `parent_request_id` the
    client's: what a per-member audit record links by.
    """

    model: str
    version: str
    latency_ms: float
    output: Any
    request_id: str = ""
    parent_request_id: str = ""
    # What the audit records: the member's HTTP status and the features it received.
    status: int | None = None
    features: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class MemberFailure:
    model: str
    error: BrokerError
    latency_ms: float
    request_id: str = ""
    parent_request_id: str = ""
    # None when no answer came (timeout, cut at the deadline, never called).
    status: int | None = None
    features: dict[str, Any] | None = None
    version: str = ""


MemberOutcome = MemberResult | MemberFailure


@dataclass(frozen=True, slots=True)
class Combiner:
    """An ensemble's declared aggregation, compiled once at load."""

    method: AggregationMethod = "all"
    field: str | None = None
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # OIP members: (output tensor, element) read instead of `field`, by model.
    outputs: Mapping[str, tuple[str, int]] = dataclasses.field(default_factory=dict)


def _shown(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(combiner: Combiner, message: str) -> BrokerError:
    return BrokerError(ErrorCode.AGGREGATION_FAILED, f"{combiner.method} over '{combiner.field}': {message}")


def _field_values(combiner: Combiner, results: Sequence[MemberResult]) -> list[tuple[str, Any]] | BrokerError:
    name = combiner.field
    values = []
    for result in results:
        path = combiner.outputs.get(result.model)
        if path is not None:
            value = output_element(result.output, *path)
            if value is None:
                return _fail(combiner, f"{result.model} answered without element {path[1]} of output '{path[0]}'")
            values.append((result.model, value))
        elif not isinstance(result.output, dict) or name not in result.output:
            return _fail(combiner, f"{result.model} answered without '{name}'")
        else:
            values.append((result.model, result.output[name]))
    return values


def _first_success(combiner: Combiner, results: Sequence[MemberResult]) -> dict[str, Any] | BrokerError:
    """Declared order is the priority: the first listed member that answered wins."""
    first = results[0]
    if combiner.field is None:
        return {"value": first.output, "models": [first.model]}
    picked = _field_values(combiner, results[:1])
    return picked if isinstance(picked, BrokerError) else {"value": picked[0][1], "models": [first.model]}


def _majority_vote(combiner: Combiner, results: Sequence[MemberResult]) -> dict[str, Any] | BrokerError:
    values = _field_values(combiner, results)
    if isinstance(values, BrokerError):
        return values
    for model, label in values:
        if not isinstance(label, str):
            return _fail(combiner, f"needs labels (strings); {model} answered {_shown(label)}")
    # Counter keeps first-seen order, so a tie goes to the earliest-declared member's label.
    votes = Counter(label for _, label in values)
    return {"value": max(votes, key=votes.__getitem__), "votes": dict(votes), "models": [m for m, _ in values]}


def _mean(combiner: Combiner, results: Sequence[MemberResult]) -> dict[str, Any] | BrokerError:
    """`mean`, or `weighted_mean` with the members' declared weights renormalised over those that answered."""
    values = _field_values(combiner, results)
    if isinstance(values, BrokerError):
        return values
    for model, value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return _fail(combiner, f"needs numbers; {model} answered {_shown(value)}")
    models = [model for model, _ in values]
    weights = [combiner.weights.get(m, 1.0) if combiner.method == "weighted_mean" else 1.0 for m in models]
    value = sum(w * x for w, (_, x) in zip(weights, values, strict=True)) / sum(weights)
    return {"value": value, "models": models}


_COMBINERS = {
    "mean": _mean,
    "weighted_mean": _mean,
    "majority_vote": _majority_vote,
    "first_success": _first_success,
}


def combine(combiner: Combiner, results: Sequence[MemberResult]) -> dict[str, Any] | BrokerError:
    """The `combined` entry over the members that answered (weights renormalised over them)."""
    found = _COMBINERS[combiner.method](combiner, results)
    if isinstance(found, BrokerError):
        return found
    return {"method": combiner.method, "field": combiner.field, **found}


def shortfall(outcomes: Sequence[MemberOutcome], min_success: int) -> BrokerError | None:
    """Why there are too few answers, or None; 504 only when every failure was a timeout."""
    failures = [o for o in outcomes if isinstance(o, MemberFailure)]
    answered = len(outcomes) - len(failures)
    if answered >= min_success:
        return None
    timed_out = all(f.error.code in TIMEOUT_CODES for f in failures)
    listed = ", ".join(f"{f.model}: {f.error.code.value}" for f in failures)
    return BrokerError(
        ErrorCode.ENSEMBLE_TIMEOUT if timed_out else ErrorCode.ENSEMBLE_FAILED,
        f"{answered} of {len(outcomes)} models answered, {min_success} needed ({listed})",
    )


def ensemble_answer(
    name: str, outcomes: Sequence[MemberOutcome], *, min_success: int, combiner: Combiner, request_id: str
) -> tuple[int, dict[str, Any]]:
    """Status and body: every result and every error, always; `error` as well when not 200."""
    results = [o for o in outcomes if isinstance(o, MemberResult)]
    body: dict[str, Any] = {
        "ensemble": name,
        "results": {r.model: {"version": r.version, "latency_ms": r.latency_ms, "output": r.output} for r in results},
        "errors": {
            o.model: {"code": o.error.code.value, "message": o.error.message}
            for o in outcomes
            if isinstance(o, MemberFailure)
        },
    }
    error = shortfall(outcomes, min_success)
    if combiner.method != "all":
        combined = combine(combiner, results) if error is None else None
        if isinstance(combined, BrokerError):
            error, combined = combined, None
        body["combined"] = combined
    if error is None:
        return 200, body
    body.update(error.to_json(request_id))
    return error.status, body
