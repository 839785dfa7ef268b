"""Release reports from rollout events: grouping into releases, steps, endings, Markdown and JSON."""

from __future__ import annotations

from typing import Any

from extproc.rollout.report import add_ground_truth, build_releases, render_json, render_markdown

OPERATOR: list[dict[str, Any]] = [
    {
        "time": 10,
        "event": "weights_changed",
        "model": "m",
        "source": "admin",
        "before": {"v1": 100, "v2": 0},
        "after": {"v1": 90, "v2": 10},
    },
    {
        "time": 20,
        "event": "promotion",
        "model": "m",
        "source": "promotion",
        "before": {"v1": 90, "v2": 10},
        "after": {"v1": 50, "v2": 50},
        "requests": 40,
        "errors": 1,
        "p95_ms": 25.0,
    },
    {
        "time": 30,
        "event": "promotion",
        "model": "m",
        "source": "promotion",
        "before": {"v1": 50, "v2": 50},
        "after": {"v1": 0, "v2": 100},
        "requests": 80,
        "errors": 0,
        "p95_ms": 25.0,
    },
    {
        "time": 40,
        "event": "weights_changed",
        "model": "m",
        "source": "admin",
        "before": {"v1": 0, "v2": 100},
        "after": {"v1": 10, "v2": 90},
    },
    {
        "time": 50,
        "event": "rollback",
        "model": "m",
        "source": "rollback",
        "before": {"v1": 10, "v2": 90},
        "after": {"v1": 0, "v2": 100},
        "reason": "p95_latency",
        "requests": 30,
        "errors": 0,
        "error_rate": 0.0,
        "p95_ms": 900.0,
    },
    {
        "time": 60,
        "event": "weights_changed",
        "model": "other",
        "source": "admin",
        "before": {"a": 0},
        "after": {"a": 1},
    },
]


def test_operator_releases_are_grouped_and_ended() -> None:
    """A weights set that gives a version traffic starts a release; 100% ends it promoted, a rollback ends it."""
    first, second = build_releases(OPERATOR, "m")
    assert (first.version, first.outcome, first.started_by, first.ended_at) == (
        "v2",
        "promoted",
        "operator (CLI / admin API)",
        30.0,
    )
    assert [(s.decision, s.share_percent, s.requests, s.error_rate) for s in first.steps] == [
        ("start", 10.0, None, None),
        ("promote", 50.0, 40, 0.025),
        ("promote", 100.0, 80, 0.0),
    ]
    assert (second.version, second.outcome, second.reason) == ("v1", "rolled_back", "p95_latency")
    assert second.steps[-1].p95_ms == 900.0


def test_registry_release_ends_with_its_release_event() -> None:
    """A registry release runs from release_started to release_promoted, whatever the steps in between."""
    events = [
        {
            "time": 1,
            "event": "release_started",
            "model": "m",
            "source": "registry",
            "version": "v4",
            "champion": "v3",
            "registry_version": 4,
        },
        {
            "time": 2,
            "event": "weights_changed",
            "model": "m",
            "source": "registry",
            "before": {"v3": 100, "v4": 0},
            "after": {"v3": 80, "v4": 20},
        },
        {
            "time": 3,
            "event": "promotion",
            "model": "m",
            "source": "promotion",
            "before": {"v3": 80, "v4": 20},
            "after": {"v3": 0, "v4": 100},
            "requests": 12,
            "errors": 0,
        },
        {"time": 4, "event": "release_promoted", "model": "m", "source": "registry", "version": "v4"},
    ]
    (release,) = build_releases(events, "m")
    assert (release.outcome, release.champion, release.registry_version, release.ended_at) == ("promoted", "v3", 4, 4.0)
    assert [s.share_percent for s in release.steps] == [20.0, 100.0]
    text = render_markdown("m", [release], since=0.0)
    assert "## v4 (registry version 4): promoted" in text and "| 20% |" in text
    assert render_json("m", [release], None)["releases"][0]["steps"][1]["requests"] == 12
    assert "No release in this window." in render_markdown("m", [], None)


def test_html_report_has_the_chart_and_escapes_text() -> None:
    """The HTML form carries an inline SVG chart (no script, no network) and the steps; text is escaped."""
    from extproc.rollout.report_html import render_html, share_series

    releases = build_releases(OPERATOR, "m")
    assert share_series(OPERATOR, "m")["v2"][:2] == [(10.0, 10.0), (20.0, 50.0)]
    page = render_html("m", releases, OPERATOR, None)
    assert page.count("<svg") == 1 and "<script" not in page
    assert "rolled back" in page and "p95_latency" in page
    hostile = build_releases([{**OPERATOR[0], "after": {"<b>x</b>": 1}, "before": {}}], "m")
    assert "<b>x</b>" not in render_html("m", hostile, [], None)


def test_registry_file_edits_are_releases() -> None:
    """An edit that gives a version traffic starts a release started by the edit; one that takes it back ends it."""
    events = [
        {"time": 1, "event": "weights_changed", "model": "m", "source": "edit", "before": {}, "after": {"a": 100}},
        {
            "time": 2,
            "event": "weights_changed",
            "model": "m",
            "source": "edit",
            "before": {"a": 100, "b": 0},
            "after": {"a": 90, "b": 10},
        },
        {
            "time": 3,
            "event": "weights_changed",
            "model": "m",
            "source": "edit",
            "before": {"a": 90, "b": 10},
            "after": {"a": 100, "b": 0},
        },
    ]
    first, second = build_releases(events, "m")
    assert (first.version, first.started_by, first.outcome) == ("a", "registry file edit", "promoted")
    assert (second.version, second.started_by, second.outcome) == ("b", "registry file edit", "withdrawn")
    assert second.reason == "set to 0 by registry file edit"
    assert [s.source for s in second.steps] == ["edit", "edit"]


def test_ground_truth_per_release() -> None:
    """Labels inside a release's window give its canary's and champion's accuracy; all of them the model's table."""
    events = [
        {"time": 10, "event": "release_started", "model": "m", "source": "registry", "version": "v2", "champion": "v1"},
        {"time": 20, "event": "release_rolled_back", "model": "m", "source": "registry", "version": "v2"},
    ]

    def label(when: float, version: str, correct: bool, shadow: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = f"r-{when}"
        return {"time": when, "request_id": rid, "model": "m", "version": version, "kind": "classification"} | {
            "truth": 1,
            "answer": 1 if correct else 0,
            "correct": correct,
            "abs_error": None,
            "shadow": shadow,
        }

    labels = [
        label(5, "v1", True),
        label(11, "v1", True),
        label(12, "v2", False),
        label(13, "v2", True),
        label(30, "v1", False, {"version": "s", "answer": 1, "correct": True, "abs_error": None}),
    ]
    (release,) = build_releases(events, "m")
    truth = add_ground_truth([release], labels)
    assert release.accuracy == {
        "canary": {"version": "v2", "labelled": 2, "accuracy": 0.5},
        "champion": {"version": "v1", "labelled": 1, "accuracy": 1.0},
    }
    assert truth is not None
    assert truth["versions"]["v1"] == {"labelled": 3, "accuracy": round(2 / 3, 6)}
    assert truth["shadows"] == {"s": {"labelled": 1, "accuracy": 1.0}}
    text = render_markdown("m", [release], None, truth)
    assert "canary v2: accuracy 0.5 over 2 labels; champion v1: accuracy 1.0 over 1 labels" in text
    assert "## Ground truth" in text and "| s | shadow | 1 | 1.0 |" in text
