"""Dynamic mode (`envoy-config --xds-dir`): a static bootstrap plus route and cluster files Envoy watches.

`render` splits a registry into those files (pure); `plan` orders a rewrite so no
route ever names a cluster Envoy does not have yet (pure); `watch` is the thin loop.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.envoy_config import (
    CLUSTERS_FILE,
    Placement,
    XdsFiles,
    bootstrap_dict,
    model_clusters,
    route_configurations,
)
from extproc.registry import Registry, RegistryInvalid, load_registry, restart_only_changes

BOOTSTRAP_FILE = "envoy.yaml"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

log = logging.getLogger("model_broker.envoy_files")

# Resources by name, in registry order (dicts keep insertion order).
Resources = dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class EnvoyFiles:
    """What Envoy reads in dynamic mode: the bootstrap, once; routes and clusters, on every rename."""

    bootstrap: dict[str, Any]
    routes: Resources
    clusters: Resources


def render(registry: Registry, directory: str, workers: int | None, placement: Placement) -> EnvoyFiles:
    xds = XdsFiles(str(Path(directory).resolve()))
    return EnvoyFiles(
        bootstrap=bootstrap_dict(registry, workers, placement, xds),
        routes={r.name: r.to_dict() for r in route_configurations(registry)},
        clusters={c.name: c.to_dict() for c in model_clusters(registry)},
    )


def discovery_response(type_url: str, resources: Resources) -> dict[str, Any]:
    """A DiscoveryResponse document; the version is a digest of the resources, so equal files read equal."""
    items = [{"@type": type_url, **body} for body in resources.values()]
    digest = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]
    return {"version_info": digest, "resources": items}


def route_texts(files: EnvoyFiles) -> dict[str, str]:
    """One file per route configuration (Envoy's RDS rejects a file holding several)."""
    return {
        XdsFiles.routes_file(name): _yaml(discovery_response(ROUTE_TYPE, {name: body}))
        for name, body in files.routes.items()
    }


def cluster_text(clusters: Resources) -> str:
    return _yaml(discovery_response(CLUSTER_TYPE, clusters))


def file_texts(files: EnvoyFiles) -> dict[str, str]:
    """File name → YAML text: clusters, routes, then the bootstrap that names them (first-write order)."""
    return {CLUSTERS_FILE: cluster_text(files.clusters), **route_texts(files), BOOTSTRAP_FILE: _yaml(files.bootstrap)}


def _yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def dynamic_problems(registry: Registry) -> list[str]:
    """What dynamic mode adds to the registry's checks: the egress listener always exists."""
    egress = registry.egress
    problems = []
    if not _is_loopback(egress.address):
        # Requests on the egress listener skip the broker: nothing off this host may reach it.
        problems.append(f"egress.address: '{egress.address}' is not loopback (dynamic mode always serves egress)")
    taken = {registry.listener.port: "listener.port", registry.admin.port: "admin.port"}
    if egress.port in taken:
        problems.append(f"egress.port: {egress.port} is also {taken[egress.port]} (dynamic mode always serves egress)")
    return problems


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def restart_needed(old: Registry, new: Registry, old_files: EnvoyFiles, new_files: EnvoyFiles) -> str | None:
    """Why `new` cannot go live by file (its bootstrap differs), or None when it can."""
    if old_files.bootstrap == new_files.bootstrap:
        return None
    changed = restart_only_changes(old, new)
    # Only a model-side edit the listeners follow, e.g. an ensemble deadline over the dynamic bound.
    what = ", ".join(changed) if changed else "models/ensembles in a way the listeners depend on"
    return f"the Envoy bootstrap would change ({what}): restart the Envoy pods to apply it"


Phase = list[tuple[str, str]]


def plan(current: EnvoyFiles, new: EnvoyFiles) -> list[Phase]:
    """The (file name, text) writes taking Envoy from `current` to `new`, in phases.

    Clusters first as the union of old and new (a new route's cluster exists before
    the route), then the routes, then the new clusters alone (once no route names a
    removed cluster). Unchanged files are not rewritten; empty phases are dropped.
    """
    written = file_texts(current)
    phases: list[Phase] = []
    for phase in (
        [(CLUSTERS_FILE, cluster_text({**current.clusters, **new.clusters}))],
        list(route_texts(new).items()),
        [(CLUSTERS_FILE, cluster_text(new.clusters))],
    ):
        changed = [(name, text) for name, text in phase if written.get(name) != text]
        written.update(changed)
        if changed:
            phases.append(changed)
    return phases


def write_atomic(directory: str, name: str, text: str) -> None:
    """Temp file in the same directory, then rename: Envoy never reads half a file."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        # Readable by Envoy in another container (mkstemp makes it owner-only).
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, Path(directory) / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_all(files: EnvoyFiles, directory: str) -> None:
    """The first write: routes and clusters before the bootstrap that names them."""
    for name, text in file_texts(files).items():
        write_atomic(directory, name, text)


def _fingerprint(path: str) -> bytes | None:
    """The registry's bytes (small): a kubelet symlink swap changes them, whatever the mtime says."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def watch(
    config: str,
    directory: str,
    registry: Registry,
    stop: threading.Event,
    *,
    workers: int | None,
    placement: Placement,
    interval_s: float = 1.0,
    settle_s: float = 2.0,
) -> None:
    """Poll `config` until `stop`; rewrite the files Envoy watches when it changes and still applies.

    `settle_s` between writes gives Envoy time to warm new clusters before a route names them.
    """
    current = render(registry, directory, workers, placement)
    seen = _fingerprint(config)
    while not stop.wait(interval_s):
        fingerprint = _fingerprint(config)
        if fingerprint == seen or fingerprint is None:
            continue
        seen = fingerprint
        try:
            new_registry = load_registry(config)
        except RegistryInvalid as exc:
            problems = "; ".join(str(p) for p in exc.problems)
            log.error("%s: not applied, Envoy keeps the current routes: %s", config, problems)
            continue
        new = render(new_registry, directory, workers, placement)
        reason = restart_needed(registry, new_registry, current, new) or "; ".join(dynamic_problems(new_registry))
        if reason:
            log.error("%s: not applied, Envoy keeps the current routes: %s", config, reason)
            continue
        for i, phase in enumerate(plan(current, new)):
            if i and stop.wait(settle_s):
                break
            for name, text in phase:
                write_atomic(directory, name, text)
                log.info("wrote %s", Path(directory) / name)
        else:
            registry, current = new_registry, new
            log.info("%s: applied (registry_version %s)", config, new_registry.registry_version)
