"""What `up` and `demo` print: where the stack listens, and commands that work as printed in a new shell.

Each model and ensemble gets an example request with an entity key its feature
store has, so the printed curl answers 200; the CLI lines name this very program by
a path the user's shell finds and the registry by its absolute path, so they work
from any directory.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc import wire
from extproc.process.supervisor import reachable
from extproc.registry import Entity, Model, Registry, entity_key_source

PROGRAM = "model-broker"
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
REQUEST_ID = "<x-request-id>"

Rows = Mapping[str, Mapping[str, Any]]


def program(which: Callable[[str], str | None] = shutil.which, executable: str = sys.executable) -> str:
    """`model-broker` when the shell finds this very program by that name, else the absolute path that runs it."""
    script = Path(executable).parent / PROGRAM
    if not script.is_file():
        return f"{shlex.quote(executable)} -m extproc.cli"
    found = which(PROGRAM)
    if found is not None and Path(found).resolve() == script.resolve():
        return PROGRAM
    return shlex.quote(str(script.absolute()))


def entity_key_of(store_key: str, entity: Entity) -> str | None:
    """The entity key inside a store key built from the entity's template, or None if it was not built so."""
    prefix, _, suffix = entity.key_template.partition("{" + entity.join_key + "}")
    fits = len(store_key) > len(prefix) + len(suffix) and store_key.startswith(prefix) and store_key.endswith(suffix)
    return store_key[len(prefix) : len(store_key) - len(suffix)] if fits else None


def glob_of(entity: Entity) -> str:
    """A Redis SCAN pattern matching the store keys of an entity (glob characters of the template escaped)."""
    prefix, _, suffix = entity.key_template.partition("{" + entity.join_key + "}")
    return "*".join(_GLOB_SPECIAL.sub(r"\\\1", part) for part in (prefix, suffix))


def sample_key(rows: Rows, entity: Entity, features: set[str]) -> str | None:
    """The first entity key whose stored row has every one of `features` (so an example answers 200)."""
    for store_key, row in rows.items():
        key = entity_key_of(store_key, entity)
        if key is not None and features <= row.keys():
            return key
    return None


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Example:
    """One example request: what to post where, and whether its key is one the store has."""

    path: str
    body: dict[str, Any]
    headers: Headers
    known: bool


def _carrying(
    model: Model | None, join_key: str, key: str, fields: Mapping[str, Any]
) -> tuple[dict[str, Any], Headers]:
    """The body (and header) that carries `key` where the model reads it; `fields` go along in a JSON body only."""
    if model is None or model.protocol != "open_inference":  # an ensemble, or a JSON model
        return {join_key: key, **fields}, ()
    source = entity_key_source(model, join_key)
    if source.input is not None:
        value: str | int = int(key) if source.datatype == "INT64" and key.isdigit() else key
        return {"inputs": [{"name": source.input, "shape": [1], "datatype": source.datatype, "data": [value]}]}, ()
    if source.parameter is not None:
        return {"inputs": [], "parameters": {source.parameter: key}}, ()
    return {"inputs": []}, ((str(source.header), key),)


def example_requests(registry: Registry, rows: Rows, fields: Mapping[str, Any] | None = None) -> list[Example]:
    """An example request for every model, then every ensemble, with a key the store has where it can tell."""
    targets: list[tuple[str, Model | None, str, set[str]]] = [
        (m.path, m, m.entity, {f for v in m.versions for f in (*m.features, *v.features)}) for m in registry.models
    ]
    for ensemble in registry.ensembles:
        members = [m for m in (registry.model(x.model) for x in ensemble.members) if m is not None]
        features = {f for m in members for v in m.versions for f in (*m.features, *v.features)}
        targets.append((ensemble.path, None, members[0].entity if members else "", features))
    out = []
    for path, model, entity_name, features in targets:
        entity = registry.entity(entity_name)
        if entity is None:
            continue
        key = sample_key(rows, entity, features)
        shown = key or f"<a {entity.join_key} in your feature store>"
        body, headers = _carrying(model, entity.join_key, shown, fields or {})
        out.append(Example(path, body, headers, key is not None))
    return out


def curl(url: str, example: Example, *, insecure: bool = False) -> str:
    """A curl line posting the example's JSON body (and headers), showing the response head."""
    flags = "-s -k -i" if insecure else "-s -i"
    headers = "".join(f" -H {shlex.quote(f'{name}: {value}')}" for name, value in example.headers)
    body = shlex.quote(json.dumps(example.body))
    return f"curl {flags} {url} -H 'content-type: application/json'{headers} -d {body}"


def even_split(versions: list[str]) -> str:
    """`v1=50 v2=50`: every version an equal share of 100 (the first ones take the remainder)."""
    share, extra = divmod(100, len(versions))
    return " ".join(f"{name}={share + (1 if i < extra else 0)}" for i, name in enumerate(versions))


def admin_url(registry: Registry) -> str:
    plane = registry.control_plane
    host = reachable(plane.address)
    return f"http://{f'[{host}]' if ':' in host else host}:{plane.admin_port}"


def banner(
    registry: Registry,
    base: str,
    config_path: str,
    *,
    rows: Rows,
    prog: str,
    example_fields: Mapping[str, Any] | None = None,
) -> str:
    """The text `up` prints once the stack answers."""
    config = shlex.quote(str(Path(config_path).absolute()))
    lines = [f"Model Broker is up at {base}  (Ctrl-C stops it)", f"  GET  {base}{wire.PATH_MODELS}"]
    lines += [f"  POST {base}{m.path}" for m in registry.models]
    lines += [f"  POST {base}{e.path}  (ensemble: {', '.join(m.model for m in e.members)})" for e in registry.ensembles]
    if registry.takes_feedback:
        shape = '{"request_id": "<x-request-id>", "truth": ...}'
        lines.append(f"  POST {base}{wire.PATH_FEEDBACK}  (ground truth: {shape})")
    examples = example_requests(registry, rows, example_fields)
    if examples:
        known = all(e.known for e in examples)
        lines.append("Try (each answers 200):" if known else "Try (put in an entity key your feature store has):")
        if registry.consumers:
            lines.append("  # consumers are declared: add -H 'x-api-key: <your key>' to each")
        insecure = base.startswith("https")
        lines += ["  " + curl(base + e.path, e, insecure=insecure) for e in examples]
    lines.append("Live weights, on every Envoy and broker worker at once:")
    lines.append(f"  {prog} weights show --admin {admin_url(registry)}")
    split = next((m for m in registry.models if len(m.versions) > 1), None)
    if split is not None:
        assignments = even_split([v.name for v in split.versions])
        lines.append(f"  {prog} weights set {split.name} {assignments} --admin {admin_url(registry)}")
    audited = [m.name for m in registry.models if registry.audited(m)]
    if audited:
        lines.append("Audit records (shipped about a second after the answer):")
        lines.append(f"  {prog} audit list --model {audited[0]} --since 1h --config {config}")
        lines.append(f"  {prog} audit show {REQUEST_ID} --config {config}")
    lines.append(f"Edit {config}: models, versions and weights go live without a restart.")
    return "\n".join(lines)
