"""The rollout state file: the live weight overrides, the source of truth across restarts.

The control plane is its only writer (atomic replace); broker workers poll it so
`GET /models` and the features to fetch follow the live weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.rollout.weights import LiveWeights


class StateFileInvalid(ValueError):
    """The state file exists but cannot be read as rollout state; nobody should guess its contents."""


@dataclass(frozen=True, slots=True)
class RolloutState:
    # Bumped on every change; also the RTDS version Envoy acknowledges.
    revision: int = 0
    overrides: LiveWeights = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "weights": self.overrides}


def parse_state(doc: Any) -> RolloutState:
    if not isinstance(doc, dict) or not isinstance(doc.get("revision"), int):
        raise StateFileInvalid("expected {'revision': int, 'weights': {model: {version: weight}}}")
    if not isinstance(doc.get("weights"), dict):
        raise StateFileInvalid("expected {'revision': int, 'weights': {model: {version: weight}}}")
    overrides: LiveWeights = {}
    for model, weights in doc["weights"].items():
        if not isinstance(weights, dict) or not all(isinstance(w, int) for w in weights.values()):
            raise StateFileInvalid(f"weights of {model!r} must map version names to integers")
        overrides[str(model)] = {str(v): int(w) for v, w in weights.items()}
    return RolloutState(doc["revision"], overrides)


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
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(state.to_json(), out, indent=2, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def state_signature(path: str | Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of the file, cheap to poll; None while it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
