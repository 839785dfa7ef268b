"""Ground truth, pure parts: parsing a feedback body, joining a truth to its record, the tallies, the accuracy gate."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from extproc.errors import BrokerError, ErrorCode
from extproc.registry import AccuracyGate, Registry, RegistryInvalid, parse_registry
from extproc.rollout.accuracy import accuracy_verdict, gate_canary, newcombe_difference, wilson
from extproc.rollout.feedback import FeedbackBook, Tally, Truth, parse_feedback, score
from extproc.rollout.feedback_desk import FeedbackDesk, labels_path
from tests.conftest import demo_registry_doc


def registry(kind: str = "classification", audit: bool | None = None) -> Registry:
    doc = demo_registry_doc()
    model = doc["models"][0]
    model["feedback"] = {"kind": kind, "answer_field": "score"}
    if audit is not None:
        model["audit"] = audit
    return parse_registry(doc)


def record(model: str, *, answer: Any = 1, status: int = 200, version: str | None = "v1") -> dict[str, Any]:
    return {
        "kind": "execution",
        "request_id": "r-1",
        "model": model,
        "version": version,
        "response": {"status": status, "body": {"score": answer}},
    }


def shadow(answer: Any, version: str = "v9") -> dict[str, Any]:
    return {"kind": "shadow", "request_id": "shadow:r-1", "shadow": {"version": version, "shadow": {"score": answer}}}


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"request_id": "r", "truth": 1}, [Truth("r", 1)]),
        ([{"request_id": "a", "truth": "yes"}, {"request_id": "b", "truth": 0.5, "model": "m"}], None),
        ({"request_id": "r"}, ErrorCode.INVALID_FEEDBACK),
        ({"request_id": "", "truth": 1}, ErrorCode.INVALID_FEEDBACK),
        ({"request_id": "r", "truth": [1]}, ErrorCode.INVALID_FEEDBACK),
        ({"request_id": "r", "truth": 1, "label": 2}, ErrorCode.INVALID_FEEDBACK),
        ([], ErrorCode.INVALID_FEEDBACK),
        ("r", ErrorCode.INVALID_FEEDBACK),
    ],
    ids=["one", "batch", "no-truth", "empty-id", "list-truth", "unknown-field", "empty-batch", "not-an-object"],
)
def test_parse_feedback(doc: Any, expected: Any) -> None:
    """One object or a list; a malformed item is refused by itself, with a message saying what is wrong."""
    parsed = parse_feedback(doc)
    if isinstance(parsed, BrokerError):
        assert parsed.code == expected
        return
    items, batch = parsed
    assert batch == isinstance(doc, list)
    if expected is None:
        assert all(isinstance(i, Truth) for i in items)
    elif isinstance(expected, ErrorCode):
        assert [i.code for i in items if isinstance(i, BrokerError)] == [expected]
    else:
        assert items == expected


def test_score_joins_answer_and_shadow() -> None:
    """A classification truth scores the served answer and the shadow's answer to the same request."""
    reg = registry()
    name = reg.models[0].name
    label = score(reg, Truth("r-1", 1), record(name, answer=1), shadow(0), now=1.0, consumer=None)
    assert isinstance(label, dict)
    assert (label["model"], label["version"], label["correct"], label["abs_error"]) == (name, "v1", True, None)
    assert label["shadow"] == {"version": "v9", "answer": 0, "correct": False, "abs_error": None}


@pytest.mark.parametrize(
    ("truth", "found", "code"),
    [
        (Truth("r-1", 1), None, ErrorCode.UNKNOWN_REQUEST),
        (Truth("r-1", 1), {"kind": "shadow", "model": "x"}, ErrorCode.UNKNOWN_REQUEST),
        (Truth("r-1", 1), "failed", ErrorCode.NOT_SCORABLE),
        (Truth("r-1", 1), "no-version", ErrorCode.NOT_SCORABLE),
        (Truth("r-1", 1, model="nope"), "ok", ErrorCode.UNKNOWN_MODEL),
    ],
    ids=["unknown-id", "not-an-execution", "failed-call", "no-version", "unknown-model"],
)
def test_score_refusals(truth: Truth, found: Any, code: ErrorCode) -> None:
    """Unknown ids are 404, answers that cannot be scored 409, each with its own code."""
    reg = registry()
    name = reg.models[0].name
    named = {"ok": record(name), "failed": record(name, status=500), "no-version": record(name, version=None)}
    rec = named[found] if isinstance(found, str) else found
    result = score(reg, truth, rec, None, now=1.0)
    assert isinstance(result, BrokerError) and result.code == code, result


def test_unaudited_or_undeclared_model_is_a_conflict() -> None:
    """A model without `feedback` (or not audited) takes no truth: 409 not_audited, named or found by id."""
    reg = registry()
    other = next(m for m in reg.models if m.feedback is None)
    by_name = score(reg, Truth("r-1", 1, model=other.name), None, None, now=1.0)
    by_record = score(reg, Truth("r-1", 1), record(other.name), None, now=1.0)
    for result in (by_name, by_record):
        assert isinstance(result, BrokerError) and result.code == ErrorCode.NOT_AUDITED
        assert result.status == 409


def test_feedback_needs_an_audited_model() -> None:
    """Declaring feedback on a model that is not audited, or a gate without feedback, fails at load."""
    with pytest.raises(RegistryInvalid, match="must be audited"):
        registry(audit=False)
    doc = demo_registry_doc()
    doc["models"][0]["rollout"] = {"canary": doc["models"][0]["versions"][0]["name"], "accuracy": {}}
    with pytest.raises(RegistryInvalid, match="accuracy gate needs `feedback`"):
        parse_registry(doc)


def test_regression_scores_absolute_error() -> None:
    """A regression truth gives |answer - truth|; a non-numeric truth is a 400."""
    reg = registry("regression")
    name = reg.models[0].name
    label = score(reg, Truth("r-1", 2.5), record(name, answer=1), None, now=1.0)
    assert isinstance(label, dict) and label["abs_error"] == 1.5 and label["correct"] is None
    bad = score(reg, Truth("r-1", "high"), record(name, answer=1), None, now=1.0)
    assert isinstance(bad, BrokerError) and bad.code == ErrorCode.INVALID_FEEDBACK


def test_book_is_idempotent_and_refuses_a_changed_truth() -> None:
    """The same truth twice counts once; another truth for a labelled request is a 409 conflict."""
    reg = registry()
    label = score(reg, Truth("r-1", 1), record(reg.models[0].name), None, now=1.0)
    assert isinstance(label, dict)
    book = FeedbackBook.of([label, label])
    assert book.tally(reg.models[0].name, "v1") == Tally(labelled=1, correct=1)
    assert book.earlier(Truth("r-1", 1.0)) == label
    conflict = book.earlier(Truth("r-1", 0))
    assert isinstance(conflict, BrokerError) and conflict.code == ErrorCode.FEEDBACK_CONFLICT
    assert book.earlier(Truth("r-2", 0)) is None


def test_wilson_and_newcombe_match_published_values() -> None:
    """Newcombe (1998), method 10, example (a): 56/70 vs 48/80 → 95% interval 0.0524 to 0.3339."""
    low, high = newcombe_difference(56, 70, 48, 80, 1.959964)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    assert tuple(round(x, 4) for x in wilson(81, 263, 1.959964)) == (0.2553, 0.3662)  # Newcombe 1998a, ex. (a)


def tally(correct: int, labelled: int) -> Tally:
    return Tally(labelled=labelled, correct=correct)


@pytest.mark.parametrize(
    ("canary", "champion", "gate", "decision"),
    [
        (tally(5, 5), tally(0, 5), AccuracyGate(min_labelled=10), "hold"),
        (tally(190, 200), tally(192, 200), AccuracyGate(min_labelled=100, margin=0.05), "pass"),
        (tally(190, 200), tally(192, 200), AccuracyGate(min_labelled=100, margin=0.0), "hold"),
        (tally(0, 20), tally(20, 20), AccuracyGate(min_labelled=20, margin=0.05), "fail"),
        (tally(17, 20), tally(20, 20), AccuracyGate(min_labelled=20, margin=0.05), "hold"),
        (tally(100, 100), tally(100, 100), AccuracyGate(min_labelled=100, margin=0.03), "pass"),
        (tally(100, 100), tally(100, 100), AccuracyGate(min_labelled=100, margin=0.02), "hold"),
    ],
    ids=[
        "too-few",
        "within-margin",
        "no-margin-inconclusive",
        "much-worse",
        "small-drop-unproven",
        "both-perfect",
        "both-perfect-margin-too-tight-for-n",
    ],
)
def test_accuracy_verdict(canary: Tally, champion: Tally, gate: AccuracyGate, decision: str) -> None:
    """Pass only when non-inferiority is shown, fail only when inferiority is; small splits wait."""
    verdict = accuracy_verdict(gate, "classification", canary, champion)
    assert verdict.decision == decision, verdict


def test_mae_verdict() -> None:
    """Regression: Welch's bounds on MAE(canary) - MAE(champion) against the margin."""

    def errors(values: list[float]) -> Tally:
        t = Tally()
        for v in values:
            t.add(None, v)
        return t

    good, bad = errors([0.1, 0.2, 0.1, 0.15] * 10), errors([1.0, 1.2, 0.9, 1.1] * 10)
    gate = AccuracyGate(min_labelled=30, margin=0.05)
    assert accuracy_verdict(gate, "regression", bad, good).decision == "fail"
    assert accuracy_verdict(gate, "regression", good, bad).decision == "pass"


def test_gate_judges_against_the_version_with_most_traffic() -> None:
    """The champion is the other version with the largest live weight; its name is in the verdict."""
    book = FeedbackBook()
    book.tallies[("m", "v2")] = tally(0, 20)
    book.tallies[("m", "v1")] = tally(20, 20)
    book.kinds["m"] = "classification"
    verdict = gate_canary(
        AccuracyGate(min_labelled=20), "classification", book, "m", weights={"v1": 80, "v2": 20, "v0": 0}, canary="v2"
    )
    assert verdict is not None and verdict.decision == "fail" and verdict.detail["champion"] == "v1"
    assert gate_canary(AccuracyGate(), "classification", book, "m", weights={"v2": 100}, canary="v2") is None


def test_consumer_may_label_only_models_it_may_call() -> None:
    """With consumers declared, a truth about a model the sending consumer may not call is a 403."""
    doc = demo_registry_doc()
    doc["models"][0]["feedback"] = {"kind": "classification", "answer_field": "score"}
    name = doc["models"][0]["name"]
    other = doc["models"][1]["name"]
    doc["consumers"] = [
        {"name": "owner", "api_keys": ["sha256:" + "a" * 64], "models": [name]},
        {"name": "stranger", "api_keys": ["sha256:" + "b" * 64], "models": [other]},
    ]
    reg = parse_registry(doc)
    allowed = score(reg, Truth("r-1", 1), record(name), None, now=1.0, consumer="owner")
    refused = score(reg, Truth("r-1", 1), record(name), None, now=1.0, consumer="stranger")
    assert isinstance(allowed, dict)
    assert isinstance(refused, BrokerError) and refused.code == ErrorCode.FORBIDDEN and refused.status == 403


async def test_desk_counts_concurrent_duplicates_once(tmp_path: Path) -> None:
    """Two copies of one truth at once: both 200, one label on disk; a restart rebuilds the same tallies."""
    reg = registry()
    name = reg.models[0].name
    state_file = str(tmp_path / "rollout-state.json")

    async def find(request_id: str) -> dict[str, Any] | None:
        await asyncio.sleep(0.01)  # both lookups are in flight before either label is written
        return {**record(name), "request_id": request_id} if not request_id.startswith("shadow:") else None

    desk = FeedbackDesk(lambda: reg, state_file, find)
    first, second = await asyncio.gather(desk.submit([Truth("r-1", 1)], None), desk.submit([Truth("r-1", 1)], None))
    assert sorted(r[0]["duplicate"] for r in (first, second) if isinstance(r[0], dict)) == [False, True]
    assert len(labels_path(state_file).read_text().splitlines()) == 1
    again = FeedbackDesk(lambda: reg, state_file, find)
    assert again.book.tally(name, "v1") == Tally(labelled=1, correct=1)
    assert again.book.summary() == desk.book.summary()
