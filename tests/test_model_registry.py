"""Versions from a model registry: the schema, the versions file merged at load, and the release decisions."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.registry import (
    RegistryInvalid,
    ResolvedModel,
    ResolvedVersion,
    load_registry,
    parse_registry,
    render_backend,
    versions_path,
    write_versions,
)
from extproc.registry.model_registry import BackendTemplate
from extproc.rollout.events import PromotionRate, events_path, promotion_rates, read_events
from extproc.rollout.releases import (
    AbortCanary,
    Keep,
    Promoted,
    RegistryVersion,
    ReleaseProblem,
    Serve,
    StartCanary,
    decide,
    usable,
    version_features,
    with_canary,
    without_canary,
)

FOLLOWED: dict[str, Any] = {
    "name": "credit-risk",
    "path": "/v1/models/credit-risk/predict",
    "entity": "customer",
    "features": ["income"],
    "registry": {"mlflow": {"tracking_uri": "http://127.0.0.1:5000", "name": "credit-risk"}},
    "backend_template": {"service": {"host": "credit-risk-v{version}.models.svc", "port": 8080}},
    "rollout": {"promote_steps": [10, 50, 100], "min_requests": 5},
}
BASE: dict[str, Any] = {
    "feature_store": {"embedded": {"path": "f.json"}},
    "entities": [{"name": "customer", "join_key": "customer_id"}],
    "models": [FOLLOWED],
}


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def followed(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["models"][0].update(changes)
    return doc


def test_unresolved_model_is_not_served_yet(tmp_path: Path) -> None:
    """Before the control plane resolved @champion the model is valid but left out (no route, no cluster)."""
    path = write(tmp_path, BASE)
    assert load_registry(path).models == ()
    assert load_registry(path, keep_pending=True).models[0].versions == ()


def test_resolved_versions_get_the_template_and_the_canary(tmp_path: Path) -> None:
    """The versions file gives each version its backend from the template, its tag's features, and the canary."""
    path = write(tmp_path, BASE)
    resolved = ResolvedModel(3, (ResolvedVersion(3, 90, ()), ResolvedVersion(4, 10, ("late",))), canary=4)
    write_versions(versions_path(tmp_path / "rollout-state.json"), {"credit-risk": resolved})
    model = load_registry(path).models[0]
    assert [(v.name, v.weight, v.features) for v in model.versions] == [("v3", 90, ()), ("v4", 10, ("late",))]
    assert model.versions[1].backend.service is not None
    assert model.versions[1].backend.service.host == "credit-risk-v4.models.svc"
    assert model.rollout is not None and model.rollout.canary == "v4"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"versions": [{"name": "v1", "weight": 1, "backend": {"service": {"host": "a", "port": 1}}}]},
            "models[0].versions: versions come from the model registry",
        ),
        ({"rollout": {"canary": "v1", "promote_steps": [100]}}, "the canary is the registry's challenger"),
        ({"backend_template": None}, "needs a backend_template"),
        ({"rollout": {"promote_steps": [10, 50]}}, "promote_steps ending at 100"),
        ({"backend_template": {"sagemaker": {"endpoint": "cr_{version}", "region": "us-east-1"}}}, "invalid backend"),
        ({"backend_template": {"service": {"host": "{model}.svc", "port": 1}}}, "only {version} may be substituted"),
        ({"backend_template": {"service": {"host": "bad host {version}", "port": 1}}}, "invalid host"),
        ({"registry": {"mlflow": {"tracking_uri": "ftp://x", "name": "m"}}}, "tracking_uri must be an http(s) URL"),
        ({"registry": {"mlflow": {"tracking_uri": "http://x", "name": "m", "challenger": "champion"}}}, "different"),
        ({"registry": {"mlflow": {"tracking_uri": "http://x", "name": "m", "champion": "latest"}}}, "reserved"),
        ({"shadow": {"version": "v1", "compare_field": "score"}}, "no fixed version to shadow"),
    ],
    ids=[
        "versions-by-hand",
        "canary-by-hand",
        "no-template",
        "steps-short-of-100",
        "template-invalid-endpoint",
        "template-unknown-placeholder",
        "template-invalid-host",
        "tracking-uri",
        "same-aliases",
        "reserved-alias",
        "shadow",
    ],
)
def test_bad_registry_source_is_refused(tmp_path: Path, changes: dict[str, Any], expected: str) -> None:
    """Each mistake in a registry-followed model is reported at load, naming what is wrong."""
    doc = followed(**changes)
    doc["models"][0] = {k: v for k, v in doc["models"][0].items() if v is not None}
    with pytest.raises(RegistryInvalid) as caught:
        load_registry(write(tmp_path, doc))
    assert expected in "; ".join(map(str, caught.value.problems))


def test_declared_models_still_need_a_canary_and_no_template() -> None:
    """A model with declared versions keeps today's rules: rollout names its canary, no backend_template."""
    plain = {k: v for k, v in FOLLOWED.items() if k not in ("registry", "backend_template")}
    plain["versions"] = [{"name": "v1", "weight": 1, "backend": {"service": {"host": "a", "port": 1}}}]
    with pytest.raises(RegistryInvalid, match="name the version to judge"):
        parse_registry({**BASE, "models": [plain]})
    with pytest.raises(RegistryInvalid, match="only for a model with a `registry`"):
        parse_registry({**BASE, "models": [{**plain, "backend_template": FOLLOWED["backend_template"]}]})


def test_a_followed_model_is_not_an_ensemble_member(tmp_path: Path) -> None:
    """Its versions come and go with the aliases, so an ensemble cannot count on it."""
    doc = copy.deepcopy(BASE)
    doc["ensembles"] = [{"name": "e", "path": "/e", "members": [{"model": "credit-risk"}]}]
    with pytest.raises(RegistryInvalid, match="follows a model registry and cannot be a member"):
        load_registry(write(tmp_path, doc))


def test_corrupt_versions_file_is_refused(tmp_path: Path) -> None:
    """A versions file that is not what the control plane writes is an error, never a guess."""
    path = write(tmp_path, BASE)
    versions_path(tmp_path / "rollout-state.json").write_text('{"models": {"credit-risk": {"champion": "x"}}}')
    with pytest.raises(RegistryInvalid, match="versions file"):
        load_registry(path)


def test_render_backend_substitutes_the_version() -> None:
    """`{version}` anywhere in the template's strings; the result is a validated backend."""
    template = BackendTemplate.model_validate(
        {"sagemaker": {"endpoint": "credit-risk-{version}", "region": "eu-west-1"}}
    )
    backend = render_backend(template, 7)
    assert not isinstance(backend, str) and backend.sagemaker is not None
    assert backend.sagemaker.endpoint == "credit-risk-7"


SERVED = ResolvedModel(1, (ResolvedVersion(1, 100),))
CANARY = ResolvedModel(1, (ResolvedVersion(1, 80), ResolvedVersion(2, 20, ("late",))), canary=2)


@pytest.mark.parametrize(
    ("aliases", "served", "expected"),
    [
        ({}, None, ReleaseProblem),
        ({"champion": 1}, None, Serve(1)),
        ({"champion": 1, "challenger": 2}, None, Serve(1)),
        ({"champion": 1}, SERVED, Keep()),
        ({"champion": 3}, SERVED, Serve(3)),
        ({"champion": 1, "challenger": 2}, SERVED, StartCanary(2)),
        ({"champion": 1, "challenger": 2}, CANARY, Keep()),
        ({"champion": 1, "challenger": 5}, CANARY, StartCanary(5)),
        ({"champion": 1}, CANARY, AbortCanary),
        ({"champion": 2, "challenger": 2}, CANARY, Promoted(2, drop_challenger=True)),
        ({"champion": 2}, CANARY, Promoted(2, drop_challenger=False)),
        ({"champion": 1, "challenger": 1}, SERVED, ReleaseProblem),
        ({"champion": 1, "challenger": 4}, ResolvedModel(1, (ResolvedVersion(1, 100),), rejected=(4,)), Keep()),
    ],
    ids=[
        "no-champion",
        "first-champion",
        "first-champion-before-any-canary",
        "unchanged",
        "champion-moved-by-hand",
        "new-challenger",
        "canary-in-flight",
        "challenger-moved-mid-canary",
        "challenger-removed",
        "promoted-by-the-broker",
        "promoted-by-hand",
        "two-aliases-one-version",
        "rolled-back-challenger-stays",
    ],
)
def test_decide(aliases: dict[str, int], served: ResolvedModel | None, expected: object) -> None:
    """Each combination of aliases and what is served gives one decision."""
    decision = decide(aliases, "champion", "challenger", served)
    if isinstance(expected, type):
        assert isinstance(decision, expected), decision
    else:
        assert decision == expected


def test_two_aliases_on_one_version_says_which() -> None:
    """The problem names both aliases and the version, so the fix is obvious."""
    problem = decide({"champion": 1, "challenger": 1}, "champion", "challenger", SERVED)
    assert isinstance(problem, ReleaseProblem) and problem.code == "two_aliases"
    assert "@champion and @challenger both name version 1" in problem.message


def test_version_features_and_readiness() -> None:
    """Features come from the version's tag (comma-separated, checked); only READY versions take traffic."""
    version = RegistryVersion(4, "READY", {"model_broker.features": " late, income ,late"})
    assert version_features(version, "model_broker.features") == ("late", "income")
    assert version_features(RegistryVersion(4, "READY", {}), "model_broker.features") == ()
    bad = version_features(RegistryVersion(4, "READY", {"t": "ok,not ok"}), "t")
    assert isinstance(bad, ReleaseProblem) and bad.code == "invalid_features" and "not ok" in bad.message
    pending = usable(RegistryVersion(4, "PENDING_REGISTRATION", {}))
    assert pending is not None and pending.code == "version_not_ready"


def test_canary_joins_at_zero_and_leaves_remembered() -> None:
    """A canary enters at weight 0 (its first step is a live-weight change); a rolled-back one is remembered."""
    started = with_canary(SERVED, 2, ("late",))
    assert [(v.number, v.weight) for v in started.versions] == [(1, 100), (2, 0)] and started.canary == 2
    assert without_canary(started, reject=True) == ResolvedModel(1, (ResolvedVersion(1, 100),), None, (2,))
    assert without_canary(started, reject=False).rejected == ()


def test_promotion_rate_counts_releases_from_the_persisted_events(tmp_path: Path) -> None:
    """Started and promoted releases per model, from the events file; a torn last line is skipped."""
    state = tmp_path / "rollout-state.json"
    lines = [
        {"time": 1, "event": "release_started", "model": "a"},
        {"time": 2, "event": "weights_changed", "model": "a"},
        {"time": 3, "event": "release_promoted", "model": "a"},
        {"time": 4, "event": "release_started", "model": "a"},
        {"time": 5, "event": "release_rolled_back", "model": "a"},
        {"time": 6, "event": "release_started", "model": "b"},
    ]
    events_path(state).write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"time": 7, "ev')
    rates = promotion_rates(read_events(state))
    assert rates["a"] == PromotionRate(2, 1) and rates["a"].rate == 0.5
    assert rates["b"].rate == 0.0
    assert PromotionRate(0, 0).rate is None
    assert [e["time"] for e in read_events(state, model="a", since=3)] == [3, 4, 5]
    assert read_events(tmp_path / "none.json") == []
