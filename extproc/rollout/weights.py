"""Live traffic weights: check a proposed split, merge it with the registry, lay it out for Envoy.

Pure functions; each returns a value or a `BrokerError`, never raises on bad input.
The registry declares each model's starting weights; the rollout state holds what
operators or automatic rollback changed since (see `state.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc import wire
from extproc.errors import BrokerError, ErrorCode
from extproc.registry import Model, Registry

# version -> weight for one model; model -> its weights.
Weights = dict[str, int]
LiveWeights = dict[str, Weights]

# The registry's own bound: Gateway API weights are relative and at most 1,000,000.
MAX_WEIGHT = 1_000_000


def _invalid(message: str) -> BrokerError:
    return BrokerError(ErrorCode.INVALID_WEIGHTS, message)


def parse_assignments(args: list[str]) -> Weights | BrokerError:
    """`["v1=90", "v2=10"]` from the command line → `{"v1": 90, "v2": 10}` (range checks come later)."""
    weights: Weights = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or not name:
            return _invalid(f"'{arg}' is not VERSION=WEIGHT")
        if name in weights:
            return _invalid(f"version '{name}' is given twice")
        try:
            weights[name] = int(value)
        except ValueError:
            return _invalid(f"weight of '{name}' must be a whole number, not '{value}'")
    return weights


def check_weights(model: Model, proposed: Mapping[str, object]) -> Weights | BrokerError:
    """A complete, sensible split for `model`: every version named once, whole numbers, not all zero.

    Every version must be named so a typo can never silently leave an old
    weight in place.
    """
    declared = [v.name for v in model.versions]
    unknown = sorted(set(proposed) - set(declared))
    if unknown:
        return _invalid(f"{model.name} has no version {', '.join(unknown)} (versions: {', '.join(declared)})")
    missing = [name for name in declared if name not in proposed]
    if missing:
        return _invalid(f"give a weight for every version of {model.name}; missing: {', '.join(missing)}")
    weights: Weights = {}
    for name in declared:
        value = proposed[name]
        if not isinstance(value, int) or isinstance(value, bool):
            return _invalid(f"weight of {name} must be a whole number, not {value!r}")
        if not 0 <= value <= MAX_WEIGHT:
            return _invalid(f"weight of {name} must be between 0 and {MAX_WEIGHT}, not {value}")
        weights[name] = value
    if sum(weights.values()) == 0:
        return _invalid(f"at least one version of {model.name} needs a weight above 0")
    return weights


def change_weights(registry: Registry, model_name: str, proposed: Mapping[str, object]) -> Weights | BrokerError:
    model = registry.model(model_name)
    if model is None:
        known = ", ".join(m.name for m in registry.models) or "none"
        return BrokerError(ErrorCode.UNKNOWN_MODEL, f"no model named '{model_name}' (models: {known})")
    return check_weights(model, proposed)


def declared_weights(registry: Registry) -> LiveWeights:
    return {m.name: {v.name: v.weight for v in m.versions} for m in registry.models}


def merge_overrides(
    registry: Registry,
    overrides: Mapping[str, Mapping[str, object]],
    declared_then: Mapping[str, Mapping[str, int]] | None = None,
) -> tuple[LiveWeights, list[str]]:
    """The registry's weights with every still-valid override applied, and why any was dropped.

    An override goes stale when the registry changed under it: a version renamed
    or added, or the declared split itself changed since the override was made
    (`declared_then`), because a newer declaration (a `helm upgrade`, an edited
    Model resource) is what its author wants live. The registry's own weights
    then apply for that model.
    """
    live = declared_weights(registry)
    dropped: list[str] = []
    for model_name, proposed in overrides.items():
        then = (declared_then or {}).get(model_name)
        if then is not None and model_name in live and dict(then) != live[model_name]:
            dropped.append(f"{model_name}: the registry's declared split changed since this live change")
            continue
        checked = change_weights(registry, model_name, proposed)
        if isinstance(checked, BrokerError):
            dropped.append(f"{model_name}: {checked.message}")
        else:
            live[model_name] = checked
    return live, dropped


def apply_weights(registry: Registry, live: Mapping[str, Weights]) -> Registry:
    """The registry as it is now: versions carry their live weights (so features follow them too)."""
    models = []
    for model in registry.models:
        weights = live.get(model.name, {})
        versions = tuple(v.model_copy(update={"weight": weights.get(v.name, v.weight)}) for v in model.versions)
        models.append(model.model_copy(update={"versions": versions}))
    return registry.model_copy(update={"models": tuple(models)})


def runtime_layer(live: Mapping[str, Weights]) -> dict[str, int]:
    """Every version's weight under the runtime key its route's `weighted_clusters` reads."""
    return {
        wire.weight_runtime_key(model, version): weight
        for model, weights in live.items()
        for version, weight in weights.items()
    }


def weights_of_layer(registry: Registry, layer: Mapping[str, object]) -> LiveWeights:
    """The inverse of `runtime_layer` for this registry's models: what a broker reads from RTDS.

    A version missing from the layer keeps its declared weight, as it does in Envoy.
    """
    live: LiveWeights = {}
    for model in registry.models:
        weights: Weights = {}
        for version in model.versions:
            value = layer.get(wire.weight_runtime_key(model.name, version.name))
            weights[version.name] = int(value) if isinstance(value, int | float) else version.weight
        live[model.name] = weights
    return live


def newly_live(before: Mapping[str, Weights], after: Mapping[str, Weights]) -> list[str]:
    """Versions that go from no traffic to some: workers must fetch their features first."""
    return [
        wire.version_cluster(model, version)
        for model, weights in after.items()
        for version, weight in weights.items()
        if weight > 0 and before.get(model, {}).get(version, 0) == 0
    ]
