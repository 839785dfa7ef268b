"""`model-broker reconcile`: custom resources in, the registry ConfigMap and statuses out.

The broker, Envoy (through its config watcher) and the control plane follow a
registry file; this loop keeps that file (a ConfigMap they mount) equal to base
config + the cluster's resources. Models, versions, paths and ensembles go live
when kubelet updates the mounted file (within its sync period, about a minute);
a change of weights alone goes live at once through the control plane's admin
API as well. Only a change the pods cannot follow (listener, store, audit, …)
rolls their Deployments, one pod at a time.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import yaml

from extproc.envoy import Placement
from extproc.envoy.xds_files import render, restart_needed
from extproc.kube.resources import ResourceKey, convert, resource_key, status_update
from extproc.registry import Registry, RegistryInvalid, parse_registry
from extproc.registry.reload import refusal
from extproc.rollout.weights import LiveWeights, apply_weights, declared_weights

log = logging.getLogger("model_broker.reconciler")

# Where the chart's Envoy pods keep their watched files; only compared, never written here.
XDS_DIR = "/etc/envoy"
# A watch can miss events (reconnects, compaction): a full pass this often repairs any drift.
RESYNC_SECONDS = 300.0


class Cluster(Protocol):
    """The Kubernetes API as the reconciler needs it; `adapters/kube.py` is the real one."""

    async def list_resources(self) -> list[dict[str, Any]]:
        """Every resource of the known kinds in the watched namespace."""
        ...

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return when a watched resource changed, or after `timeout_s` (the resync)."""
        ...

    async def published(self) -> Published | None:
        """The registry currently published, if any."""
        ...

    async def publish(self, registry_yaml: str, digest: str, *, roll: bool) -> None:
        """Write the registry ConfigMap; with `roll`, roll the pods that read it."""
        ...

    async def write_status(self, key: ResourceKey, status: dict[str, Any]) -> None: ...


class WeightSetter(Protocol):
    """The control plane's admin API as the reconciler needs it; `rollout/client.py` has the real one."""

    async def set_weights(self, model: str, weights: Mapping[str, int]) -> str | None:
        """None once the control plane took the split, else why it did not."""
        ...


@dataclass(frozen=True, slots=True)
class Published:
    digest: str
    registry_yaml: str


def registry_yaml(registry: Registry) -> str:
    """The registry as the file the broker loads: only what is set, so it reads like a hand-written one."""
    return yaml.safe_dump(registry.model_dump(mode="json", exclude_none=True), sort_keys=False)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_published(text: str) -> Registry | None:
    """The published registry (YAML), or None when it cannot be read as one."""
    try:
        return parse_registry(yaml.safe_load(text))
    except (RegistryInvalid, yaml.YAMLError):
        return None


def weight_changes(old: Registry, after: Registry) -> LiveWeights | None:
    """The models whose split alone changed from `old` to `after`; None when anything else changed too."""
    wanted = declared_weights(after)
    if apply_weights(old, wanted) != after:
        return None
    current = declared_weights(old)
    return {model: weights for model, weights in wanted.items() if current.get(model) != weights}


def restart_reason(old: Registry | None, after: Registry) -> str | None:
    """Why the pods must be replaced to serve `after`, or None when they follow the file live."""
    if old is None:
        return "no readable registry published before"
    refused = refusal(old, after)
    if refused is not None:
        return refused
    placement = Placement()
    return restart_needed(old, after, render(old, XDS_DIR, None, placement), render(after, XDS_DIR, None, placement))


async def _apply_live(plane: WeightSetter, changes: LiveWeights) -> None:
    """Every changed split through the control plane now; one it does not take arrives with the file."""
    for model, weights in changes.items():
        problem = await plane.set_weights(model, weights)
        if problem is None:
            log.info("weights of %s changed live: %s", model, weights)
        else:
            log.warning("could not change %s's weights at once (%s); the pods apply them with the file", model, problem)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def reconcile_once(
    cluster: Cluster, base: Mapping[str, Any], published: Published | None, plane: WeightSetter | None = None
) -> Published | None:
    """One pass; returns the registry now published.

    The registry is published before any status says Accepted, so a resource
    never claims to be served by a registry nobody can read yet. An invalid
    base publishes nothing: the last good registry keeps serving. Weights
    reach the control plane twice (admin API, then the file); both agree, as a
    control plane reloading a registry that declares another split drops its
    older live change.
    """
    resources = await cluster.list_resources()
    conversion = convert(base, resources)
    if conversion.registry is None:
        log.error("base registry invalid, keeping the published one: %s", "; ".join(map(str, conversion.base_problems)))
        return published
    text = registry_yaml(conversion.registry)
    wanted = digest(text)
    if published is None or wanted != published.digest:
        old = None if published is None else parse_published(published.registry_yaml)
        reason = restart_reason(old, conversion.registry)
        changes = None if old is None else weight_changes(old, conversion.registry)
        if reason is None and plane is not None and changes:
            await _apply_live(plane, changes)
        await cluster.publish(text, wanted, roll=reason is not None)
        how = "the pods follow it live" if reason is None else f"rolling the pods: {reason}"
        log.info("published registry %s (%d models; %s)", wanted, len(conversion.registry.models), how)
        for note in conversion.ignored:
            log.warning("%s: left out of its allow-list", note)
    now = _now()
    for resource in resources:
        key = resource_key(resource)
        verdict = conversion.verdicts.get(key)
        update = None if verdict is None else status_update(resource, verdict, now)
        if update is not None:
            await cluster.write_status(key, update)
    return Published(wanted, text)


async def reconcile_forever(
    cluster: Cluster, base: Mapping[str, Any], plane: WeightSetter | None, resync_s: float = RESYNC_SECONDS
) -> None:
    """Reconcile on every change and at least every `resync_s`; one failed pass is retried, not fatal."""
    published = await cluster.published()
    while True:
        try:
            published = await reconcile_once(cluster, base, published, plane)
        except Exception:
            # The API server may be briefly away (upgrades); the next change or resync retries.
            log.exception("reconcile pass failed")
        await cluster.wait_for_change(resync_s)
