"""Rollout events as the control plane persisted them, read back: reports and the promotion rate.

Reading goes through `read_events` alone, so where events live can change (issue 16 moves
them into the audit trail) without its readers changing. Pure apart from that one read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Events of a release that the model registry started, and how it ended.
STARTED = "release_started"
PROMOTED = "release_promoted"
ENDED = (PROMOTED, "release_rolled_back", "release_aborted", "release_replaced")

Event = dict[str, Any]


def events_path(state_file: str | Path) -> Path:
    """Rollout events (weight changes, rollbacks, releases) as JSON lines beside the state file."""
    return Path(state_file).with_suffix(".events.jsonl")


def read_events(state_file: str | Path, *, model: str | None = None, since: float | None = None) -> list[Event]:
    """Every event (oldest first), optionally of one model and from a time on; a torn last line is skipped."""
    try:
        lines = events_path(state_file).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash mid-write
        if not isinstance(event, dict):
            continue
        if (model is None or event.get("model") == model) and (since is None or event.get("time", 0) >= since):
            out.append(event)
    return out


@dataclass(frozen=True, slots=True)
class PromotionRate:
    started: int
    promoted: int

    @property
    def rate(self) -> float | None:
        """Promoted over started; None before any release started (no rate, rather than 0)."""
        return self.promoted / self.started if self.started else None


def promotion_rates(events: Iterable[Event]) -> dict[str, PromotionRate]:
    """Per model: releases started from the registry and how many ended promoted."""
    counts: dict[str, tuple[int, int]] = {}
    for event in events:
        kind, model = event.get("event"), str(event.get("model", ""))
        started, promoted = counts.get(model, (0, 0))
        if kind == STARTED:
            counts[model] = (started + 1, promoted)
        elif kind == PROMOTED:
            counts[model] = (started, promoted + 1)
    return {model: PromotionRate(*pair) for model, pair in counts.items()}
