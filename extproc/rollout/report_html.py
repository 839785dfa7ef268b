"""The HTML release report: the Markdown report's tables plus one chart a person reads at a glance.

The chart (matplotlib, drawn as inline SVG: no script, no network) shows each version's
share of traffic over time, and beneath it the error rate each canary was judged on.
matplotlib is the optional `report` extra; it is imported only here.
"""

from __future__ import annotations

import html
import io
import time
from collections.abc import Iterable
from typing import Any

from extproc.rollout.events import Event
from extproc.rollout.report import WEIGHT_EVENTS, Release, describe_truth, iso_time

STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#f3f3f3}td:nth-child(2),td:nth-child(3),td:last-child{text-align:left}
.promoted{color:#1a7f37}.rolled_back{color:#cf222e}"""


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed (`pip install 'model-broker[report]'`)."""


def share_series(events: Iterable[Event], model: str) -> dict[str, list[tuple[float, float]]]:
    """(time, percent of traffic) per version, one point per weight change of `model`."""
    series: dict[str, list[tuple[float, float]]] = {}
    for event in sorted((e for e in events if e.get("model") == model), key=lambda e: e.get("time", 0)):
        if event.get("event") not in WEIGHT_EVENTS:
            continue
        after = event.get("after") or {}
        total = sum(after.values()) or 1
        for version, weight in after.items():
            series.setdefault(version, []).append((float(event["time"]), 100 * weight / total))
    return series


def chart_svg(events: list[Event], model: str, releases: list[Release]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as exc:
        raise ChartUnavailable("the HTML report needs matplotlib: pip install 'model-broker[report]'") from exc
    series = share_series(events, model)
    # One colour per version in both panels, so a canary's error rate sits under its own traffic line.
    palette = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted(set(series) | {r.version for r in releases})
    colour = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    start = min((p[0] for points in series.values() for p in points), default=time.time())
    figure, (share, errors) = pyplot.subplots(2, 1, figsize=(9, 5), sharex=True, height_ratios=(2, 1))
    for version, points in sorted(series.items()):
        xs = [(t - start) / 60 for t, _ in points]
        share.step(xs, [p for _, p in points], where="post", label=version, linewidth=2, color=colour[version])
    share.set_ylabel("traffic share (%)")
    share.set_ylim(-5, 105)
    share.legend(loc="center left", bbox_to_anchor=(1, 0.5), title="version")
    share.set_title(f"{model}: traffic share and canary error rate over time")
    for release in releases:
        judged = [(s.time, s.error_rate) for s in release.steps if s.error_rate is not None]
        if judged:
            errors.plot(
                [(t - start) / 60 for t, _ in judged], [100 * r for _, r in judged], "o-", label=release.version
            )
    errors.set_ylabel("error rate (%)")
    errors.set_xlabel(f"minutes since {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(start))}")
    if errors.lines:
        errors.legend(loc="center left", bbox_to_anchor=(1, 0.5), title="canary")
    figure.tight_layout()
    out = io.StringIO()
    figure.savefig(out, format="svg")
    pyplot.close(figure)
    svg = out.getvalue()
    return svg[svg.index("<svg") :]


def _cell(value: object) -> str:
    return "—" if value is None else html.escape(str(value))


def render_html(
    model: str, releases: list[Release], events: list[Event], since: float | None, truth: dict[str, Any] | None = None
) -> str:
    title = f"Releases of {model}" + (f" since {iso_time(since)}" if since is not None else "")
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<figure>{chart_svg(events, model, releases)}</figure>"
        if events
        else "<p>No rollout event in this window.</p>",
    ]
    for r in releases:
        origin = f" (registry version {r.registry_version})" if r.registry_version is not None else ""
        parts += [
            f"<h2>{html.escape(r.version)}{origin}: <span class={r.outcome}>{r.outcome.replace('_', ' ')}</span></h2>",
            f"<p>started {iso_time(r.started_at)} by {html.escape(r.started_by)}"
            + (f", champion {html.escape(r.champion)}" if r.champion else "")
            + f"; ended {iso_time(r.ended_at)}"
            + (f": {html.escape(str(r.reason))}" if r.reason else "")
            + "</p>",
            f"<p>ground truth: {html.escape(describe_truth(r.accuracy))}</p>" if r.accuracy else "",
            "<table><tr><th>time</th><th>decision</th><th>by</th><th>share</th><th>requests</th><th>errors</th>"
            "<th>error rate</th><th>p95 ms</th><th>accuracy</th><th>reason</th></tr>",
        ]
        parts += [
            f"<tr><td>{iso_time(s.time)}</td><td>{s.decision}</td><td>{_cell(s.source)}</td><td>{s.share_percent:g}%</td>"
            f"<td>{_cell(s.requests)}</td><td>{_cell(s.errors)}</td><td>{_cell(s.error_rate)}</td>"
            f"<td>{_cell(s.p95_ms)}</td><td>{_cell(s.accuracy)}</td><td>{_cell(s.reason)}</td></tr>"
            for s in r.steps
        ]
        parts.append("</table>")
    if not releases:
        parts.append("<p>No release in this window.</p>")
    if truth:
        key = "accuracy" if truth["kind"] == "classification" else "mae"
        parts.append(
            f"<h2>Ground truth</h2><table><tr><th>version</th><th>role</th><th>labelled</th><th>{key}</th></tr>"
        )
        for role, versions in (("served", truth["versions"]), ("shadow", truth["shadows"])):
            parts += [
                f"<tr><td>{html.escape(v)}</td><td>{role}</td><td>{c['labelled']}</td><td>{_cell(c[key])}</td></tr>"
                for v, c in versions.items()
            ]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
