"""The rollout state file: the live weight overrides, the source of truth across restarts.

The control plane is its only writer (atomic replace) and reader; brokers and
Envoys hear of the live weights from it over RTDS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.registry import write_json_atomically
from extproc.rollout.weights import LiveWeights


class StateFileInvalid(ValueError):
    """The state file exists but cannot be read as rollout state; nobody should guess its contents."""


@dataclass(frozen=True, slots=True)
class RolloutState:
    # Bumped on every change; also the RTDS version Envoy acknowledges.
    revision: int = 0
    overrides: LiveWeights = field(default_factory=dict)
    # The registry's declared split of each overridden model when the override was made:
    # a registry that declares another split since then wins over the override.
    declared: LiveWeights = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "weights": self.overrides, "declared": self.declared}


SHAPE = "expected {'revision': int, 'weights': {model: {version: weight}}, 'declared': {...}}"


def _live_weights(doc: Any, key: str) -> LiveWeights:
    found = doc.get(key, {})
    if not isinstance(found, dict):
        raise StateFileInvalid(SHAPE)
    out: LiveWeights = {}
    for model, weights in found.items():
        if not isinstance(weights, dict) or not all(isinstance(w, int) for w in weights.values()):
            raise StateFileInvalid(f"{key} of {model!r} must map version names to integers")
        out[str(model)] = {str(v): int(w) for v, w in weights.items()}
    return out


def parse_state(doc: Any) -> RolloutState:
    """`declared` may be absent: state files written before it existed still load."""
    if not isinstance(doc, dict) or not isinstance(doc.get("revision"), int) or "weights" not in doc:
        raise StateFileInvalid(SHAPE)
    return RolloutState(doc["revision"], _live_weights(doc, "weights"), _live_weights(doc, "declared"))


def load_state(path: str | Path) -> RolloutState:
    """The saved state; no file yet means no overrides (the registry's weights apply)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return RolloutState()
    try:
        return parse_state(json.loads(text))
    except json.JSONDecodeError as exc:
        raise StateFileInvalid(f"{path}: not JSON ({exc})") from None


def save_state(path: str | Path, state: RolloutState) -> None:
    """Write-then-rename, fsynced: a reader sees the old state or the new one, never half."""
    write_json_atomically(path, state.to_json())
