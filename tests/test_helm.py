"""The Helm chart, rendered and linted by Helm's own engine, its manifests checked against Kubernetes' schemas."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from extproc import cli
from extproc.custom_resources import convert
from extproc.registry import parse_registry
from tests.conftest import ROOT
from tests.test_cli import run_cli, validate_with_envoy
from tests.test_crds import KUBERNETES_VERSION

CHART = ROOT / "helm" / "model-broker"
FULL_VALUES: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "k8s" / "values" / "production.yaml").read_text())
RESOURCES_VALUES = {**FULL_VALUES, "modelSource": "resources"}
VALUE_SETS = {"default": {}, "full": FULL_VALUES, "full-resources": RESOURCES_VALUES}
# Prometheus Operator's kind: not part of Kubernetes, so there is no schema to check it against.
NOT_IN_KUBERNETES = {"ServiceMonitor"}
RELEASE, NAMESPACE = "mb", "models"


@functools.cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    rendered = helm.Chart.load(CHART).render(VALUE_SETS[name], name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    return tuple(docs)


def render(name: str) -> list[dict[str, Any]]:
    """The chart's manifests for one value set (rendered once per session, copied per test)."""
    return copy.deepcopy(list(_render(name)))


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]


@pytest.mark.parametrize("values", ["default", "full"])
def test_helm_lint_is_clean(values: str) -> None:
    """`helm lint --strict` for the stated Kubernetes version reports no warning or error."""
    report = helm.lint(CHART, VALUE_SETS[values], strict=True, kube_version=f"v{KUBERNETES_VERSION}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_manifest_validates_against_kubernetes(values: str) -> None:
    """Each rendered manifest passes the Kubernetes OpenAPI schema (strict: no unknown fields)."""
    docs = render(values)
    unchecked = {d["kind"] for d in docs if d["kind"] in NOT_IN_KUBERNETES}
    for doc in docs:
        if doc["kind"] not in NOT_IN_KUBERNETES:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert unchecked <= NOT_IN_KUBERNETES


def test_full_values_render_every_component() -> None:
    """The full values file turns on every optional part of the chart."""
    kinds = {(d["kind"], d["metadata"]["name"].removeprefix(f"{RELEASE}-model-broker")) for d in render("full")}
    for wanted in [
        ("Deployment", "-redis"),
        ("NetworkPolicy", "-broker"),
        ("NetworkPolicy", "-redis"),
        ("ServiceMonitor", "-envoy"),
        ("ServiceMonitor", "-broker"),
        ("HorizontalPodAutoscaler", "-broker"),
        ("PodDisruptionBudget", "-envoy"),
    ]:
        assert wanted in kinds
    account = find(render("full"), "ServiceAccount", f"{RELEASE}-model-broker")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/model-broker")


@pytest.mark.parametrize("values", VALUE_SETS)
def test_pods_are_locked_down(values: str) -> None:
    """Every container: non-root, read-only root fs, no capabilities, no privilege escalation, resources set."""
    for spec in pod_specs(render(values)):
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_broker_and_envoy_have_probes(values: str) -> None:
    """Broker and Envoy containers declare readiness and liveness probes."""
    for spec in pod_specs(render(values)):
        for container in spec["containers"]:
            if container["name"] in {"broker", "envoy"}:
                assert "readinessProbe" in container and "livenessProbe" in container


def test_only_the_reconciler_talks_to_the_api_server() -> None:
    """Its Role reads the model resources, patches their status, and touches only named objects otherwise."""
    docs = render("full-resources")
    role = find(docs, "Role", f"{RELEASE}-model-broker-reconciler")
    allowed = {
        (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r.get("resourceNames", ())), tuple(r["verbs"]))
        for r in role["rules"]
    }
    prefix = f"{RELEASE}-model-broker"
    assert allowed == {
        (("model-broker.io",), ("models", "ensembles"), (), ("get", "list", "watch")),
        (("model-broker.io",), ("models/status", "ensembles/status"), (), ("patch",)),
        (("",), ("configmaps",), (), ("create",)),
        (("",), ("configmaps",), (f"{prefix}-registry",), ("get", "update")),
        (("apps",), ("deployments",), (f"{prefix}-broker", f"{prefix}-envoy"), ("get", "patch")),
    }
    assert not any(d["kind"].startswith("Cluster") for d in docs)
    for spec in pod_specs(docs):
        if spec.get("serviceAccountName") != f"{prefix}-reconciler":
            assert spec["automountServiceAccountToken"] is False


def envoy_config_from_chart(docs: list[dict[str, Any]], registry_yaml: str, tmp_path: Path) -> str:
    """Run the Envoy pod's init container command, with the chart's registry, as the pod would."""
    (tmp_path / "registry.yaml").write_text(registry_yaml)
    init = pod_specs([find(docs, "Deployment", f"{RELEASE}-model-broker-envoy")])[0]["initContainers"][0]
    args = [str(tmp_path / Path(a).name) if a.startswith("/etc/") else a for a in init["args"]]
    assert cli.main(args) == 0
    return (tmp_path / "envoy.yaml").read_text()


@pytest.mark.parametrize("values", ["default", "full"])
def test_envoy_config_of_the_chart_passes_envoy_validate(values: str, tmp_path: Path) -> None:
    """The Envoy config the chart's init container generates from the chart's registry is accepted by Envoy."""
    docs = render(values)
    registry_yaml = find(docs, "ConfigMap", f"{RELEASE}-model-broker-registry")["data"]["registry.yaml"]
    config = envoy_config_from_chart(docs, registry_yaml, tmp_path)
    result = validate_with_envoy(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_finds_every_broker_pod_and_worker(tmp_path: Path) -> None:
    """Envoy's ext_proc cluster resolves the headless broker Service on exactly the ports the Service exposes."""
    docs = render("full")
    registry_yaml = find(docs, "ConfigMap", f"{RELEASE}-model-broker-registry")["data"]["registry.yaml"]
    envoy = yaml.safe_load(envoy_config_from_chart(docs, registry_yaml, tmp_path))
    cluster = next(c for c in envoy["staticResources"]["clusters"] if c["name"] == "model_broker_ext_proc")
    endpoints = [
        e["endpoint"]["address"]["socketAddress"] for e in cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"]
    ]
    service = find(docs, "Service", f"{RELEASE}-model-broker-broker")
    assert cluster["type"] == "STRICT_DNS" and service["spec"]["clusterIP"] == "None"
    assert {e["address"] for e in endpoints} == {f"{RELEASE}-model-broker-broker.{NAMESPACE}.svc.cluster.local"}
    assert [e["portValue"] for e in endpoints] == [
        p["port"] for p in service["spec"]["ports"] if p["name"] != "metrics"
    ]


def test_reconciler_base_accepts_the_example_resources() -> None:
    """The base the chart gives the reconciler plus examples/k8s resources convert into a valid registry."""
    base = yaml.safe_load(
        find(render("full-resources"), "ConfigMap", f"{RELEASE}-model-broker-base")["data"]["base.yaml"]
    )
    resources = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "examples" / "k8s").glob("*.yaml"))]
    conversion = convert(base, [r for r in resources if r.get("kind") == "Model"])
    assert conversion.registry is not None
    assert all(v.accepted for v in conversion.verdicts.values()), conversion.verdicts
    assert parse_registry(base).models == ()


def test_committed_crds_ship_with_the_chart() -> None:
    """Helm installs the generated CRDs from the chart's crds/ directory."""
    chart = helm.Chart.load(CHART)
    assert [c["name"] for c in chart.crds] == ["crds/crds.yaml"]


def test_cli_prints_the_committed_crds() -> None:
    """`model-broker crds` prints exactly the chart's crds/crds.yaml."""
    result = run_cli("crds")
    assert result.returncode == 0 and result.stdout == (CHART / "crds" / "crds.yaml").read_text()
