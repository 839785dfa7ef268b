"""The registry file, followed: broker workers, the control plane and Envoy's config watcher apply edits live.

On Kubernetes the file is a ConfigMap volume that kubelet rewrites in place
(a symlink swap) after the reconciler publishes; locally it is the file `up`
was started with. Only `registry.LIVE_SECTIONS` apply live; an edit of any
other section (ports, feature store, audit, …) is refused with a log line and
waits for a restart, and an invalid edit keeps the registry in use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from extproc.registry.checks import RegistryInvalid
from extproc.registry.document import Registry
from extproc.registry.load import file_signature, load_registry, restart_only_changes
from extproc.registry.resolved import versions_path

log = logging.getLogger("model_broker.reload")

# How often the file is checked (one stat call).
POLL_SECONDS = 1.0


def refusal(current: Registry, new: Registry) -> str | None:
    """Why `new` cannot replace `current` while running, or None when it can."""
    needs_restart = restart_only_changes(current, new)
    return f"{', '.join(needs_restart)} changed; restart to apply" if needs_restart else None


def signatures(path: str, registry: Registry) -> tuple[object, ...]:
    """The registry file's and the control plane's versions file's (models that follow a model registry)."""
    return file_signature(path), file_signature(versions_path(registry.control_plane.state_file))


async def follow_registry_file(
    path: str,
    current: Callable[[], Registry],
    apply: Callable[[Registry], Awaitable[None]],
    *,
    refuse: Callable[[Registry, Registry], str | None] = refusal,
    envoy_files: bool = False,
) -> None:
    """Apply every valid edit of `path` that `refuse` lets through; runs until cancelled.

    `envoy_files`: also check the files Envoy reads (TLS, JWKS), for Envoy's config watcher.
    """
    seen = signatures(path, current())
    while True:
        await asyncio.sleep(POLL_SECONDS)
        signature = signatures(path, current())
        if signature == seen:
            continue
        seen = signature
        try:
            new = await asyncio.to_thread(load_registry, path, envoy_files=envoy_files)
        except RegistryInvalid as exc:
            log.error("keeping the registry in use: %s is invalid: %s", path, "; ".join(map(str, exc.problems)))
            continue
        problem = refuse(current(), new)
        if problem is not None:
            log.error("keeping the registry in use: %s", problem)
            continue
        await apply(new)
        log.info("registry reloaded from %s (registry_version %s)", path, new.registry_version)
