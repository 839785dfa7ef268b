"""How `model-broker weights` finds the broker that `up`/`demo` started on this machine, and its token.

The control plane drops one small file (its admin URL and token, mode 0600) in a
per-user runtime directory while it runs; the CLI reads the ones whose process is alive,
with or without `--admin URL`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

RUNTIME_DIR_ENV = "MODEL_BROKER_RUNTIME_DIR"
TOKEN_ENV = "MODEL_BROKER_ADMIN_TOKEN"
# Host names that reach this machine's own listeners: `--admin http://localhost:9466` names the
# admin API announced as http://127.0.0.1:9466 (or http://0.0.0.0:9466 in a pod).
_THIS_MACHINE = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})


@dataclass(frozen=True, slots=True)
class AdminEndpoint:
    url: str
    token: str
    pid: int
    registry: str


def runtime_dir() -> Path:
    """`$MODEL_BROKER_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/model-broker`, else a per-user temp dir."""
    if explicit := os.environ.get(RUNTIME_DIR_ENV):
        return Path(explicit)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "model-broker"
    return Path(tempfile.gettempdir()) / f"model-broker-{os.getuid()}"


def announce(endpoint: AdminEndpoint) -> Path:
    """Write this control plane's file; only the owner may read it (it holds the token)."""
    directory = runtime_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"control-plane-{endpoint.pid}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(dataclasses.asdict(endpoint), out)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_endpoints() -> list[AdminEndpoint]:
    """Control planes announced on this machine whose process still runs."""
    found = []
    for path in sorted(runtime_dir().glob("control-plane-*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            doc = json.loads(path.read_text(encoding="utf-8"))
            endpoint = AdminEndpoint(str(doc["url"]), str(doc["token"]), int(doc["pid"]), str(doc["registry"]))
            if _alive(endpoint.pid):
                found.append(endpoint)
    return found


def _listener(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) an admin URL connects to; every name of this machine counts as one host."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    return parts.scheme, "" if host in _THIS_MACHINE else host, port


def announced_for(url: str) -> AdminEndpoint | None:
    """The running control plane announced on this machine whose admin API `url` reaches, if any."""
    wanted = _listener(url)
    if wanted is None:
        return None
    return next((e for e in running_endpoints() if _listener(e.url) == wanted), None)
