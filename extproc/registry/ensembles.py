"""Ensembles: several models called for one request and their aggregation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from extproc.registry.common import Strict
from extproc.registry.open_inference import TensorElement
from extproc.registry.patterns import DNS_LABEL, JSON_KEY, ROUTE_PATH

AggregationMethod = Literal["all", "mean", "weighted_mean", "majority_vote", "first_success"]
# Methods that read one field of every member's answer.
FIELD_METHODS = frozenset({"mean", "weighted_mean", "majority_vote"})


class Aggregation(Strict):
    """How members' answers become one: `all` returns each result and combines nothing."""

    method: AggregationMethod = "all"
    # The answer field combined: numeric for (weighted_)mean, a label for majority_vote;
    # optional for first_success (the whole answer when absent).
    field: Annotated[str, Field(pattern=JSON_KEY)] | None = None

    @model_validator(mode="after")
    def _field_declared(self) -> Aggregation:
        if self.method in FIELD_METHODS and self.field is None:
            raise ValueError(f"'field' is required for {self.method} (the answer field to combine)")
        if self.method == "all" and self.field is not None:
            raise ValueError("'field' has no meaning for 'all'; choose a combining method")
        return self


class EnsembleMember(Strict):
    model: str
    # An `open_inference` member's value for the combiner: e.g. output `predict_proba`, element 1.
    output: TensorElement | None = None
    # The broker cancels this member's call after this long.
    timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 1_000
    # Relative weight in weighted_mean.
    weight: Annotated[float, Field(gt=0, le=1_000_000)] = 1.0


class Ensemble(Strict):
    """One request, several models called concurrently through Envoy, one aggregated answer."""

    name: Annotated[str, Field(pattern=DNS_LABEL)]
    path: Annotated[str, Field(pattern=ROUTE_PATH)]
    members: Annotated[tuple[EnsembleMember, ...], Field(min_length=1)]
    # Overall budget from the body's arrival to the answer, feature fetch included.
    deadline_ms: Annotated[int, Field(ge=1, le=600_000)] = 2_000
    # Members that must succeed for a 200; default: all of them.
    min_success: Annotated[int, Field(ge=1)] | None = None
    aggregation: Aggregation = Aggregation()

    @property
    def required_successes(self) -> int:
        return self.min_success if self.min_success is not None else len(self.members)
