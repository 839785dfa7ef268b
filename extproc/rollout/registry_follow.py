"""The control plane following a model registry: poll each model's aliases, carry out what `releases` decides.

Every change goes through the versions file (read by every process that loads the
registry, so Envoy gets the new version's cluster and the workers its features) and
then the control plane's live weights; the registry is written to only when a
release ends (`@champion` moved, tags). The registry being away changes nothing served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from extproc import metrics
from extproc.errors import BrokerError
from extproc.registry import (
    MlflowSource,
    Model,
    RegistryInvalid,
    ResolvedModel,
    load_registry,
    read_versions,
    signatures,
    version_name,
    versions_path,
    write_versions,
)
from extproc.rollout.control_plane import ControlPlane
from extproc.rollout.events import PromotionRate, promotion_rates, read_events
from extproc.rollout.health import promotion_weights
from extproc.rollout.releases import (
    TAG_ERROR,
    TAG_PROMOTED,
    TAG_ROLLED_BACK,
    AbortCanary,
    Decision,
    Keep,
    ModelRegistry,
    Promoted,
    RegistryRefused,
    RegistryUnavailable,
    ReleaseProblem,
    Serve,
    StartCanary,
    decide,
    serving_only,
    usable,
    version_features,
    with_canary,
    without_canary,
)

log = logging.getLogger("model_broker.registry_follow")
# The `source` of changes the registry asked for (operators' say "admin").
REGISTRY = "registry"
TICK_SECONDS = 0.5

Connect = Callable[[MlflowSource], ModelRegistry]


class RegistryFollower:
    """One per control plane; serialises its own changes with one lock."""

    def __init__(self, plane: ControlPlane, registry_file: str, connect: Connect) -> None:
        self._plane = plane
        self._file = registry_file
        self._connect = connect
        self._clients: dict[MlflowSource, ModelRegistry] = {}
        self._lock = asyncio.Lock()
        self._due: dict[str, float] = {}
        self._followed: dict[str, Model] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: tuple[object, ...] | None = None
        plane.on_passed, plane.on_rolled_back = self._on_passed, self._on_rolled_back
        plane.describe_registries = lambda: {name: dict(status) for name, status in self.status.items()}

    @property
    def _versions_file(self) -> Path:
        return versions_path(self._plane.registry.control_plane.state_file)

    def _served(self, model: str) -> ResolvedModel | None:
        found = read_versions(self._versions_file)
        return None if not isinstance(found, dict) else found.get(model)

    def _client(self, source: MlflowSource) -> ModelRegistry:
        if source not in self._clients:
            self._clients[source] = self._connect(source)
        return self._clients[source]

    async def run(self) -> None:
        """Poll every followed model when it is due; runs until cancelled."""
        try:
            while True:
                await self._refresh_models()
                now = time.monotonic()
                for name, model in self._followed.items():
                    if now >= self._due.get(name, 0.0):
                        assert model.registry is not None
                        self._due[name] = now + model.registry.mlflow.poll_seconds
                        await self.poll(name)
                await asyncio.sleep(TICK_SECONDS)
        finally:
            for client in self._clients.values():
                await client.close()

    async def _refresh_models(self) -> None:
        """The followed models, re-read when the registry or versions file changed."""
        seen = signatures(self._file, self._plane.registry)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            reg = await asyncio.to_thread(load_registry, self._file, envoy_files=False, keep_pending=True)
        except RegistryInvalid:
            return  # the file follower logs why; keep following what we had
        self._followed = {m.name: m for m in reg.models if m.registry is not None}
        for name in self._followed:
            self._count_releases(name)

    def _count_releases(self, name: str) -> None:
        """The promotion rate from the persisted events: the same after a restart."""
        events = read_events(self._plane.registry.control_plane.state_file, model=name)
        counted = promotion_rates(events).get(name, PromotionRate(0, 0))
        metrics.set_promotion_rate(name, counted.started, counted.promoted)
        self.status.setdefault(name, {})["releases"] = {
            "started": counted.started,
            "promoted": counted.promoted,
            "promotion_rate": counted.rate,
        }

    async def poll(self, name: str) -> None:
        """One look at the aliases, and what they ask for; under the lock, so hooks never interleave."""
        model = self._followed[name]
        source = _source(model)
        async with self._lock:
            try:
                aliases = await self._client(source).aliases(source.name)
            except RegistryUnavailable as exc:
                self._unreachable(name, str(exc))
                return
            except RegistryRefused as exc:
                self._report(name, ReleaseProblem("registry_refused", str(exc)))
                return
            metrics.MODEL_REGISTRY_UP.labels(name).set(1)
            served = self._served(name)
            status = self.status.setdefault(name, {})
            status.update(
                tracking_uri=source.tracking_uri,
                registered_model=source.name,
                reachable=True,
                aliases=aliases,
                champion=_name(served.champion if served else None),
                canary=_name(served.canary if served else None),
            )
            problem = await self._carry_out(model, decide(aliases, source.champion, source.challenger, served), served)
            if problem is None:
                status["problem"] = None
            else:
                self._report(name, problem)

    async def _carry_out(self, model: Model, decision: Decision, served: ResolvedModel | None) -> ReleaseProblem | None:
        if isinstance(decision, ReleaseProblem):
            return decision
        if isinstance(decision, Keep):
            return None
        if isinstance(decision, AbortCanary):
            assert served is not None
            self._plane.record_event(
                "release_aborted", model.name, REGISTRY, version=_name(served.canary), reason=decision.reason
            )
            metrics.RELEASES.labels(model.name, "aborted").inc()
            return await self._write(model.name, without_canary(served, reject=False))
        if isinstance(decision, Promoted):
            assert served is not None
            return await self._promoted(model, decision, served)
        return await self._bring_in(model, decision, served)

    async def _promoted(self, model: Model, decision: Promoted, served: ResolvedModel) -> ReleaseProblem | None:
        """`@champion` names the canary: it serves alone; the registry's leftovers are tidied."""
        source = _source(model)
        features = next(v.features for v in served.versions if v.number == decision.number)
        problem = await self._write(model.name, serving_only(decision.number, features, served.rejected))
        if problem is not None:
            return problem
        client = self._client(source)
        await _best_effort(client.set_tag(source.name, decision.number, TAG_PROMOTED, _now_iso()))
        if decision.drop_challenger:
            await _best_effort(client.delete_alias(source.name, source.challenger))
        self._plane.record_event(
            "release_promoted",
            model.name,
            REGISTRY,
            version=version_name(decision.number),
            previous=_name(served.champion),
            registry_version=decision.number,
        )
        metrics.RELEASES.labels(model.name, "promoted").inc()
        self._count_releases(model.name)
        return None

    async def _bring_in(
        self, model: Model, decision: Serve | StartCanary, served: ResolvedModel | None
    ) -> ReleaseProblem | None:
        """A version the registry names and nothing serves yet: checked, then served or canaried."""
        source = _source(model)
        client, number = self._client(source), decision.number
        try:
            found = await client.version(source.name, number)
        except RegistryUnavailable as exc:
            self._unreachable(model.name, str(exc))
            return None
        except RegistryRefused as exc:
            return ReleaseProblem("unknown_version", f"version {number} of {source.name}: {exc}")
        features = version_features(found, source.features_tag)
        problem = usable(found)
        if problem is None and isinstance(features, tuple):
            if isinstance(decision, Serve):
                problem = await self._serve(model, number, features, served)
            else:
                assert served is not None
                problem = await self._start_canary(model, served, number, features)
        problem = problem or (features if isinstance(features, ReleaseProblem) else None)
        if problem is not None and self.status.get(model.name, {}).get("problem") != asdict(problem):
            await _best_effort(client.set_tag(source.name, number, TAG_ERROR, f"{problem.code}: {problem.message}"))
        return problem

    async def _serve(
        self, model: Model, number: int, features: tuple[str, ...], served: ResolvedModel | None
    ) -> ReleaseProblem | None:
        problem = await self._write(model.name, serving_only(number, features, served.rejected if served else ()))
        if problem is None:
            self._plane.record_event(
                "champion_served",
                model.name,
                REGISTRY,
                version=version_name(number),
                previous=_name(served.champion if served else None),
                registry_version=number,
            )
        return problem

    async def _start_canary(
        self, model: Model, served: ResolvedModel, number: int, features: tuple[str, ...]
    ) -> ReleaseProblem | None:
        """The challenger joins at weight 0 (cluster, features), then takes the first step over live weights."""
        problem = await self._write(model.name, with_canary(served, number, features))
        if problem is not None:
            return problem
        assert model.rollout is not None
        first, canary = model.rollout.promote_steps[0], version_name(number)
        if served.canary is not None:
            self._plane.record_event("release_replaced", model.name, REGISTRY, version=_name(served.canary), by=canary)
            metrics.RELEASES.labels(model.name, "replaced").inc()
        self._plane.record_event(
            "release_started",
            model.name,
            REGISTRY,
            version=canary,
            champion=_name(served.champion),
            registry_version=number,
            percent=first,
            features=list(features),
        )
        metrics.RELEASES.labels(model.name, "started").inc()
        self._count_releases(model.name)
        weights = promotion_weights(self._plane.live[model.name], canary, first)
        result = await self._plane.set_weights(model.name, weights, REGISTRY, {"canary": canary, "percent": first})
        return ReleaseProblem(result.code.value, result.message) if isinstance(result, BrokerError) else None

    async def _write(self, name: str, resolved: ResolvedModel) -> ReleaseProblem | None:
        """Validate the registry as it would be, then write the versions file and serve it."""
        current = read_versions(self._versions_file)
        candidate = {**(current if isinstance(current, dict) else {}), name: resolved}
        try:
            reg = await asyncio.to_thread(load_registry, self._file, envoy_files=False, versions=candidate)
        except RegistryInvalid as exc:
            return ReleaseProblem("invalid_release", "; ".join(map(str, exc.problems)))
        await asyncio.to_thread(write_versions, self._versions_file, candidate)
        await self._plane.use_registry(reg)
        return None

    def _unreachable(self, name: str, why: str) -> None:
        if self.status.get(name, {}).get("reachable", True):
            log.warning("model registry of %s unreachable, serving what is served: %s", name, why)
        metrics.MODEL_REGISTRY_UP.labels(name).set(0)
        metrics.MODEL_REGISTRY_ERRORS.labels(name, "registry_unreachable").inc()
        self.status.setdefault(name, {}).update(
            reachable=False, problem={"code": "registry_unreachable", "message": why}
        )

    def _report(self, name: str, problem: ReleaseProblem) -> None:
        status = self.status.setdefault(name, {})
        if status.get("problem") != asdict(problem):
            log.error("model registry of %s: nothing changed: %s: %s", name, problem.code, problem.message)
        status["problem"] = asdict(problem)
        metrics.MODEL_REGISTRY_ERRORS.labels(name, problem.code).inc()

    async def _on_passed(self, model: str, canary: str) -> None:
        """The canary passed its last step: move `@champion` to it in the registry, then serve it alone."""
        followed, served = self._followed.get(model), self._served(model)
        if followed is None or followed.registry is None or served is None or _name(served.canary) != canary:
            return
        source = followed.registry.mlflow
        assert served.canary is not None
        try:
            await self._client(source).set_alias(source.name, source.champion, served.canary)
        except (RegistryUnavailable, RegistryRefused) as exc:
            self._unreachable(model, f"moving @{source.champion} to {canary}: {exc}")
            return  # the canary keeps its traffic; the next pass tries again
        await self.poll(model)

    async def _on_rolled_back(self, model: str, canary: str, detail: dict[str, Any]) -> None:
        """The canary was rolled back: tag it with why, and serve the champion alone."""
        followed = self._followed.get(model)
        if followed is None or followed.registry is None:
            return
        async with self._lock:
            served = self._served(model)
            if served is None or _name(served.canary) != canary:
                return
            source = followed.registry.mlflow
            assert served.canary is not None
            why = json.dumps(detail, sort_keys=True)
            await _best_effort(self._client(source).set_tag(source.name, served.canary, TAG_ROLLED_BACK, why))
            self._plane.record_event("release_rolled_back", model, REGISTRY, version=canary, **detail)
            metrics.RELEASES.labels(model, "rolled_back").inc()
            problem = await self._write(model, without_canary(served, reject=True))
            if problem is not None:
                self._report(model, problem)


def _source(model: Model) -> MlflowSource:
    assert model.registry is not None  # only followed models get here
    return model.registry.mlflow


def _name(number: int | None) -> str | None:
    return None if number is None else version_name(number)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def _best_effort(call: Any) -> None:
    """A registry write that only informs people (a tag, a leftover alias): logged when it fails."""
    try:
        await call
    except (RegistryUnavailable, RegistryRefused) as exc:
        log.warning("model registry write failed (nothing else changes): %s", exc)
