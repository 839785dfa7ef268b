"""Release and rollback reports: the persisted rollout events of one model, grouped into releases. Pure.

A release starts when the model registry's challenger gets a canary (`release_started`), an
operator gives a version with no traffic some (`weights set`, the admin API), or an edit of
the registry file does (source `edit`); each weight
change after it is a step, with the numbers the control plane judged it on; it ends
promoted, rolled back, aborted or replaced. Ground truth (the persisted feedback labels)
gives each release the canary's and the champion's accuracy or MAE over its window, and
the model's shadows their agreement with the truth. Rendered as Markdown or JSON.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from extproc.rollout.events import Event
from extproc.rollout.feedback import FeedbackBook

# How each ending event reads in a report.
OUTCOMES = {
    "release_promoted": "promoted",
    "release_rolled_back": "rolled_back",
    "release_aborted": "aborted",
    "release_replaced": "replaced",
}
# Weight changes, and who made them (the event's `source`).
WEIGHT_EVENTS = ("weights_changed", "promotion", "rollback")
STARTED_BY = {
    "registry": "model registry",
    "admin": "operator (CLI / admin API)",
    "edit": "registry file edit",
    "rollback": "automatic rollback",
}


@dataclass(slots=True)
class Step:
    time: float
    decision: str
    source: str
    weights: dict[str, int]
    share_percent: float
    requests: int | None = None
    errors: int | None = None
    error_rate: float | None = None
    p95_ms: float | None = None
    reason: str | None = None
    # The canary's accuracy (or MAE) on fed-back truth as the accuracy gate judged this step.
    accuracy: float | None = None


@dataclass(slots=True)
class Release:
    model: str
    version: str
    started_at: float
    started_by: str
    champion: str | None = None
    registry_version: int | None = None
    steps: list[Step] = field(default_factory=list)
    outcome: str = "in_progress"
    reason: str | None = None
    ended_at: float | None = None
    # {"canary"|"champion": {version, labelled, accuracy or mae}} over the release's window, when labelled.
    accuracy: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _share(weights: dict[str, int], version: str) -> float:
    total = sum(weights.values())
    return round(100 * weights.get(version, 0) / total, 2) if total else 0.0


def _step(event: Event, version: str) -> Step:
    after = {str(k): int(v) for k, v in (event.get("after") or {}).items()}
    requests, errors = event.get("requests"), event.get("errors")
    rate = event.get("error_rate")
    if rate is None and isinstance(requests, int) and requests and isinstance(errors, int):
        rate = round(errors / requests, 4)
    return Step(
        time=float(event.get("time", 0)),
        decision={"weights_changed": "start", "promotion": "promote", "rollback": "roll back"}[event["event"]],
        source=str(event.get("source", "")),
        weights=after,
        share_percent=_share(after, version),
        requests=requests,
        errors=errors,
        error_rate=rate,
        p95_ms=event.get("p95_ms"),
        reason=event.get("reason"),
        accuracy=_judged(event.get("accuracy") or event),
    )


def _judged(detail: Any) -> float | None:
    """The canary's accuracy or MAE in a gate's verdict (promotion) or an accuracy rollback."""
    found = detail.get("canary_accuracy", detail.get("canary_mae")) if isinstance(detail, dict) else None
    return float(found) if isinstance(found, (int, float)) else None


def add_ground_truth(releases: list[Release], labels: Iterable[Event]) -> dict[str, Any] | None:
    """Each release's canary and champion over its window; the model's versions and shadows over all `labels`."""
    ordered = sorted(labels, key=lambda label: float(label.get("time", 0)))
    for release in releases:
        end = release.ended_at if release.ended_at is not None else float("inf")
        window = [x for x in ordered if release.started_at <= float(x.get("time", 0)) <= end]
        if not window:
            continue
        book = FeedbackBook.of(window)
        kind = window[0]["kind"]
        versions = {v: t for (_, v), t in book.tallies.items()}
        champion = release.champion or max(
            (v for v in versions if v != release.version), key=lambda v: versions[v].labelled, default=None
        )
        release.accuracy = {
            role: {"version": version, **versions[version].describe(kind)}
            for role, version in (("canary", release.version), ("champion", champion))
            if version in versions
        }
    if not ordered:
        return None
    return next(iter(FeedbackBook.of(ordered).summary().values()))


def _newly_live(event: Event) -> str | None:
    before, after = event.get("before") or {}, event.get("after") or {}
    return next((v for v, w in after.items() if w > 0 and not before.get(v)), None)


def build_releases(events: Iterable[Event], model: str) -> list[Release]:
    """The releases of `model` in `events` (oldest first), each with its steps and how it ended."""
    releases: list[Release] = []
    current: Release | None = None
    for event in sorted((e for e in events if e.get("model") == model), key=lambda e: e.get("time", 0)):
        started = _start(event, model)
        if started is not None:
            current = started
            releases.append(current)
        if current is not None and _advance(current, event):
            current = None
    return releases


def _start(event: Event, model: str) -> Release | None:
    kind, when = event.get("event"), float(event.get("time", 0))
    if kind == "release_started":
        return Release(
            model,
            str(event.get("version")),
            when,
            STARTED_BY["registry"],
            event.get("champion"),
            event.get("registry_version"),
        )
    source = str(event.get("source"))
    if kind in WEIGHT_EVENTS and source in ("admin", "edit") and _newly_live(event):
        return Release(model, str(_newly_live(event)), when, STARTED_BY[source])
    return None


def _advance(release: Release, event: Event) -> bool:
    """Add the event to the release; True once it ended."""
    kind, when = event.get("event"), float(event.get("time", 0))
    if kind in WEIGHT_EVENTS:
        release.steps.append(_step(event, release.version))
    if kind in OUTCOMES:
        release.outcome, release.ended_at = OUTCOMES[kind], when
        release.reason = event.get("reason") or release.reason
    elif release.registry_version is None and kind == "rollback":
        release.outcome, release.reason, release.ended_at = "rolled_back", event.get("reason"), when
    elif release.registry_version is None and kind in WEIGHT_EVENTS and release.steps[-1].share_percent >= 100:
        release.outcome, release.ended_at = "promoted", when
    elif release.registry_version is None and kind == "weights_changed" and release.steps[-1].share_percent == 0:
        # An operator or an edit took the traffic back: the release ends without a rollback's thresholds.
        release.outcome, release.ended_at = "withdrawn", when
        release.reason = f"set to 0 by {STARTED_BY.get(str(event.get('source')), event.get('source'))}"
    return release.ended_at is not None


def iso_time(when: float | None) -> str:
    return "—" if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _cell(value: object) -> str:
    return "—" if value is None else str(value)


def render_markdown(
    model: str, releases: list[Release], since: float | None, truth: dict[str, Any] | None = None
) -> str:
    window = f" since {iso_time(since)}" if since is not None else ""
    lines = [f"# Releases of {model}{window}", ""]
    if not releases:
        lines.append("No release in this window.")
    for release in releases:
        origin = f" (registry version {release.registry_version})" if release.registry_version is not None else ""
        lines += [
            f"## {release.version}{origin}: {release.outcome.replace('_', ' ')}",
            "",
            f"- started {iso_time(release.started_at)} by {release.started_by}"
            + (f", champion {release.champion}" if release.champion else ""),
            f"- ended {iso_time(release.ended_at)}" + (f": {release.reason}" if release.reason else ""),
            "",
        ]
        if release.accuracy:
            lines += [f"- ground truth: {describe_truth(release.accuracy)}", ""]
        lines += [
            "| time | decision | by | share of traffic | requests | errors | error rate | p95 ms | accuracy | reason |",
            "| --- | --- | --- | --: | --: | --: | --: | --: | --: | --- |",
        ]
        for s in release.steps:
            lines.append(
                f"| {iso_time(s.time)} | {s.decision} | {s.source} | {s.share_percent:g}% | {_cell(s.requests)} | "
                f"{_cell(s.errors)} | {_cell(s.error_rate)} | {_cell(s.p95_ms)} | {_cell(s.accuracy)} | "
                f"{_cell(s.reason)} |"
            )
        lines.append("")
    return "\n".join(lines + truth_lines(truth))


def describe_truth(accuracy: dict[str, Any]) -> str:
    """`canary v2: accuracy 0.0 over 23 labels; champion v1: accuracy 1.0 over 210 labels`."""
    parts = []
    for role, counted in accuracy.items():
        key = "accuracy" if "accuracy" in counted else "mae"
        parts.append(f"{role} {counted['version']}: {key} {_cell(counted[key])} over {counted['labelled']} labels")
    return "; ".join(parts)


def truth_lines(truth: dict[str, Any] | None) -> list[str]:
    """The model's ground truth in the window: each version and each shadow against the fed-back truth."""
    if not truth:
        return []
    key = "accuracy" if truth["kind"] == "classification" else "mae"
    lines = ["## Ground truth", "", f"| version | role | labelled | {key} |", "| --- | --- | --: | --: |"]
    for role, versions in (("served", truth["versions"]), ("shadow", truth["shadows"])):
        lines += [f"| {v} | {role} | {c['labelled']} | {_cell(c[key])} |" for v, c in versions.items()]
    return [*lines, ""]


def render_json(
    model: str, releases: list[Release], since: float | None, truth: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"model": model, "since": since, "releases": [r.to_json() for r in releases], "ground_truth": truth}
