"""Cross-section checks a schema cannot express; every problem reported with its field path.

`parse_registry` validates a parsed document and raises `RegistryInvalid` with them all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from extproc import wire
from extproc.registry.common import ALL_ROUTES
from extproc.registry.document import Registry
from extproc.registry.ensembles import Ensemble, EnsembleMember
from extproc.registry.feast_refs import feast_problems
from extproc.registry.logic import logic_problems
from extproc.registry.models import Model
from extproc.registry.open_inference import is_v2_path, model_problems
from extproc.registry.patterns import describe


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a registry, at a field path like `models[0].versions[1].weight`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class RegistryInvalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(error: ErrorDetails) -> str:
    """Pydantic's message, except that a pattern is said in words with an example: a regex helps nobody fix a file."""
    if error["type"] == "string_pattern_mismatch":
        words = describe(str(error.get("ctx", {}).get("pattern", "")))
        if words is not None:
            got = repr(error["input"])
            return f"should be {words}; got {got if len(got) <= 60 else got[:57] + '...'}"
    return error["msg"]


def _unique_names(reg: Registry) -> Iterator[Problem]:
    kinds = (
        ("entities", [e.name for e in reg.entities]),
        ("models", [m.name for m in reg.models]),
        ("ensembles", [e.name for e in reg.ensembles]),
        ("consumers", [c.name for c in reg.consumers]),
    )
    for kind, names in kinds:
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                yield Problem(f"{kind}[{i}].name", f"duplicate name '{name}'")
            seen.add(name)


def _model_references(reg: Registry) -> Iterator[Problem]:
    reserved = {wire.PATH_HEALTHZ, wire.PATH_MODELS, wire.PATH_FEEDBACK}
    paths: dict[str, int] = {}
    for i, model in enumerate(reg.models):
        here = f"models[{i}]"
        entity = reg.entity(model.entity)
        if entity is None:
            known = ", ".join(e.name for e in reg.entities) or "none declared"
            yield Problem(f"{here}.entity", f"unknown entity '{model.entity}' (known: {known})")
        join_key = entity.join_key if entity is not None else ""
        yield from (Problem(at, message) for at, message in model_problems(model, join_key, here))
        if model.path in reserved:
            yield Problem(f"{here}.path", f"'{model.path}' is reserved for the broker")
        elif model.path in paths:
            yield Problem(f"{here}.path", f"'{model.path}' is already the path of models[{paths[model.path]}]")
        paths.setdefault(model.path, i)
        if not model.versions and model.registry is None:
            yield Problem(f"{here}.versions", "declare at least one version")
        elif model.versions and not model.live_versions:
            yield Problem(f"{here}.versions", "at least one version needs a weight above 0")
        seen: set[str] = set()
        for j, version in enumerate(model.versions):
            if version.name in seen:
                yield Problem(f"{here}.versions[{j}].name", f"duplicate version '{version.name}'")
            seen.add(version.name)
        if model.shadow is not None and model.shadow.version not in seen:
            yield Problem(f"{here}.shadow.version", f"'{model.shadow.version}' is not a version of {model.name}")
        if model.rollout is not None and model.rollout.canary not in (*seen, None):
            yield Problem(f"{here}.rollout.canary", f"'{model.rollout.canary}' is not a version of {model.name}")
        yield from _feedback(reg, model, here)


def _feedback(reg: Registry, model: Model, here: str) -> Iterator[Problem]:
    """Ground truth is joined to the audit record, and an accuracy gate needs ground truth."""
    if model.feedback is not None and not reg.audited(model):
        yield Problem(f"{here}.feedback", "feedback is joined to the audit record: the model must be audited")
    if model.rollout is not None and model.rollout.accuracy is not None and model.feedback is None:
        yield Problem(f"{here}.rollout.accuracy", "an accuracy gate needs `feedback` (kind, answer_field)")


def _model_logic(reg: Registry) -> Iterator[Problem]:
    """Every derived feature and rule compiles (CEL, type-checked) and names what exists."""
    for i, model in enumerate(reg.models):
        for path, message in logic_problems(model, {v.name for v in model.versions}):
            yield Problem(f"models[{i}].{path}", message)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _ensemble_references(reg: Registry) -> Iterator[Problem]:
    taken = {m.path: f"already the path of models[{i}]" for i, m in enumerate(reg.models)}
    taken.update(dict.fromkeys((wire.PATH_HEALTHZ, wire.PATH_MODELS, wire.PATH_FEEDBACK), "reserved for the broker"))
    if reg.needs_egress and not _is_loopback(reg.egress.address):
        # Requests on the egress listener skip the broker: nothing off this host may reach it.
        yield Problem("egress.address", f"'{reg.egress.address}' is not a loopback address")
    for i, ensemble in enumerate(reg.ensembles):
        here = f"ensembles[{i}]"
        if ensemble.path in taken:
            yield Problem(f"{here}.path", f"'{ensemble.path}' is {taken[ensemble.path]}")
        elif is_v2_path(ensemble.path):
            yield Problem(f"{here}.path", "paths under /v2/ are the Open Inference Protocol's")
        taken.setdefault(ensemble.path, f"already the path of {here}")
        if ensemble.required_successes > len(ensemble.members):
            yield Problem(
                f"{here}.min_success",
                f"{ensemble.required_successes} exceeds the {len(ensemble.members)} member(s) declared",
            )
        slowest = max(range(len(ensemble.members)), key=lambda j: ensemble.members[j].timeout_ms)
        if ensemble.members[slowest].timeout_ms > ensemble.deadline_ms:
            yield Problem(
                f"{here}.deadline_ms",
                f"{ensemble.deadline_ms} ms is shorter than members[{slowest}].timeout_ms "
                f"({ensemble.members[slowest].timeout_ms} ms)",
            )
        yield from _members(reg, ensemble, here)


def _members(reg: Registry, ensemble: Ensemble, here: str) -> Iterator[Problem]:
    """Members must be distinct models of one entity: one store round trip for all."""
    seen: set[str] = set()
    entity: tuple[str, int] | None = None
    for j, member in enumerate(ensemble.members):
        at = f"{here}.members[{j}]"
        model = reg.model(member.model)
        if member.model in seen:
            yield Problem(f"{at}.model", f"'{member.model}' is already a member")
        seen.add(member.model)
        if model is None:
            # Only models are members, so ensembles cannot form cycles.
            known = ", ".join(m.name for m in reg.models) or "none declared"
            what = (
                f"'{member.model}' is an ensemble; members must be models"
                if reg.ensemble(member.model)
                else f"unknown model '{member.model}'"
            )
            yield Problem(f"{at}.model", f"{what} (models: {known})")
            continue
        if model.registry is not None:
            # Its versions come and go with the registry's aliases; it is not served before the first.
            yield Problem(f"{at}.model", f"'{member.model}' follows a model registry and cannot be a member")
            continue
        yield from _member_output(ensemble, member, model.protocol, at)
        if entity is None:
            entity = (model.entity, j)
        elif model.entity != entity[0]:
            yield Problem(
                f"{at}.model",
                f"entity '{model.entity}' differs from '{entity[0]}' of members[{entity[1]}]; "
                "an ensemble fetches one entity's features in one store call",
            )


def _member_output(ensemble: Ensemble, member: EnsembleMember, protocol: str, at: str) -> Iterator[Problem]:
    """An OIP answer has no top-level fields: its member says which output element the combiner reads."""
    reads_field = ensemble.aggregation.field is not None
    if protocol == "open_inference" and reads_field and member.output is None:
        yield Problem(f"{at}.output", "an open_inference member needs 'output' ({tensor, index}) for the combiner")
    if protocol != "open_inference" and member.output is not None:
        yield Problem(f"{at}.output", "only for open_inference members; JSON answers are read by 'aggregation.field'")


def _ports_and_budgets(reg: Registry) -> Iterator[Problem]:
    ports = [("listener.port", reg.listener.port), ("admin.port", reg.admin.port), ("metrics.port", reg.metrics.port)]
    plane = reg.control_plane
    ports += [("control_plane.port", plane.port), ("control_plane.admin_port", plane.admin_port)]
    if reg.takes_feedback:
        ports.append(("control_plane.feedback_port", plane.feedback_port))
    ports += [(f"broker.port (worker {w})", reg.broker.port + w) for w in range(reg.broker.workers)]
    if reg.broker.transport != "grpc":
        ports += [(f"broker.http_port (worker {w})", reg.broker.http_port + w) for w in range(reg.broker.workers)]
    if reg.needs_egress:
        ports.append(("egress.port", reg.egress.port))
    taken: dict[int, str] = {}
    for where, port in ports:
        if port > 65535:
            yield Problem("broker.workers", f"worker ports run past 65535 ({port})")
        elif port in taken:
            yield Problem(where.split(" ")[0], f"port {port} is also {taken[port]}")
        taken.setdefault(port, where)
    if reg.broker.message_timeout_ms <= reg.feature_store.timeout_ms:
        yield Problem(
            "broker.message_timeout_ms",
            f"must exceed feature_store.timeout_ms ({reg.feature_store.timeout_ms}) "
            "or Envoy gives up before the broker can answer 503",
        )


def _consumer_references(reg: Registry) -> Iterator[Problem]:
    """Allow-lists name real routes; a key or a token identifies exactly one consumer."""
    routes = {*(name for name, _ in reg.route_names()), ALL_ROUTES}
    keys: dict[str, str] = {}
    tokens: dict[tuple[str, str | None], str] = {}
    for i, consumer in enumerate(reg.consumers):
        here = f"consumers[{i}]"
        for j, name in enumerate(consumer.models):
            if name not in routes:
                known = ", ".join(n for n, _ in reg.route_names()) or "none declared"
                yield Problem(f"{here}.models[{j}]", f"unknown model or ensemble '{name}' (known: {known}, or '*')")
        for j, key in enumerate(consumer.api_keys):
            if key in keys:
                yield Problem(f"{here}.api_keys[{j}]", f"the same key hash is already {keys[key]}")
            keys.setdefault(key, f"{here}.api_keys[{j}]")
        if consumer.jwt is not None:
            issuer, subject = consumer.jwt.issuer, consumer.jwt.subject
            # A consumer without a subject takes every token of its issuer: sharing it would be ambiguous.
            clash = tokens.get((issuer, subject)) or tokens.get((issuer, None))
            if clash is None and subject is None:
                clash = next((where for (i, _), where in tokens.items() if i == issuer), None)
            if clash is not None:
                yield Problem(f"{here}.jwt", f"a token could match both this consumer and {clash} (same issuer)")
            tokens.setdefault((issuer, subject), here)
    if reg.admin.public_endpoints and reg.consumers and not any(c.admin for c in reg.consumers):
        yield Problem("admin.public_endpoints", "no consumer has 'admin: true', so nobody could call them")


def _audit_references(reg: Registry) -> Iterator[Problem]:
    if reg.audit is None:
        for i, model in enumerate(reg.models):
            if model.audit:
                yield Problem(f"models[{i}].audit", "audit is on but the registry has no 'audit' section")
        return
    share = reg.audit.spool.max_bytes // reg.broker.workers
    if reg.audit.spool.segment_bytes > share:
        yield Problem(
            "audit.spool.segment_bytes",
            f"must not exceed each worker's share of max_bytes ({share} bytes for {reg.broker.workers} workers)",
        )


def _batch_problems(reg: Registry) -> Iterator[Problem]:
    """A batch is N rows in one JSON body: no OIP request (its rows are tensors), no per-request logic."""
    for i, model in enumerate(reg.models):
        if model.batch is None:
            continue
        if model.protocol == "open_inference":
            yield Problem(f"models[{i}].batch", "an open_inference model takes its rows as tensors; drop 'batch'")
        if model.derived or model.rules:
            yield Problem(f"models[{i}].batch", "derived features and rules take one row; drop 'batch' or them")


def _cross_references(reg: Registry) -> Iterator[Problem]:
    """What field validation cannot see: names that must exist, be unique or not collide."""
    yield from _unique_names(reg)
    yield from _model_references(reg)
    yield from _model_logic(reg)
    yield from _ensemble_references(reg)
    yield from _ports_and_budgets(reg)
    yield from _consumer_references(reg)
    if not _is_loopback(reg.admin.address):
        # Envoy's admin interface has no authentication and can stop Envoy or rewrite its runtime.
        yield Problem("admin.address", f"'{reg.admin.address}' is not loopback; Envoy's admin interface must not be")
    yield from _audit_references(reg)
    yield from (Problem(path, message) for path, message in feast_problems(reg))
    yield from _batch_problems(reg)


def parse_registry(data: Any) -> Registry:
    """Validate an already-parsed document; raise `RegistryInvalid` with every problem."""
    if not isinstance(data, dict):
        raise RegistryInvalid([Problem("", "the registry must be a YAML mapping")])
    try:
        reg = Registry.model_validate(data)
    except ValidationError as exc:
        raise RegistryInvalid([Problem(_loc(e["loc"]), _message(e)) for e in exc.errors()]) from None
    problems = list(_cross_references(reg))
    if problems:
        raise RegistryInvalid(problems)
    return reg
