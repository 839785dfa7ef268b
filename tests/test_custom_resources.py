"""Model resources → registry, each resource's verdict and status, and the reconciler pass over an in-memory API
(no cluster here) with the real control plane process for live weights."""

from __future__ import annotations

import asyncio
import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.kube.reconciler import Published, digest, parse_published, reconcile_once, registry_yaml, weight_changes
from extproc.kube.resources import Verdict, convert, status_update
from extproc.process.launcher import free_port, wait_ready
from extproc.registry import Registry, load_registry, parse_registry
from extproc.rollout.client import AdminApi
from extproc.rollout.client import request as admin_request
from extproc.rollout.discovery import RUNTIME_DIR_ENV, TOKEN_ENV, AdminEndpoint
from tests.conftest import ROOT, Proc

EXAMPLES = ROOT / "examples" / "k8s"


def resource(name: str, created: str = "2026-01-01T00:00:00Z", generation: int = 1) -> dict[str, Any]:
    """An example resource as the API server returns it: metadata filled in."""
    doc: dict[str, Any] = copy.deepcopy(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8")))
    doc["metadata"].update(creationTimestamp=created, generation=generation, namespace="models")
    return doc


def base() -> dict[str, Any]:
    """examples/credit-risk-redis.yaml without its models: what the chart's values give the reconciler."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "credit-risk-redis.yaml").read_text(encoding="utf-8"))
    doc.pop("models")
    return doc


def renamed(doc: dict[str, Any], name: str, created: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    out["metadata"].update(name=name, creationTimestamp=created)
    return out


def test_resource_converts_to_the_same_model_as_the_file() -> None:
    """examples/k8s/credit-risk.yaml yields exactly the model examples/credit-risk-redis.yaml declares."""
    conversion = convert(base(), [resource("credit-risk")])
    assert conversion.registry is not None
    assert conversion.registry.models == load_registry(ROOT / "examples" / "credit-risk-redis.yaml").models


def test_accepted_verdict_says_where_it_is_served() -> None:
    """A valid resource is Accepted, with its path and the registry version in the message."""
    conversion = convert(base(), [resource("credit-risk", generation=4)])
    verdict = conversion.verdicts[("Model", "credit-risk")]
    assert verdict == Verdict(
        True, "Accepted", "served at /v1/models/credit-risk/predict (registry_version 2026-11-23.1)", 4
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d["spec"]["versions"][1].update(weight="lots"), "spec.versions[1].weight: Input should be"),
        (lambda d: d["spec"].update(entity="merchant"), "spec.entity: unknown entity 'merchant' (known: customer)"),
        (lambda d: d["metadata"].update(name="Credit.Risk"), "metadata.name: should be a DNS label"),
        (lambda d: d["spec"].update(path="/models"), "spec.path: '/models' is reserved for the broker"),
        (
            lambda d: [v.update(weight=0) for v in d["spec"]["versions"]],
            "spec.versions: at least one version needs a weight above 0",
        ),
        (
            lambda d: d["spec"]["versions"][0]["backend"].pop("service"),
            "spec.versions[0].backend: Value error, declare exactly one of 'service' or 'sagemaker'",
        ),
    ],
    ids=["field", "unknown-entity", "bad-name", "reserved-path", "no-live-version", "no-backend"],
)
def test_invalid_resource_is_rejected_alone_with_its_reason(change: Any, reason: str) -> None:
    """A bad resource gets Invalid with the registry's problem at its own field path; the others still serve."""
    bad = resource("credit-risk")
    change(bad)
    conversion = convert(base(), [bad, resource("fraud-sagemaker")])
    assert conversion.registry is not None
    assert [m.name for m in conversion.registry.models] == ["fraud"]
    name = bad["metadata"]["name"]
    verdict = conversion.verdicts[("Model", name)]
    assert not verdict.accepted and verdict.reason == "Invalid"
    assert reason in verdict.message
    assert conversion.verdicts[("Model", "fraud")].accepted


def test_older_resource_keeps_a_contested_path() -> None:
    """Two resources on one path: the older keeps serving, the newer is Invalid naming the clash."""
    older = resource("credit-risk", created="2026-01-01T00:00:00Z")
    newer = renamed(older, "credit-risk-copy", "2026-02-01T00:00:00Z")
    conversion = convert(base(), [newer, older])
    assert conversion.registry is not None
    assert [m.name for m in conversion.registry.models] == ["credit-risk"]
    assert conversion.verdicts[("Model", "credit-risk-copy")].message == (
        "spec.path: '/v1/models/credit-risk/predict' is already the path of Model credit-risk"
    )


def test_invalid_base_serves_nothing_and_judges_nothing() -> None:
    """Problems that belong to no resource are the base's: no registry, no verdicts, the problems listed."""
    broken = base()
    broken["broker"]["message_timeout_ms"] = 10
    conversion = convert(broken, [resource("credit-risk")])
    assert conversion.registry is None and conversion.verdicts == {}
    assert [p.path for p in conversion.base_problems] == ["broker.message_timeout_ms"]


def test_resources_of_unknown_kinds_are_ignored() -> None:
    """Only the kinds in crds.KINDS become registry entries or get a verdict."""
    other = {"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    conversion = convert(base(), [other, resource("credit-risk")])
    assert list(conversion.verdicts) == [("Model", "credit-risk")]


def test_published_registry_round_trips() -> None:
    """The YAML the reconciler publishes loads back into the same registry."""
    registry = convert(base(), [resource("credit-risk"), resource("fraud-sagemaker")]).registry
    assert registry is not None
    assert parse_registry(yaml.safe_load(registry_yaml(registry))) == registry


def accepted(generation: int = 1, message: str = "m") -> Verdict:
    return Verdict(True, "Accepted", message, generation)


def test_status_condition_follows_metav1_condition() -> None:
    """A first verdict writes an Accepted condition stamped now, with the observed generation."""
    status = status_update(resource("credit-risk", generation=2), accepted(2), "2026-05-01T10:00:00Z")
    assert status == {
        "observedGeneration": 2,
        "conditions": [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "m",
                "observedGeneration": 2,
                "lastTransitionTime": "2026-05-01T10:00:00Z",
            }
        ],
    }


def test_unchanged_status_is_not_rewritten() -> None:
    """Writing an equal status would trigger the watch again forever: it is skipped."""
    doc = resource("credit-risk")
    doc["status"] = status_update(doc, accepted(), "2026-05-01T10:00:00Z")
    assert status_update(doc, accepted(), "2026-05-02T10:00:00Z") is None


def test_transition_time_moves_only_when_the_status_flips() -> None:
    """A new message keeps lastTransitionTime; True → False stamps the new time."""
    doc = resource("credit-risk")
    doc["status"] = status_update(doc, accepted(), "2026-05-01T10:00:00Z")
    same = status_update(doc, accepted(message="new"), "2026-05-02T10:00:00Z")
    flipped = status_update(doc, Verdict(False, "Invalid", "bad", 1), "2026-05-03T10:00:00Z")
    assert same is not None and same["conditions"][0]["lastTransitionTime"] == "2026-05-01T10:00:00Z"
    assert flipped is not None and flipped["conditions"][0]["lastTransitionTime"] == "2026-05-03T10:00:00Z"


def set_resource_weights(cluster: FakeCluster, v1: int, v2: int) -> None:
    cluster.resources[0]["spec"]["versions"][0]["weight"] = v1
    cluster.resources[0]["spec"]["versions"][1]["weight"] = v2


class FakeCluster:
    """The reconciler's view of the API server, in memory: resources, one ConfigMap, written statuses.

    There is no cluster here; the control plane it talks to in the tests below is the real process.
    """

    def __init__(self, resources: list[dict[str, Any]]) -> None:
        self.resources = resources
        self.published: list[tuple[str, str]] = []
        self.rolls = 0
        self.statuses: list[tuple[tuple[str, str], dict[str, Any]]] = []

    async def list_resources(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self.resources)

    async def wait_for_change(self, timeout_s: float) -> None:
        raise NotImplementedError  # reconcile_once never waits

    async def published(self) -> Published | None:
        return Published(self.published[-1][1], self.published[-1][0]) if self.published else None

    async def publish(self, registry_yaml: str, digest: str, *, roll: bool) -> None:
        self.published.append((registry_yaml, digest))
        self.rolls += roll

    async def write_status(self, key: tuple[str, str], status: dict[str, Any]) -> None:
        self.statuses.append((key, status))
        for doc in self.resources:
            if (doc["kind"], doc["metadata"]["name"]) == key:
                doc["status"] = status


async def test_reconcile_publishes_once_then_statuses_settle() -> None:
    """First pass publishes and writes each status; a second pass with nothing changed writes nothing."""
    bad = resource("fraud-sagemaker")
    bad["spec"]["entity"] = "merchant"
    cluster = FakeCluster([resource("credit-risk"), bad])
    first = await reconcile_once(cluster, base(), None)
    second = await reconcile_once(cluster, base(), first)
    assert first == second == Published(digest(cluster.published[0][0]), cluster.published[0][0])
    assert len(cluster.published) == 1 and "credit-risk" in cluster.published[0][0]
    assert cluster.rolls == 1
    assert {key: s["conditions"][0]["status"] for key, s in cluster.statuses} == {
        ("Model", "credit-risk"): "True",
        ("Model", "fraud"): "False",
    }
    assert len(cluster.statuses) == 2


async def test_model_edits_are_published_and_only_base_edits_roll() -> None:
    """Weights or a new version: the registry is published and the pods follow the file (no roll);
    a base edit the pods cannot follow (the broker's message timeout) rolls them."""
    cluster = FakeCluster([resource("credit-risk")])
    first = await reconcile_once(cluster, base(), None)
    set_resource_weights(cluster, 50, 50)
    second = await reconcile_once(cluster, base(), first)
    assert second != first and len(cluster.published) == 2 and cluster.rolls == 1
    weights = [v["weight"] for v in yaml.safe_load(cluster.published[1][0])["models"][0]["versions"]]
    assert weights == [50, 50]
    cluster.resources[0]["spec"]["versions"].append({**cluster.resources[0]["spec"]["versions"][1], "name": "v3"})
    third = await reconcile_once(cluster, base(), second)
    assert len(cluster.published) == 3 and cluster.rolls == 1
    slower = base()
    slower["broker"]["message_timeout_ms"] = 900
    await reconcile_once(cluster, slower, third)
    assert len(cluster.published) == 4 and cluster.rolls == 2


async def test_invalid_base_keeps_the_published_registry() -> None:
    """With a broken base the reconciler publishes nothing and reports the digest it had."""
    broken = base()
    broken["broker"]["message_timeout_ms"] = 10
    cluster = FakeCluster([resource("credit-risk")])
    kept = Published("abc", "models: []")
    assert await reconcile_once(cluster, broken, kept) == kept
    assert cluster.published == [] and cluster.statuses == []


def _edited(change: Any) -> Registry:
    doc = resource("credit-risk")
    change(doc["spec"])
    conversion = convert(base(), [doc])
    assert conversion.registry is not None
    return conversion.registry


WEIGHT_CASES: list[tuple[str, Any, dict[str, dict[str, int]] | None]] = [
    (
        "weights",
        lambda s: [v.update(weight=w) for v, w in zip(s["versions"], (5, 95), strict=True)],
        {"credit-risk": {"v1": 5, "v2": 95}},
    ),
    ("nothing", lambda s: None, {}),
    ("a version added", lambda s: s["versions"].append({**s["versions"][1], "name": "v3", "weight": 1}), None),
    ("weights and timeout", lambda s: (s["versions"][0].update(weight=5), s.update(timeout_ms=900)), None),
]


@pytest.mark.parametrize(("case", "change", "expected"), WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_weight_only_changes_are_told_apart(case: str, change: Any, expected: dict[str, dict[str, int]] | None) -> None:
    """Only a change of weights alone is pushed to the control plane; anything more waits for the file."""
    before = parse_published(registry_yaml(_edited(lambda s: None)))
    assert before is not None and weight_changes(before, _edited(change)) == expected
    assert parse_published("{not: [yaml") is None


ADMIN_TOKEN = "reconciler-test-token"


@pytest.fixture
def live_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The base with free control-plane ports, its state file in tmp_path."""
    monkeypatch.setenv(TOKEN_ENV, ADMIN_TOKEN)
    monkeypatch.setenv(RUNTIME_DIR_ENV, str(tmp_path / "runtime"))
    doc = base()
    doc["control_plane"] = {"port": free_port(), "admin_port": free_port(), "state_file": str(tmp_path / "state.json")}
    doc["metrics"] = {"address": "127.0.0.1", "port": free_port()}
    return doc


def start_control_plane(published: Published, directory: Path) -> tuple[Proc, AdminEndpoint]:
    """The control-plane pod, started on the registry the reconciler published (real process)."""
    config = directory / "registry.yaml"
    config.write_text(published.registry_yaml)
    plane = yaml.safe_load(published.registry_yaml)["control_plane"]
    cmd = [sys.executable, "-m", "extproc.cli", "control-plane", "--config", str(config)]
    proc = Proc("control-plane", cmd, directory / "control-plane.log").start()
    url = f"http://127.0.0.1:{plane['admin_port']}"
    wait_ready(url + "/healthz")
    return proc, AdminEndpoint(url, ADMIN_TOKEN, 0, "")


def live_split(endpoint: AdminEndpoint) -> dict[str, int]:
    status, doc = admin_request(endpoint, "GET", "/weights")
    assert status == 200, doc
    split: dict[str, int] = doc["models"]["credit-risk"]
    return split


async def test_weight_only_edit_goes_live_at_once(live_base: dict[str, Any], tmp_path: Path) -> None:
    """kubectl-editing a Model's weights: the control plane serves the split as soon as the pass ends,
    before kubelet updates any pod's file; nothing rolls."""
    cluster = FakeCluster([resource("credit-risk")])
    first = await reconcile_once(cluster, live_base, None)
    proc, endpoint = start_control_plane(first, tmp_path)
    try:
        set_resource_weights(cluster, 5, 95)
        second = await reconcile_once(cluster, live_base, first, AdminApi(endpoint))
        assert second is not None and second != first
        assert cluster.rolls == 1 and len(cluster.published) == 2
        assert live_split(endpoint) == {"v1": 5, "v2": 95}
    finally:
        proc.stop()


async def test_a_refused_push_still_lands_with_the_file(live_base: dict[str, Any], tmp_path: Path) -> None:
    """A control plane that refuses the push (wrong token) changes nothing at once; once kubelet
    updates its registry file with what the reconciler published, it serves the new split."""
    cluster = FakeCluster([resource("credit-risk")])
    first = await reconcile_once(cluster, live_base, None)
    proc, endpoint = start_control_plane(first, tmp_path)
    try:
        before = live_split(endpoint)
        set_resource_weights(cluster, 10, 90)
        wrong = AdminApi(AdminEndpoint(endpoint.url, "wrong-token", 0, ""))
        second = await reconcile_once(cluster, live_base, first, wrong)
        assert second is not None and cluster.rolls == 1 and live_split(endpoint) == before
        (tmp_path / "registry.yaml").write_text(second.registry_yaml)  # what kubelet does to the mount
        for _ in range(40):
            if live_split(endpoint) == {"v1": 10, "v2": 90}:
                break
            await asyncio.sleep(0.25)
        assert live_split(endpoint) == {"v1": 10, "v2": 90}
    finally:
        proc.stop()


def test_an_allow_list_naming_a_deleted_model_does_not_stop_the_rest() -> None:
    """The base's consumer may call credit-risk and fraud; with only credit-risk as a resource,
    credit-risk is served and callable, and the missing name is reported, not fatal."""
    with_consumer = base()
    with_consumer["consumers"] = [
        {"name": "app", "api_keys": ["sha256:" + "a" * 64], "models": ["credit-risk", "fraud"]}
    ]
    conversion = convert(with_consumer, [resource("credit-risk")])
    assert conversion.registry is not None, conversion.base_problems
    assert conversion.registry.consumers[0].models == ("credit-risk",)
    assert conversion.ignored == ("consumer 'app' may call 'fraud', which is not served",)
    typo = base()
    typo["consumers"] = [{"name": "app", "api_keys": ["sha256:" + "a" * 64], "models": ["credit-risk"], "admin": "x"}]
    assert convert(typo, [resource("credit-risk")]).registry is None  # other base problems still stop it
