"""`model-broker reconcile`: custom resources in, the registry ConfigMap and statuses out.

The broker and Envoy read a registry file at start; this loop keeps that file
(a ConfigMap both mount) equal to base config + the cluster's resources, and
rolls their Deployments when it changes. Kubernetes replaces pods one at a
time, so a new model or a weight shift goes live without dropping requests.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import yaml

from extproc.custom_resources import ResourceKey, convert, resource_key, status_update
from extproc.registry import Registry

log = logging.getLogger("model_broker.reconciler")

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

    async def published_digest(self) -> str | None:
        """The digest of the registry currently published, if any."""
        ...

    async def publish(self, registry_yaml: str, digest: str) -> None:
        """Write the registry ConfigMap and roll the pods that read it."""
        ...

    async def write_status(self, key: ResourceKey, status: dict[str, Any]) -> None: ...


def registry_yaml(registry: Registry) -> str:
    """The registry as the file the broker loads: only what is set, so it reads like a hand-written one."""
    return yaml.safe_dump(registry.model_dump(mode="json", exclude_none=True), sort_keys=False)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def reconcile_once(cluster: Cluster, base: Mapping[str, Any], published: str | None) -> str | None:
    """One pass; returns the digest now published.

    The registry is published before any status says Accepted, so a resource
    never claims to be served by a registry nobody can read yet. An invalid
    base publishes nothing: the last good registry keeps serving.
    """
    resources = await cluster.list_resources()
    conversion = convert(base, resources)
    if conversion.registry is None:
        log.error("base registry invalid, keeping the published one: %s", "; ".join(map(str, conversion.base_problems)))
        return published
    text = registry_yaml(conversion.registry)
    wanted = digest(text)
    if wanted != published:
        await cluster.publish(text, wanted)
        log.info("published registry %s (%d models)", wanted, len(conversion.registry.models))
    now = _now()
    for resource in resources:
        key = resource_key(resource)
        verdict = conversion.verdicts.get(key)
        update = None if verdict is None else status_update(resource, verdict, now)
        if update is not None:
            await cluster.write_status(key, update)
    return wanted


async def reconcile_forever(cluster: Cluster, base: Mapping[str, Any], resync_s: float = RESYNC_SECONDS) -> None:
    """Reconcile on every change and at least every `resync_s`; one failed pass is retried, not fatal."""
    published = await cluster.published_digest()
    while True:
        try:
            published = await reconcile_once(cluster, base, published)
        except Exception:
            # The API server may be briefly away (upgrades); the next change or resync retries.
            log.exception("reconcile pass failed")
        await cluster.wait_for_change(resync_s)
