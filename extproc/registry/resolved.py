"""The versions file: what the control plane resolved from a model registry, merged in as the registry loads.

Only the control plane writes it (atomic replace, beside its state file); every process
that loads the registry reads it, so broker workers, Envoy's config watcher and the
control plane serve the same versions. A model whose registry was never resolved is
not served yet.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from extproc.registry.checks import Problem
from extproc.registry.model_registry import BackendTemplate
from extproc.registry.models import Backend

# What a registry version number becomes as a broker version name (a DNS label).
VERSION_NAME = "v{version}"
DEFAULT_STATE_FILE = "rollout-state.json"
# A DNS name or an IPv4 address, as Envoy's STRICT_DNS clusters take them.
HOSTNAME = r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"


def version_name(number: int) -> str:
    return VERSION_NAME.format(version=number)


def versions_path(state_file: str | Path) -> Path:
    return Path(state_file).with_suffix(".versions.json")


@dataclass(frozen=True, slots=True)
class ResolvedVersion:
    number: int
    weight: int
    features: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """One model as the control plane serves it from the registry: its champion, and a canary in flight."""

    champion: int
    versions: tuple[ResolvedVersion, ...]
    canary: int | None = None
    # Challengers rolled back: not canaried again while the alias stays on them.
    rejected: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "champion": self.champion,
            "canary": self.canary,
            "rejected": list(self.rejected),
            "versions": [{"number": v.number, "weight": v.weight, "features": list(v.features)} for v in self.versions],
        }

    @staticmethod
    def from_json(doc: Any) -> ResolvedModel:
        """Raises ValueError (KeyError, TypeError) on anything but what `to_json` writes."""
        versions = tuple(
            ResolvedVersion(_int(v["number"]), _int(v["weight"]), tuple(str(f) for f in v["features"]))
            for v in doc["versions"]
        )
        canary = doc.get("canary")
        return ResolvedModel(
            _int(doc["champion"]),
            versions,
            None if canary is None else _int(canary),
            tuple(_int(n) for n in doc.get("rejected", ())),
        )


Resolved = dict[str, ResolvedModel]


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, not {value!r}")
    return value


def read_versions(path: str | Path) -> Resolved | Problem:
    """The resolved models; none when the file does not exist yet (nothing resolved)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        doc = json.loads(text)
        return {str(name): ResolvedModel.from_json(entry) for name, entry in doc["models"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return Problem("control_plane.state_file", f"the versions file {path} is not valid ({exc!r})")


def write_versions(path: str | Path, resolved: Mapping[str, ResolvedModel]) -> None:
    write_json_atomically(path, {"models": {name: entry.to_json() for name, entry in sorted(resolved.items())}})


def write_json_atomically(path: str | Path, doc: Any) -> None:
    """Write-then-rename, fsynced: a reader sees the old file or the new one, never half."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(doc, out, indent=2, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_backend(template: BackendTemplate, number: int) -> Backend | str:
    """The backend of registry version `number`, or why the template cannot give a valid one."""
    try:
        doc = _format(template.model_dump(exclude_none=True), number)
    except (KeyError, IndexError, ValueError) as exc:
        return f"only {{version}} may be substituted in a backend_template ({exc!r})"
    try:
        backend = Backend.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return f"the backend_template gives an invalid backend for version {number}: {problems}"
    if backend.service is not None and not re.match(HOSTNAME, backend.service.host):
        return f"the backend_template gives an invalid host for version {number}: {backend.service.host!r}"
    return backend


def _format(value: object, number: int) -> object:
    if isinstance(value, str):
        return value.format(version=number)
    if isinstance(value, dict):
        return {k: _format(v, number) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_format(v, number) for v in value]
    return value


def merge_versions(data: Any, resolved: Mapping[str, ResolvedModel]) -> tuple[Any, list[Problem]]:
    """The registry document with each registry-followed model's resolved versions (and canary) filled in.

    Such a model may not declare `versions` or `rollout.canary` itself: the model registry owns them.
    Anything malformed is left for the schema to report.
    """
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        return data, []
    out = copy.deepcopy(data)
    problems = list(_declared_by_hand(out["models"]))
    if problems:
        return data, problems
    for model in out["models"]:
        if not isinstance(model, dict) or "registry" not in model:
            continue
        entry = resolved.get(str(model.get("name")))
        template = model.get("backend_template")
        model["versions"] = [] if entry is None else [_version_doc(v, template) for v in entry.versions]
        rollout = model.get("rollout")
        if entry is not None and entry.canary is not None and isinstance(rollout, dict):
            rollout["canary"] = version_name(entry.canary)
    return out, []


def _declared_by_hand(models: list[Any]) -> Iterator[Problem]:
    for i, model in enumerate(models):
        if not isinstance(model, dict) or "registry" not in model:
            continue
        if "versions" in model:
            yield Problem(f"models[{i}].versions", "versions come from the model registry: remove them")
        rollout = model.get("rollout")
        if isinstance(rollout, dict) and "canary" in rollout:
            yield Problem(f"models[{i}].rollout.canary", "the canary is the registry's challenger: remove it")


def _version_doc(version: ResolvedVersion, template: Any) -> dict[str, Any]:
    try:
        backend = _format(template, version.number)
    except (KeyError, IndexError, ValueError):
        backend = template  # the template check names the problem
    return {
        "name": version_name(version.number),
        "weight": version.weight,
        "backend": backend,
        "features": list(version.features),
    }
