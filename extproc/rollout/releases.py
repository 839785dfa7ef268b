"""Releases from a model registry: what the aliases ask for, decided against what is served. Pure.

`@champion` is what serves; moving `@challenger` to another version starts a canary of
it at the first promotion step; the control plane's judgement (rollback or staged
promotion) ends it, and the broker then moves `@champion` itself. `registry_follow`
carries the decisions out; the MLflow adapter implements `ModelRegistry`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Protocol

from extproc.registry import FEATURE_NAME
from extproc.registry.resolved import ResolvedModel, ResolvedVersion

# Tags the broker writes on registry versions, so people reading MLflow see what happened.
TAG_PROMOTED = "model_broker.promoted"
TAG_ROLLED_BACK = "model_broker.rolled_back"
TAG_ERROR = "model_broker.error"
# A version must be fully registered before it takes traffic.
READY = "READY"


class RegistryUnavailable(Exception):
    """The registry could not be asked (connection, timeout, 5xx): keep serving what is served."""


class RegistryRefused(Exception):
    """The registry answered with a refusal (unknown model or version, bad parameter)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True, slots=True)
class RegistryVersion:
    number: int
    status: str
    tags: dict[str, str]


class ModelRegistry(Protocol):
    async def aliases(self, name: str) -> dict[str, int]: ...
    async def version(self, name: str, number: int) -> RegistryVersion: ...
    async def set_alias(self, name: str, alias: str, number: int) -> None: ...
    async def delete_alias(self, name: str, alias: str) -> None: ...
    async def set_tag(self, name: str, number: int, key: str, value: str) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ReleaseProblem:
    """Why nothing changed: shown in the log, the admin API and `model_broker_model_registry_errors_total`."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Keep:
    """The aliases ask for what is served."""


@dataclass(frozen=True, slots=True)
class Serve:
    """Serve this version alone: the first resolution, or `@champion` moved by hand."""

    number: int


@dataclass(frozen=True, slots=True)
class StartCanary:
    number: int


@dataclass(frozen=True, slots=True)
class AbortCanary:
    """`@challenger` left the canary in flight: it goes, the champion keeps serving."""

    reason: str


@dataclass(frozen=True, slots=True)
class Promoted:
    """`@champion` now names the canary (the broker moved it, or a person did): serve it alone."""

    number: int
    drop_challenger: bool


Decision = Keep | Serve | StartCanary | AbortCanary | Promoted | ReleaseProblem


def decide(  # noqa: PLR0911 - a decision table reads best as one early return per row
    aliases: dict[str, int], champion: str, challenger: str, served: ResolvedModel | None
) -> Decision:
    """What to do about the aliases of one registered model, given what is served now."""
    ours, theirs = aliases.get(champion), aliases.get(challenger)
    if ours is None:
        return ReleaseProblem("no_champion", f"no version has the alias @{champion}: nothing to serve")
    if served is not None and served.canary == ours:
        return Promoted(ours, drop_challenger=theirs == ours)
    if theirs == ours:
        return ReleaseProblem(
            "two_aliases", f"@{champion} and @{challenger} both name version {ours}; move @{challenger} elsewhere"
        )
    if served is None or served.champion != ours:
        return Serve(ours)
    if theirs is None or theirs in served.rejected:
        if served.canary is not None:
            return AbortCanary(f"@{challenger} no longer names version {served.canary}")
        return Keep()
    return Keep() if theirs == served.canary else StartCanary(theirs)


def version_features(version: RegistryVersion, tag: str) -> tuple[str, ...] | ReleaseProblem:
    """The features a version declares in its tag (comma-separated), checked as registry feature names."""
    raw = version.tags.get(tag, "")
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    bad = [n for n in names if not re.match(FEATURE_NAME, n)]
    if bad:
        return ReleaseProblem(
            "invalid_features", f"version {version.number}: tag {tag} names invalid features: {', '.join(bad)}"
        )
    return names


def usable(version: RegistryVersion) -> ReleaseProblem | None:
    if version.status != READY:
        return ReleaseProblem("version_not_ready", f"version {version.number} is {version.status or 'not READY'}")
    return None


def serving_only(number: int, features: tuple[str, ...], rejected: tuple[int, ...] = ()) -> ResolvedModel:
    return ResolvedModel(number, (ResolvedVersion(number, 100, features),), None, rejected)


def with_canary(served: ResolvedModel, number: int, features: tuple[str, ...]) -> ResolvedModel:
    """The champion keeps all traffic; the canary joins at weight 0 (its first step is a live-weight change)."""
    champion = next(v for v in served.versions if v.number == served.champion)
    return replace(
        served, versions=(replace(champion, weight=100), ResolvedVersion(number, 0, features)), canary=number
    )


def without_canary(served: ResolvedModel, reject: bool) -> ResolvedModel:
    """Back to the champion alone; a rolled-back canary is remembered so its alias does not restart it."""
    champion = next(v for v in served.versions if v.number == served.champion)
    rejected = served.rejected
    if reject and served.canary is not None and served.canary not in rejected:
        rejected = (*rejected, served.canary)
    return ResolvedModel(served.champion, (replace(champion, weight=100),), None, rejected)
