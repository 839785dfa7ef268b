"""Dynamic mode (`envoy-config --xds-dir`): a static bootstrap plus route and cluster files Envoy watches.

`render` splits a registry into those files (pure); `plan` orders a rewrite so no
route ever names a cluster Envoy does not have yet (pure); `watch` is the thin loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.envoy.bootstrap import bootstrap_dict, route_configurations
from extproc.envoy.clusters import model_clusters
from extproc.envoy.common import CLUSTERS_FILE, Placement, XdsFiles
from extproc.registry import Registry, restart_only_changes
from extproc.registry.reload import follow_registry_file

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


class _Watched:
    """What Envoy serves now, and the move to a new registry (`reload.follow_registry_file` drives it)."""

    def __init__(
        self,
        registry: Registry,
        directory: str,
        workers: int | None,
        placement: Placement,
        *,
        settle_s: float,
        adjust: Callable[[Registry], Registry],
    ) -> None:
        self.registry = registry
        # What every new registry gets before rendering: the transport settled at start.
        self._adjust = adjust
        self._directory, self._workers, self._placement = directory, workers, placement
        self._settle_s = settle_s
        self._files = self._render(registry)
        # Rendered by `refuse`, written by `apply`, which the follower calls right after for the same registry.
        self._next = self._files

    def _render(self, registry: Registry) -> EnvoyFiles:
        return render(registry, self._directory, self._workers, self._placement)

    def refuse(self, current: Registry, new: Registry) -> str | None:
        """Why Envoy cannot follow `new` without a restart (its bootstrap would change), or None."""
        new = self._adjust(new)
        self._next = self._render(new)
        reason = restart_needed(current, new, self._files, self._next) or "; ".join(dynamic_problems(new))
        return f"Envoy keeps the current routes: {reason}" if reason else None

    async def apply(self, new: Registry) -> None:
        new = self._adjust(new)
        for i, phase in enumerate(plan(self._files, self._next)):
            if i:  # let Envoy warm new clusters before a route names them
                await asyncio.sleep(self._settle_s)
            for name, text in phase:
                write_atomic(self._directory, name, text)
                log.info("wrote %s", Path(self._directory) / name)
        self.registry, self._files = new, self._next


async def watch(
    config: str,
    directory: str,
    registry: Registry,
    *,
    workers: int | None,
    placement: Placement,
    settle_s: float = 2.0,
    adjust: Callable[[Registry], Registry] = lambda registry: registry,
) -> None:
    """Rewrite the files Envoy watches whenever `config` changes and Envoy can follow; runs until cancelled.

    `adjust` applies to each new registry what was settled at start (the transport).
    """
    watched = _Watched(registry, directory, workers, placement, settle_s=settle_s, adjust=adjust)
    await follow_registry_file(config, lambda: watched.registry, watched.apply, refuse=watched.refuse, envoy_files=True)
