"""Derived features and segment rules on an OIP request: one CEL view of the request per row.

On an `open_inference` model `body` is `{"inputs": {<tensor>: this row's value}, "parameters":
<the request's parameters>}`. Derived features are computed per row (each row its own value,
injected as tensors by `infer.feature_tensors`); a rule holds for the request when it holds
for every row, since one request goes to one version. Pure, like the rest of `oip/`.
"""

from __future__ import annotations

import datetime
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.core.derived import derive
from extproc.core.logic import ModelLogic
from extproc.core.missing import settle_missing
from extproc.core.oip.tensors import flatten
from extproc.core.rules import RuleDecision, choose_version, sticky_draw
from extproc.errors import BrokerError
from extproc.expressions import Inputs

Row = Mapping[str, Any]


def row_values(tensor: Mapping[str, Any], rows: int) -> list[Any]:
    """Each row's part of one input tensor: a scalar for [N] or [N, 1], a list for [N, k, ...];
    a tensor whose first dimension is not the row count gives every row its whole (flat) data."""
    data = flatten(tensor["data"])
    shape = tensor["shape"]
    if not shape or shape[0] != rows:
        return [data] * rows
    width = math.prod(shape[1:])
    if width == 1:
        return data
    return [data[i * width : (i + 1) * width] for i in range(rows)]


def row_bodies(doc: Mapping[str, Any], rows: int, inputs: tuple[str, ...] | None) -> list[dict[str, Any]]:
    """`body` for each row: the client's input tensors the expressions read (`inputs`; None for all),
    each at that row, and the request's parameters."""
    parameters = doc.get("parameters") or {}
    columns = {
        tensor["name"]: row_values(tensor, rows)
        for tensor in doc["inputs"]
        if inputs is None or tensor["name"] in inputs
    }
    return [
        {"inputs": {name: values[i] for name, values in columns.items()}, "parameters": parameters} for i in range(rows)
    ]


def member_view(key_input: str | None, key: str) -> dict[str, Any]:
    """`body` for an ensemble's call to an OIP member: the one row the broker sends (its key only)."""
    return {"inputs": {key_input: key} if key_input is not None else {}, "parameters": {}}


@dataclass(frozen=True, slots=True)
class OipLogicOutcome:
    """Each row's features with its derived ones, the derived values and failures by entity key (for the
    audit), and the rule decision."""

    rows: list[dict[str, Any]]
    derived: dict[str, dict[str, Any]]
    derived_errors: dict[str, dict[str, str]]
    decision: RuleDecision | None

    @property
    def failed_features(self) -> dict[str, str]:
        """Each derived feature that failed on some row, with one cause (for the failure metric)."""
        return {name: why for errors in self.derived_errors.values() for name, why in errors.items()}


def apply_oip_logic(
    logic: ModelLogic,
    doc: Mapping[str, Any],
    keys: Sequence[str],
    rows: Sequence[Row],
    *,
    join_key: str,
    started_at: float,
    degraded: str,
    withdrawn: frozenset[str],
    sticky: str | None,
) -> OipLogicOutcome | BrokerError:
    """Derive every row, settle failures by the model's policy (`reject` on OIP models: the first row
    with one is refused, naming its entity), then let the rules pick a version for the request.

    A degraded request (store down under `fail_open`) carries no feature tensors: failures are kept
    for the audit, not refused, and the rules see what there is.
    """
    bodies: Sequence[Row | None] = (
        row_bodies(doc, len(keys), logic.body_inputs) if logic.body_fields != () else [None] * len(keys)
    )
    now = datetime.datetime.fromtimestamp(started_at, datetime.UTC) if logic.uses_now else None
    merged_rows: list[dict[str, Any]] = []
    derived: dict[str, dict[str, Any]] = {}
    errors: dict[str, dict[str, str]] = {}
    row_inputs: list[Inputs] = []
    for key, body, features in zip(keys, bodies, rows, strict=True):
        derivation = derive(logic.derived, body or {}, features, now)
        merged = {**features, **derivation.values}
        derived[key] = derivation.values
        if derivation.errors:
            errors[key] = derivation.errors
            if not degraded:
                settled, _ = settle_missing(logic.missing_features, merged, derivation.errors)
                if isinstance(settled, BrokerError):
                    return BrokerError(settled.code, f"{join_key} '{key}': {settled.message}")
                merged = settled
        merged_rows.append(merged)
        if logic.rules:
            row_inputs.append(Inputs(body, merged, now) if logic.rules_read_derived else derivation.inputs)
    decision = None
    if logic.rules:
        # A sticky key lands on the same version of a sub-split every time; otherwise a random draw.
        draw = sticky_draw(sticky) if sticky is not None else random.random()  # a traffic split, not a secret
        decision = choose_version(logic.rules, row_inputs, withdrawn, draw)
    return OipLogicOutcome(merged_rows, derived, errors, decision)
