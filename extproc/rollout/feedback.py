"""Ground truth joined to the audit trail: what one posted truth says about one version. Pure.

`parse_feedback` reads a `POST /v1/feedback` body (one `{request_id, truth}` or a list);
`score` joins one truth to its execution record (and the shadow's answer to the same
request, when there is one) into a `Label`; `FeedbackBook` keeps the labels by request id
(a repeated truth is idempotent, a contradicting one refused) and the tallies per model
and version that metrics, `GET /models`, the accuracy gate and the report read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.errors import BrokerError, ErrorCode
from extproc.registry import Feedback, Registry

# One request carries at most this many truths (a batch job posts several requests).
MAX_BATCH = 1000
MAX_REQUEST_ID = 200


@dataclass(frozen=True, slots=True)
class Truth:
    """One posted item: the request it is about, its truth, the model the sender says it was (optional)."""

    request_id: str
    truth: Any
    model: str | None = None


def parse_feedback(doc: Any) -> tuple[list[Truth | BrokerError], bool] | BrokerError:
    """(items, batch?) from the body: one object, or a JSON array of them; a bad item is refused alone."""
    if isinstance(doc, dict):
        return [_item(doc)], False
    if isinstance(doc, list):
        if not doc:
            return BrokerError(ErrorCode.INVALID_FEEDBACK, "an empty batch: send at least one item")
        if len(doc) > MAX_BATCH:
            return BrokerError(ErrorCode.INVALID_FEEDBACK, f"at most {MAX_BATCH} items per request, got {len(doc)}")
        return [_item(item) for item in doc], True
    return BrokerError(ErrorCode.INVALID_FEEDBACK, 'send {"request_id": "...", "truth": ...} or a list of them')


def _item(doc: Any) -> Truth | BrokerError:
    if not isinstance(doc, dict):
        return BrokerError(ErrorCode.INVALID_FEEDBACK, 'each item is an object {"request_id": "...", "truth": ...}')
    unknown = sorted(set(doc) - {"request_id", "truth", "model"})
    if unknown:
        return BrokerError(ErrorCode.INVALID_FEEDBACK, f"unknown field(s): {', '.join(unknown)}")
    request_id, model = doc.get("request_id"), doc.get("model")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID:
        return BrokerError(ErrorCode.INVALID_FEEDBACK, f"request_id: a string of 1..{MAX_REQUEST_ID} characters")
    if "truth" not in doc or not _scalar(doc["truth"]):
        return BrokerError(ErrorCode.INVALID_FEEDBACK, "truth: a string, number or boolean (the expected answer)")
    if model is not None and not isinstance(model, str):
        return BrokerError(ErrorCode.INVALID_FEEDBACK, "model: the model's name, a string")
    return Truth(request_id, doc["truth"], model)


def _scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int, bool))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def same_answer(answer: Any, truth: Any) -> bool:
    """Classification: equal JSON scalars (1 and 1.0 agree; true and 1 do not)."""
    if isinstance(answer, bool) or isinstance(truth, bool):
        return isinstance(answer, bool) and isinstance(truth, bool) and answer == truth
    return bool(answer == truth)


@dataclass(frozen=True, slots=True)
class Score:
    correct: bool | None
    abs_error: float | None


def judge_answer(conf: Feedback, answer: Any, truth: Any) -> Score | str:
    """How right one answer was; a reason when it cannot be scored (regression needs numbers)."""
    if conf.kind == "classification":
        return Score(same_answer(answer, truth), None)
    x, y = _number(answer), _number(truth)
    if y is None:
        return "a regression model's truth is a number"
    if x is None:
        return f"the answer's {conf.answer_field} is not a number"
    return Score(None, abs(x - y))


def score(  # noqa: PLR0911 - one early return per reason a truth cannot be joined
    registry: Registry,
    item: Truth,
    record: Mapping[str, Any] | None,
    shadow: Mapping[str, Any] | None,
    *,
    now: float,
    consumer: str | None = None,
) -> dict[str, Any] | BrokerError:
    """The label one truth gives its execution (and its shadow's answer), ready to persist."""
    if item.model is not None:
        named = registry.model(item.model)
        if named is None:
            return BrokerError(ErrorCode.UNKNOWN_MODEL, f"no model named '{item.model}'")
        if not registry.audited(named) or named.feedback is None:
            return _not_audited(named.name, registry.audited(named))
    if record is None or record.get("kind", "execution") != "execution":
        return BrokerError(ErrorCode.UNKNOWN_REQUEST, f"no audited execution has request id '{item.request_id}'")
    name = str(record.get("model"))
    model = registry.model(name)
    if model is None or model.feedback is None or not registry.audited(model):
        return _not_audited(name, model is not None and registry.audited(model))
    if item.model is not None and item.model != name:
        return BrokerError(ErrorCode.UNKNOWN_REQUEST, f"request '{item.request_id}' was a call of {name}")
    if consumer and registry.consumers and not _may_call(registry, consumer, name):
        return BrokerError(ErrorCode.FORBIDDEN, f"consumer '{consumer}' may not call {name}")
    response = record.get("response") or {}
    answer = _field(response.get("body"), model.feedback.answer_field)
    status = response.get("status")
    if not isinstance(status, int) or not 200 <= status < 300 or answer is None or not record.get("version"):
        field_name = model.feedback.answer_field
        return BrokerError(
            ErrorCode.NOT_SCORABLE, f"request '{item.request_id}' has no answer with '{field_name}' (status {status})"
        )
    judged = judge_answer(model.feedback, answer, item.truth)
    if isinstance(judged, str):
        return BrokerError(ErrorCode.INVALID_FEEDBACK, judged)
    label: dict[str, Any] = {
        "time": now,
        "request_id": item.request_id,
        "model": name,
        "version": record["version"],
        "kind": model.feedback.kind,
        "truth": item.truth,
        "answer": answer,
        "correct": judged.correct,
        "abs_error": judged.abs_error,
        "consumer": consumer or None,
        "shadow": None,
    }
    shadowed = (shadow or {}).get("shadow") or {}
    shadow_answer = _field(shadowed.get("shadow"), model.feedback.answer_field)
    if shadow_answer is not None and shadowed.get("version"):
        second = judge_answer(model.feedback, shadow_answer, item.truth)
        if isinstance(second, Score):
            label["shadow"] = {
                "version": shadowed["version"],
                "answer": shadow_answer,
                "correct": second.correct,
                "abs_error": second.abs_error,
            }
    return label


def _not_audited(model: str, audited: bool) -> BrokerError:
    why = "declares no `feedback`" if audited else "is not audited"
    return BrokerError(ErrorCode.NOT_AUDITED, f"{model} {why}: its answers cannot be joined to ground truth")


def _may_call(registry: Registry, consumer: str, model: str) -> bool:
    found = next((c for c in registry.consumers if c.name == consumer), None)
    return found is not None and found.may_call(model)


def _field(body: Any, name: str) -> Any:
    value = body.get(name) if isinstance(body, dict) else None
    return value if _scalar(value) else None


@dataclass(slots=True)
class Tally:
    """Labels of one version: how many, how many right (classification), the sum of |error| (regression)."""

    labelled: int = 0
    correct: int = 0
    abs_sum: float = 0.0
    sq_sum: float = 0.0

    def add(self, correct: bool | None, abs_error: float | None) -> None:
        self.labelled += 1
        self.correct += bool(correct)
        if abs_error is not None:
            self.abs_sum += abs_error
            self.sq_sum += abs_error * abs_error

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def mae(self) -> float | None:
        return self.abs_sum / self.labelled if self.labelled else None

    def describe(self, kind: str) -> dict[str, Any]:
        value = self.accuracy if kind == "classification" else self.mae
        key = "accuracy" if kind == "classification" else "mae"
        return {"labelled": self.labelled, key: None if value is None else round(value, 6)}


@dataclass(slots=True)
class FeedbackBook:
    """Every label by request id (idempotence), and the tallies per (model, version)."""

    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    shadows: dict[tuple[str, str], Tally] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, labels: Iterable[Mapping[str, Any]]) -> FeedbackBook:
        """Rebuilt from the persisted labels, oldest first (the same after a restart)."""
        book = cls()
        for label in labels:
            book.add(label)
        return book

    def earlier(self, item: Truth) -> dict[str, Any] | BrokerError | None:
        """The label already given for this request: the same truth is a no-op, another is refused."""
        found = self.labels.get(item.request_id)
        if found is None:
            return None
        if same_answer(found["truth"], item.truth) or found["truth"] == item.truth:
            return found
        return BrokerError(
            ErrorCode.FEEDBACK_CONFLICT,
            f"request '{item.request_id}' already has truth {found['truth']!r}; a label is never changed",
        )

    def add(self, label: Mapping[str, Any]) -> None:
        if label["request_id"] in self.labels:
            return
        self.labels[label["request_id"]] = dict(label)
        model = label["model"]
        self.kinds[model] = label["kind"]
        self.tallies.setdefault((model, label["version"]), Tally()).add(label["correct"], label["abs_error"])
        shadow = label.get("shadow")
        if shadow:
            self.shadows.setdefault((model, shadow["version"]), Tally()).add(shadow["correct"], shadow["abs_error"])

    def tally(self, model: str, version: str) -> Tally:
        return self.tallies.get((model, version), Tally())

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per model: its kind, each version's labels and accuracy/MAE, each shadow's agreement with the truth."""
        doc: dict[str, dict[str, Any]] = {}
        for (model, version), tally in sorted(self.tallies.items()):
            entry = doc.setdefault(model, {"kind": self.kinds[model], "versions": {}, "shadows": {}})
            entry["versions"][version] = tally.describe(self.kinds[model])
        for (model, version), tally in sorted(self.shadows.items()):
            entry = doc.setdefault(model, {"kind": self.kinds[model], "versions": {}, "shadows": {}})
            entry["shadows"][version] = tally.describe(self.kinds[model])
        return doc
