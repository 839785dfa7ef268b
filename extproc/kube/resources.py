"""Custom resources → one `Registry`, and the status each resource gets.

Pure: the reconciler lists the resources and writes statuses; this module only
decides. A resource that is invalid alone or that collides with an older one
is left out with its reasons; the others are still served.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.kube.crds import CONDITION_ACCEPTED, KINDS, Kind, kind_named
from extproc.registry import ALL_ROUTES, Problem, Registry, RegistryInvalid, parse_registry

# Conditions are read by people in `kubectl describe`; a long list of problems is cut here.
MAX_MESSAGE = 4096

_ENTRY = re.compile(r"^(?P<field>[a-z_]+)\[(?P<index>\d+)\](?P<rest>.*)$")
_MENTION = re.compile(r"\b(?P<field>[a-z_]+)\[(?P<index>\d+)\]")

Resource = Mapping[str, Any]
ResourceKey = tuple[str, str]  # (kind, metadata.name)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the broker says about one resource: its `Accepted` condition."""

    accepted: bool
    reason: str
    message: str
    generation: int


@dataclass(frozen=True, slots=True)
class Conversion:
    """The registry built from base + resources (None if the base itself is invalid) and every verdict."""

    registry: Registry | None
    verdicts: dict[ResourceKey, Verdict]
    base_problems: tuple[Problem, ...]
    # Consumers' allow-list entries naming nothing served now (see `_allowed_now`).
    ignored: tuple[str, ...] = ()


def resource_key(resource: Resource) -> ResourceKey:
    return str(resource.get("kind", "")), str(resource.get("metadata", {}).get("name", ""))


def _age_order(resource: Resource) -> tuple[str, str]:
    """Older resources win collisions (same path): the one already serving keeps serving."""
    meta = resource.get("metadata", {})
    return str(meta.get("creationTimestamp", "")), str(meta.get("name", ""))


def registry_entry(resource: Resource) -> dict[str, Any]:
    """A resource as a registry list entry: its spec, named by `metadata.name`."""
    spec = resource.get("spec")
    return {**(spec if isinstance(spec, Mapping) else {}), "name": resource_key(resource)[1]}


def resource_path(rest: str) -> str:
    """A registry sub-path (`.versions[0].weight`, `.name`, ``) as the resource's field path."""
    if rest == ".name":
        return "metadata.name"
    return "spec" + rest


def _mention(match: re.Match[str], owners: Mapping[tuple[str, int], ResourceKey]) -> str:
    """`models[0]` in a message, as the resource it came from (`Model credit-risk`): users never see indexes."""
    owner = owners.get((match["field"], int(match["index"])))
    return f"{owner[0]} {owner[1]}" if owner else match[0]


def _split(
    problems: Sequence[Problem], owners: Mapping[tuple[str, int], ResourceKey]
) -> tuple[dict[ResourceKey, list[str]], list[Problem]]:
    """Problems blamed on a resource (rewritten to its own field paths) and the base's own."""
    blamed: dict[ResourceKey, list[str]] = {}
    base: list[Problem] = []
    for problem in problems:
        match = _ENTRY.match(problem.path)
        owner = owners.get((match["field"], int(match["index"]))) if match else None
        if match is None or owner is None:
            base.append(problem)
            continue
        message = _MENTION.sub(lambda m: _mention(m, owners), problem.message)
        blamed.setdefault(owner, []).append(str(Problem(resource_path(match["rest"]), message)))
    return blamed, base


def _document(
    base: Mapping[str, Any], serving: Sequence[Resource]
) -> tuple[dict[str, Any], dict[tuple[str, int], ResourceKey]]:
    """The registry document and which list index came from which resource."""
    doc = dict(base)
    owners: dict[tuple[str, int], ResourceKey] = {}
    for kind in KINDS:
        entries = list(doc.get(kind.registry_field) or [])
        for resource in serving:
            if resource.get("kind") == kind.kind:
                owners[(kind.registry_field, len(entries))] = resource_key(resource)
                entries.append(registry_entry(resource))
        doc[kind.registry_field] = entries
    return doc, owners


def _allowed_now(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Consumers may only call what is served: entries naming no model or ensemble are left out.

    The base's consumers name models that live as resources, which come and go
    (a deleted or rejected Model); one missing name must not stop everything
    from being served, as it would in a hand-written registry (where it is a typo).
    """
    served = {str(e.get("name")) for kind in KINDS for e in doc.get(kind.registry_field) or [] if isinstance(e, dict)}
    served.add(ALL_ROUTES)
    consumers, ignored = [], []
    for consumer in doc.get("consumers") or []:
        if not isinstance(consumer, dict) or not isinstance(consumer.get("models"), list):
            consumers.append(consumer)  # malformed: parsing reports it
            continue
        missing = [name for name in consumer["models"] if name not in served]
        ignored += [f"consumer {consumer.get('name')!r} may call {name!r}, which is not served" for name in missing]
        consumers.append({**consumer, "models": [name for name in consumer["models"] if name in served]})
    return ({**doc, "consumers": consumers} if "consumers" in doc else doc), ignored


def _generation(resource: Resource) -> int:
    return int(resource.get("metadata", {}).get("generation", 0))


def _accepted_message(kind: Kind, registry: Registry, name: str) -> str:
    entry = next(e for e in getattr(registry, kind.registry_field) if e.name == name)
    path = getattr(entry, "path", None)
    where = f"served at {path}" if path else "served"
    return f"{where} (registry_version {registry.registry_version})"


def convert(base: Mapping[str, Any], resources: Sequence[Resource]) -> Conversion:
    """Merge resources of the known kinds into the base registry document and judge each one.

    Parsing repeats without the resources blamed so far until the rest is
    valid: one bad resource never takes the others down. Problems that belong
    to no resource are the base's: then nothing is served.
    """
    known = sorted((r for r in resources if kind_named(str(r.get("kind"))) is not None), key=_age_order)
    serving = list(known)
    rejected: dict[ResourceKey, list[str]] = {}
    registry: Registry | None = None
    ignored: list[str] = []
    while registry is None:
        doc, owners = _document(base, serving)
        doc, ignored = _allowed_now(doc)
        try:
            registry = parse_registry(doc)
        except RegistryInvalid as exc:
            blamed, base_problems = _split(exc.problems, owners)
            if base_problems:
                return Conversion(None, {}, tuple(base_problems))
            rejected.update(blamed)
            serving = [r for r in serving if resource_key(r) not in blamed]
    verdicts: dict[ResourceKey, Verdict] = {}
    for resource in known:
        key = resource_key(resource)
        if key in rejected:
            message = "; ".join(rejected[key])[:MAX_MESSAGE]
            verdicts[key] = Verdict(False, "Invalid", message, _generation(resource))
        else:
            kind = kind_named(key[0])
            assert kind is not None  # `known` holds only known kinds
            message = _accepted_message(kind, registry, key[1])
            verdicts[key] = Verdict(True, CONDITION_ACCEPTED, message, _generation(resource))
    return Conversion(registry, verdicts, (), tuple(ignored))


def _condition(verdict: Verdict, transition_time: str) -> dict[str, Any]:
    return {
        "type": CONDITION_ACCEPTED,
        "status": "True" if verdict.accepted else "False",
        "reason": verdict.reason,
        "message": verdict.message,
        "observedGeneration": verdict.generation,
        "lastTransitionTime": transition_time,
    }


def status_update(resource: Resource, verdict: Verdict, now: str) -> dict[str, Any] | None:
    """The new `status` for a resource, or None when it already says this.

    Skipping unchanged statuses matters: each status write is a watch event,
    and rewriting an equal status would loop forever. `lastTransitionTime`
    moves only when the condition's status flips, as `metav1.Condition` says.
    """
    status = resource.get("status") or {}
    conditions = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)]
    current = next((c for c in conditions if c.get("type") == CONDITION_ACCEPTED), None)
    since = now
    if current is not None and current.get("status") == ("True" if verdict.accepted else "False"):
        since = str(current.get("lastTransitionTime", now))
    wanted = _condition(verdict, since)
    if current == wanted and status.get("observedGeneration") == verdict.generation:
        return None
    others = [c for c in conditions if c.get("type") != CONDITION_ACCEPTED]
    return {"observedGeneration": verdict.generation, "conditions": [*others, wanted]}
