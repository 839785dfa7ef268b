"""The Kubernetes API for the reconciler (the only module importing kubernetes_asyncio).

In-cluster credentials from the pod's ServiceAccount; everything happens in one
namespace, which is what the chart's Role allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from extproc.kube.crds import GROUP, KINDS, VERSION, kind_named
from extproc.kube.reconciler import Published
from extproc.kube.resources import ResourceKey

log = logging.getLogger("model_broker.kube")

REGISTRY_KEY = "registry.yaml"
# On the ConfigMap (what is published) and on pod templates (a change rolls the pods;
# a weight-only change leaves them, it goes live through the control plane).
DIGEST_ANNOTATION = f"{GROUP}/registry-digest"
# One watch call lasts at most this long before it is reopened; the server caps it anyway.
WATCH_SECONDS = 240
NOT_FOUND = 404


@dataclass(frozen=True, slots=True)
class Target:
    """Where the reconciler reads and writes."""

    namespace: str
    config_map: str
    deployments: Sequence[str]


class KubeCluster:
    """`reconciler.Cluster` over the API server: list + watch the kinds, write ConfigMap and statuses."""

    def __init__(self, api: client.ApiClient, target: Target) -> None:
        self._api = api
        self._target = target
        self._objects = client.CustomObjectsApi(api)
        self._core = client.CoreV1Api(api)
        self._apps = client.AppsV1Api(api)
        self._changed = asyncio.Event()
        self._watches: list[asyncio.Task[None]] = []

    def start_watching(self) -> None:
        self._watches = [asyncio.create_task(self._watch(kind.plural)) for kind in KINDS]

    async def close(self) -> None:
        for task in self._watches:
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)

    async def _watch(self, plural: str) -> None:
        """Flag every event; reopen the watch when it ends or fails (the resync covers any gap)."""
        while True:
            try:
                async with watch.Watch().stream(
                    self._objects.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self._target.namespace,
                    plural,
                    timeout_seconds=WATCH_SECONDS,
                ) as stream:
                    async for _event in stream:
                        self._changed.set()
            except (TimeoutError, ApiException, OSError) as exc:
                log.warning("watch on %s failed, reopening: %s", plural, exc)
                await asyncio.sleep(1.0)

    async def list_resources(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for kind in KINDS:
            listed = await self._objects.list_namespaced_custom_object(
                GROUP, VERSION, self._target.namespace, kind.plural
            )
            out += [{**item, "kind": kind.kind} for item in listed.get("items", [])]
        return out

    async def wait_for_change(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        self._changed.clear()

    async def published(self) -> Published | None:
        try:
            current = await self._core.read_namespaced_config_map(self._target.config_map, self._target.namespace)
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return None
            raise
        found = (current.metadata.annotations or {}).get(DIGEST_ANNOTATION)
        text = (current.data or {}).get(REGISTRY_KEY)
        return Published(found, text) if found and text else None

    async def publish(self, registry_yaml: str, digest: str, *, roll: bool) -> None:
        name, namespace = self._target.config_map, self._target.namespace
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=name, annotations={DIGEST_ANNOTATION: digest}),
            data={REGISTRY_KEY: registry_yaml},
        )
        try:
            await self._core.replace_namespaced_config_map(name, namespace, body)
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                raise
            await self._core.create_namespaced_config_map(namespace, body)
        if not roll:
            return
        patch = {"spec": {"template": {"metadata": {"annotations": {DIGEST_ANNOTATION: digest}}}}}
        for deployment in self._target.deployments:
            await self._apps.patch_namespaced_deployment(deployment, namespace, patch)

    async def write_status(self, key: ResourceKey, status: dict[str, Any]) -> None:
        kind = kind_named(key[0])
        assert kind is not None  # keys come from resources this adapter listed
        await self._objects.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            self._target.namespace,
            kind.plural,
            key[1],
            {"status": status},
            # Without it a dict body goes out as a JSON *patch*, which the server rejects;
            # the runtime accepts `_content_type`, the bundled stub does not list it.
            _content_type="application/merge-patch+json",  # type: ignore[call-arg]
        )


@contextlib.asynccontextmanager
async def in_cluster(target: Target) -> AsyncIterator[KubeCluster]:
    """A watching `KubeCluster` with the pod's ServiceAccount credentials."""
    config.load_incluster_config()  # type: ignore[no-untyped-call]  # untyped in kubernetes_asyncio
    async with client.ApiClient() as api:
        cluster = KubeCluster(api, target)
        cluster.start_watching()
        try:
            yield cluster
        finally:
            await cluster.close()
