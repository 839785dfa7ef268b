"""Ensemble answers without I/O: combiners, statuses, body shape, and how a member's HTTP reply is read."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.core.ensemble.aggregate import (
    Combiner,
    MemberFailure,
    MemberOutcome,
    MemberResult,
    combine,
    ensemble_answer,
)
from extproc.core.ensemble.fanout import MemberReply, reply_outcome
from extproc.errors import BrokerError, ErrorCode


def ok(model: str, **output: Any) -> MemberResult:
    return MemberResult(model, "v1", 5.0, output)


def failed(model: str, code: ErrorCode) -> MemberFailure:
    return MemberFailure(model, BrokerError(code, "why"), 5.0)


THREE = [ok("a", score=0.2, label="decline"), ok("b", score=0.5, label="approve"), ok("c", score=0.8, label="approve")]
WEIGHTS = {"a": 3.0, "b": 1.0, "c": 1.0}

COMBINED: list[tuple[str, Combiner, list[MemberResult], dict[str, Any]]] = [
    ("mean", Combiner("mean", "score"), THREE, {"value": pytest.approx(0.5), "models": ["a", "b", "c"]}),
    (
        "weighted-mean",
        Combiner("weighted_mean", "score", WEIGHTS),
        THREE,
        {"value": pytest.approx((0.6 + 0.5 + 0.8) / 5), "models": ["a", "b", "c"]},
    ),
    (
        "weighted-mean-renormalised-over-answers",
        Combiner("weighted_mean", "score", WEIGHTS),
        THREE[1:],
        {"value": pytest.approx(0.65), "models": ["b", "c"]},
    ),
    ("mean-of-ints", Combiner("mean", "n"), [ok("a", n=1), ok("b", n=2)], {"value": 1.5, "models": ["a", "b"]}),
    (
        "majority",
        Combiner("majority_vote", "label"),
        THREE,
        {"value": "approve", "votes": {"decline": 1, "approve": 2}, "models": ["a", "b", "c"]},
    ),
    (
        "majority-tie-goes-to-first-declared",
        Combiner("majority_vote", "label"),
        THREE[:2],
        {"value": "decline", "votes": {"decline": 1, "approve": 1}, "models": ["a", "b"]},
    ),
    ("first-success-field", Combiner("first_success", "score"), THREE[1:], {"value": 0.5, "models": ["b"]}),
    (
        "first-success-whole-answer",
        Combiner("first_success"),
        THREE[2:],
        {"value": {"score": 0.8, "label": "approve"}, "models": ["c"]},
    ),
]


@pytest.mark.parametrize(("case", "combiner", "results", "expected"), COMBINED, ids=[c[0] for c in COMBINED])
def test_combiner_on_known_outputs(
    case: str, combiner: Combiner, results: list[MemberResult], expected: dict[str, Any]
) -> None:
    """Each combiner's value on known answers, and which members it used."""
    assert combine(combiner, results) == {"method": combiner.method, "field": combiner.field, **expected}


REFUSED: list[tuple[str, Combiner, list[MemberResult], str]] = [
    ("mean-over-label", Combiner("mean", "label"), THREE, "mean over 'label': needs numbers; a answered \"decline\""),
    ("mean-over-bool", Combiner("mean", "x"), [ok("a", x=True)], "mean over 'x': needs numbers; a answered true"),
    ("field-missing", Combiner("weighted_mean", "p"), THREE, "weighted_mean over 'p': a answered without 'p'"),
    ("not-an-object", Combiner("mean", "score"), [MemberResult("a", "v1", 1.0, [1])], "a answered without 'score'"),
    ("vote-on-number", Combiner("majority_vote", "score"), THREE, "needs labels (strings); a answered 0.2"),
    ("first-missing-field", Combiner("first_success", "p"), THREE, "first_success over 'p': a answered without 'p'"),
]


@pytest.mark.parametrize(("case", "combiner", "results", "message"), REFUSED, ids=[c[0] for c in REFUSED])
def test_combiner_refuses_and_names_field_and_model(
    case: str, combiner: Combiner, results: list[MemberResult], message: str
) -> None:
    """A combiner that cannot combine says which field and which member's answer stopped it."""
    error = combine(combiner, results)
    assert isinstance(error, BrokerError) and error.code == ErrorCode.AGGREGATION_FAILED
    assert message in error.message


STATUSES: list[tuple[str, list[MemberOutcome], int, int, str | None]] = [
    ("all-answered", THREE, 3, 200, None),
    ("enough-answered", [THREE[0], failed("b", ErrorCode.UPSTREAM_ERROR)], 1, 200, None),
    ("refused", [THREE[0], failed("b", ErrorCode.UPSTREAM_ERROR)], 2, 502, "ensemble_failed"),
    ("timed-out", [THREE[0], failed("b", ErrorCode.UPSTREAM_TIMEOUT)], 2, 504, "ensemble_timeout"),
    ("deadline", [failed("a", ErrorCode.DEADLINE_EXCEEDED), failed("b", ErrorCode.UPSTREAM_TIMEOUT)], 1, 504, None),
    ("mixed-is-502", [failed("a", ErrorCode.UPSTREAM_TIMEOUT), failed("b", ErrorCode.UPSTREAM_ERROR)], 1, 502, None),
]


@pytest.mark.parametrize(("case", "outcomes", "min_success", "status", "code"), STATUSES, ids=[s[0] for s in STATUSES])
def test_status_follows_min_success(
    case: str, outcomes: list[MemberOutcome], min_success: int, status: int, code: str | None
) -> None:
    """200 with enough answers; else 504 when only timeouts failed, 502 otherwise; same body shape."""
    got, body = ensemble_answer("e", outcomes, min_success=min_success, combiner=Combiner(), request_id="r-1")
    assert got == status
    assert body["ensemble"] == "e"
    assert set(body["results"]) | set(body["errors"]) == {o.model for o in outcomes}
    assert "combined" not in body
    if status == 200:
        assert "error" not in body
    else:
        assert body["error"]["request_id"] == "r-1"
        assert code is None or body["error"]["code"] == code


def test_answer_lists_version_latency_output_and_error_entries() -> None:
    """Results carry version, latency and output; errors carry code and message; combined is there."""
    outcomes = [MemberResult("a", "v2", 12.5, {"score": 0.3}), failed("b", ErrorCode.UPSTREAM_TIMEOUT)]
    status, body = ensemble_answer("e", outcomes, min_success=1, combiner=Combiner("mean", "score"), request_id="r")
    assert status == 200
    assert body == {
        "ensemble": "e",
        "results": {"a": {"version": "v2", "latency_ms": 12.5, "output": {"score": 0.3}}},
        "errors": {"b": {"code": "upstream_timeout", "message": "why"}},
        "combined": {"method": "mean", "field": "score", "value": 0.3, "models": ["a"]},
    }


def test_combiner_failure_is_502_with_results_kept() -> None:
    """A combiner over a non-numeric field: 502 naming it, members' answers still shown, combined null."""
    status, body = ensemble_answer("e", THREE, min_success=3, combiner=Combiner("mean", "label"), request_id="r")
    assert status == 502
    assert body["error"]["code"] == "aggregation_failed" and "'label'" in body["error"]["message"]
    assert body["combined"] is None and set(body["results"]) == {"a", "b", "c"}


REPLIES: list[tuple[str, MemberReply, str | None]] = [
    ("ok", MemberReply(200, b'{"score": 1}', "v2", "id"), None),
    ("model-500", MemberReply(500, b"boom", "v1", "id"), "upstream_error"),
    ("envoy-503", MemberReply(503, b"{}", "", "id"), "upstream_unavailable"),
    ("envoy-504", MemberReply(504, b"{}", "", "id"), "upstream_timeout"),
    ("not-json", MemberReply(200, b"<html>", "v1", "id"), "upstream_error"),
]


@pytest.mark.parametrize(("case", "reply", "code"), REPLIES, ids=[r[0] for r in REPLIES])
def test_member_reply_is_read_as_result_or_error(case: str, reply: MemberReply, code: str | None) -> None:
    """2xx JSON is a result with Envoy's version and ids; anything else is an error entry with a code."""
    outcome = reply_outcome("m", reply, 0.0123, "parent")
    assert outcome.request_id == "id" and outcome.parent_request_id == "parent" and outcome.latency_ms == 12.3
    if code is None:
        assert isinstance(outcome, MemberResult) and outcome.output == {"score": 1} and outcome.version == "v2"
    else:
        assert isinstance(outcome, MemberFailure) and outcome.error.code.value == code
