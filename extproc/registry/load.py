"""Reading a registry file: paths resolved next to it, the files only Envoy reads checked, live sections."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from extproc.registry.audit import Audit, LocalAuditSink
from extproc.registry.checks import Problem, RegistryInvalid, parse_registry
from extproc.registry.common import TLS
from extproc.registry.document import Registry
from extproc.registry.features import EmbeddedStore
from extproc.registry.resolved import (
    DEFAULT_STATE_FILE,
    Resolved,
    merge_versions,
    read_versions,
    render_backend,
    versions_path,
)

# What a running broker applies from a rewritten registry file; any other section is read at start.
LIVE_SECTIONS = frozenset({"registry_version", "entities", "models", "ensembles"})


def restart_only_changes(old: Registry, new: Registry) -> list[str]:
    """The sections `new` changes that a running broker cannot apply (ports, store, audit, …)."""
    return [
        name for name in Registry.model_fields if name not in LIVE_SECTIONS and getattr(old, name) != getattr(new, name)
    ]


def file_signature(path: str | Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, cheap to poll (a ConfigMap's symlink swap changes the inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def load_registry(
    path: str | Path, *, envoy_files: bool = True, versions: Resolved | None = None, keep_pending: bool = False
) -> Registry:
    """Read and validate a registry file; relative store paths resolve next to it.

    `envoy_files=False` skips checking the files only Envoy reads (TLS, JWKS): broker
    and control-plane pods on Kubernetes do not mount them. Models that follow a model
    registry get their versions from the control plane's versions file (or `versions`);
    one it never resolved is left out unless `keep_pending`.
    """
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistryInvalid([Problem("", f"cannot read {file}: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        raise RegistryInvalid([Problem("", f"not valid YAML: {exc}")]) from None
    reg = _resolve_files(parse_registry(_with_versions(data, file, versions)), file)
    problems = [*_template_problems(reg), *(_file_problems(reg) if envoy_files else ())]
    if problems:
        raise RegistryInvalid(problems)
    if keep_pending:
        return reg
    return reg.model_copy(update={"models": tuple(m for m in reg.models if m.versions)})


def resolved_versions_path(data: Any, file: Path) -> Path:
    """Where the control plane keeps what it resolved: beside its state file (relative to the registry)."""
    plane = data.get("control_plane") if isinstance(data, dict) else None
    state_file = plane.get("state_file") if isinstance(plane, dict) else None
    return versions_path(_beside(file, state_file if isinstance(state_file, str) else DEFAULT_STATE_FILE))


def _with_versions(data: Any, file: Path, versions: Resolved | None) -> Any:
    if versions is None:
        found = read_versions(resolved_versions_path(data, file))
        if not isinstance(found, dict):
            raise RegistryInvalid([found])
        versions = found
    merged, problems = merge_versions(data, versions)
    if problems:
        raise RegistryInvalid(problems)
    return merged


def _template_problems(reg: Registry) -> Iterator[Problem]:
    """A backend template must give a valid backend (checked with version 1) before any version exists."""
    for i, model in enumerate(reg.models):
        if model.backend_template is not None:
            rendered = render_backend(model.backend_template, 1)
            if isinstance(rendered, str):
                yield Problem(f"models[{i}].backend_template", rendered)


def _resolve_files(reg: Registry, file: Path) -> Registry:
    """Every path the registry names, made absolute relative to the registry's directory."""
    embedded = reg.feature_store.embedded
    if embedded is not None:
        store = reg.feature_store.model_copy(update={"embedded": EmbeddedStore(path=_beside(file, embedded.path))})
        reg = reg.model_copy(update={"feature_store": store})
    plane = reg.control_plane
    reg = reg.model_copy(
        update={"control_plane": plane.model_copy(update={"state_file": _beside(file, plane.state_file)})}
    )
    if reg.audit is not None:
        reg = reg.model_copy(update={"audit": _audit_paths_beside(file, reg.audit)})
    tls = reg.listener.tls
    if tls is not None:
        files = TLS(certificate_chain=_beside(file, tls.certificate_chain), private_key=_beside(file, tls.private_key))
        reg = reg.model_copy(update={"listener": reg.listener.model_copy(update={"tls": files})})
    consumers = [
        c.model_copy(update={"jwt": c.jwt.model_copy(update={"jwks_file": _beside(file, c.jwt.jwks_file)})})
        if c.jwt is not None and c.jwt.jwks_file is not None
        else c
        for c in reg.consumers
    ]
    return reg.model_copy(update={"consumers": tuple(consumers)})


def _file_problems(reg: Registry) -> Iterator[Problem]:
    """Files Envoy reads at start: missing or malformed ones are reported now, not as an Envoy crash."""
    tls = reg.listener.tls
    if tls is not None:
        for name in ("certificate_chain", "private_key"):
            if not Path(getattr(tls, name)).is_file():
                yield Problem(f"listener.tls.{name}", f"no such file: {getattr(tls, name)}")
    for i, consumer in enumerate(reg.consumers):
        if consumer.jwt is not None and consumer.jwt.jwks_file is not None:
            problem = _jwks_problem(Path(consumer.jwt.jwks_file))
            if problem:
                yield Problem(f"consumers[{i}].jwt.jwks_file", problem)


def _jwks_problem(path: Path) -> str:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    except ValueError:
        return f"{path} is not JSON"
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        return f"{path} is not a JWKS (a JSON object with a non-empty 'keys' list)"
    return ""


def _beside(file: Path, path: str) -> str:
    return str((file.parent / path).resolve())


def _audit_paths_beside(file: Path, audit: Audit) -> Audit:
    """The spool and local sink directories, relative paths resolved next to the registry file."""
    spool = audit.spool.model_copy(update={"dir": _beside(file, audit.spool.dir)})
    sink = audit.sink
    if sink.local is not None:
        sink = sink.model_copy(update={"local": LocalAuditSink(dir=_beside(file, sink.local.dir))})
    return audit.model_copy(update={"spool": spool, "sink": sink})
