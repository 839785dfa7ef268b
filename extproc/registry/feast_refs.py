"""What the `feature_store.feast` section means for models: their references, resolved and checked.

The schema lives with the other sources in `features`; `checks` asks `feast_problems`
for what crosses sections; `model-broker check --feast-repo` compares it with the repo.
"""

from __future__ import annotations

from collections.abc import Iterator

from extproc.registry.document import Registry
from extproc.registry.features import FeastStore
from extproc.registry.models import Model

# (field path, message): `checks` makes them Problems.
Finding = tuple[str, str]


def model_refs(reg: Registry, model: Model) -> tuple[str, ...]:
    """Every feature the model's live versions need: its feature service's, then its own."""
    feast = reg.feature_store.feast
    service = feast.service(model.feature_service) if feast is not None and model.feature_service else None
    names = dict.fromkeys(service.features if service is not None else ())
    names.update(dict.fromkeys(model.required_features))
    return tuple(names)


def injected_name(ref: str, full_feature_names: bool) -> str:
    """The name a model sees, as Feast's `get_online_features` returns it."""
    view, _, feature = ref.partition(":")
    return f"{view}__{feature}" if full_feature_names else feature


def feast_problems(reg: Registry) -> Iterator[Finding]:
    """References that must resolve: views to entities, models to views and services."""
    feast = reg.feature_store.feast
    if feast is None:
        for i, model in enumerate(reg.models):
            if model.feature_service is not None:
                yield (f"models[{i}].feature_service", "feature services need 'feature_store.feast'")
        return
    yield from _section_problems(reg, feast)
    for i, model in enumerate(reg.models):
        yield from _model_problems(reg, feast, model, f"models[{i}]")


def _section_problems(reg: Registry, feast: FeastStore) -> Iterator[Finding]:
    here = "feature_store.feast"
    declared = (
        ("feature_views", [v.name for v in feast.feature_views]),
        ("feature_services", [s.name for s in feast.feature_services]),
    )
    for kind, names in declared:
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                yield (f"{here}.{kind}[{i}].name", f"duplicate name '{name}'")
            seen.add(name)
    for i, view in enumerate(feast.feature_views):
        for j, entity in enumerate(view.entities):
            if reg.entity(entity) is None:
                yield (f"{here}.feature_views[{i}].entities[{j}]", f"unknown entity '{entity}'")
    for i, service in enumerate(feast.feature_services):
        for j, ref in enumerate(service.features):
            if problem := _ref_problem(feast, ref):
                yield (f"{here}.feature_services[{i}].features[{j}]", problem)


def _model_problems(reg: Registry, feast: FeastStore, model: Model, here: str) -> Iterator[Finding]:
    if model.feature_service is not None and feast.service(model.feature_service) is None:
        known = ", ".join(s.name for s in feast.feature_services) or "none declared"
        yield (f"{here}.feature_service", f"unknown feature service '{model.feature_service}' (known: {known})")
    for j, ref in enumerate(model.features):
        if problem := _ref_problem(feast, ref):
            yield (f"{here}.features[{j}]", problem)
    for j, version in enumerate(model.versions):
        for k, ref in enumerate(version.features):
            if problem := _ref_problem(feast, ref):
                yield (f"{here}.versions[{j}].features[{k}]", problem)
    injected: dict[str, str] = {}
    for ref in model_refs(reg, model):
        name = injected_name(ref, feast.full_feature_names)
        if name in injected:
            yield (
                f"{here}.features",
                f"'{ref}' and '{injected[name]}' are both injected as '{name}'; "
                "set feature_store.feast.full_feature_names to tell them apart",
            )
        injected.setdefault(name, ref)


def _ref_problem(feast: FeastStore, ref: str) -> str:
    view, sep, feature = ref.partition(":")
    if not sep or not feature or ":" in feature:
        return f"'{ref}' is not a Feast feature reference ('view:feature')"
    if feast.view(view) is None:
        known = ", ".join(v.name for v in feast.feature_views)
        return f"unknown feature view '{view}' (declared: {known})"
    return ""
