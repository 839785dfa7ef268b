"""Rollout: `report` (a model's releases from the control plane's events) and `weights` (live traffic split)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from extproc.cli.inputs import WHEN_HELP, command, read_registry

if TYPE_CHECKING:
    from extproc.cli.inputs import Subcommands


def cmd_report(args: argparse.Namespace) -> int:
    """`report MODEL`: every release of the model in the window, from the control plane's persisted events."""
    from datetime import datetime

    from extproc.audit.record import parse_when
    from extproc.rollout.events import read_events
    from extproc.rollout.feedback_desk import read_labels
    from extproc.rollout.report import add_ground_truth, build_releases, render_json, render_markdown

    registry = read_registry(args.config, envoy_files=False)
    if registry is None:
        return 2
    since = None
    if args.since:
        when = parse_when(args.since, time.time())
        if when is None:
            print(f"--since: {WHEN_HELP}", file=sys.stderr)
            return 2
        since = datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    events = read_events(registry.control_plane.state_file, model=args.model, since=since)
    releases = build_releases(events, args.model)
    labels = [
        label
        for label in read_labels(registry.control_plane.state_file)
        if label.get("model") == args.model and (since is None or label.get("time", 0) >= since)
    ]
    truth = add_ground_truth(releases, labels)
    if args.format == "json":
        print(json.dumps(render_json(args.model, releases, since, truth), indent=2))
    elif args.format == "html":
        from extproc.rollout.report_html import ChartUnavailable, render_html

        try:
            print(render_html(args.model, releases, events, since, truth))
        except ChartUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        print(render_markdown(args.model, releases, since, truth))
    return 0


def add_report(sub: Subcommands) -> None:
    p = command(sub, "report", "every release and rollback of a model: steps, traffic share, errors, p95")
    p.add_argument("model")
    p.add_argument("--since", help="ISO date/time (UTC unless an offset is given) or age: 2h (default: all)")
    p.add_argument("--format", choices=["md", "json", "html"], default="md")
    p.set_defaults(func=cmd_report)


def cmd_weights(args: argparse.Namespace) -> int:
    from extproc.rollout.client import set_weights, show_weights

    if args.action == "show":
        return show_weights(args.admin)
    if not args.model or not args.assignments:
        print("usage: model-broker weights set MODEL VERSION=WEIGHT ...", file=sys.stderr)
        return 2
    return set_weights(args.admin, args.model, args.assignments)


def add_weights(sub: Subcommands) -> None:
    p = command(sub, "weights", "show or change live traffic weights on every Envoy (no restart)", config=False)
    p.add_argument("action", choices=["show", "set"])
    p.add_argument("model", nargs="?", help="model name (set)")
    p.add_argument("assignments", nargs="*", metavar="VERSION=WEIGHT", help="a weight for every version (set)")
    p.add_argument(
        "--admin", help="admin API URL (default: the broker `up`/`demo` started here); token: $MODEL_BROKER_ADMIN_TOKEN"
    )
    p.set_defaults(func=cmd_weights)


def take_weights_words(args: argparse.Namespace, extra: list[str]) -> bool:
    """Put `weights set` words argparse left over back in order; False if `extra` is not such words.

    argparse fills positionals before the first option: `weights set --admin URL m v1=1`
    leaves the model and split over.
    """
    if args.func is not cmd_weights or any(word.startswith("-") for word in extra):
        return False
    words = [word for word in (args.model, *args.assignments) if word] + extra
    args.model, args.assignments = words[0], words[1:]
    return True
