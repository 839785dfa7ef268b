"""The Helm chart, rendered and linted by Helm's own engine, its manifests checked against Kubernetes' schemas."""

from __future__ import annotations

import base64
import copy
import functools
import itertools
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from extproc import cli
from extproc.kube.resources import convert
from extproc.registry import load_registry
from tests.conftest import ROOT
from tests.credentials import Signer, self_signed_pair
from tests.test_cli import run_cli, validate_with_envoy
from tests.test_crds import KUBERNETES_VERSION
from tests.test_envoy_files import inlined

CHART = ROOT / "helm" / "model-broker"
FULL_VALUES: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "k8s" / "values" / "production.yaml").read_text())
RESOURCES_VALUES = {**FULL_VALUES, "modelSource": "resources"}
VALUE_SETS = {"default": {}, "full": FULL_VALUES, "full-resources": RESOURCES_VALUES}
# Prometheus Operator's kind: not part of Kubernetes, so there is no schema to check it against.
NOT_IN_KUBERNETES = {"ServiceMonitor"}
RELEASE, NAMESPACE = "mb", "models"
PREFIX = f"{RELEASE}-model-broker"
CONTROL_PLANE_HOST = f"{PREFIX}-control-plane.{NAMESPACE}.svc.cluster.local"


def render_values(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's manifests for these values, as `helm install` would render them (no cluster: `lookup` is empty)."""
    rendered = helm.Chart.load(CHART).render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


@functools.cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render_values(VALUE_SETS[name]))


def render(name: str) -> list[dict[str, Any]]:
    """The chart's manifests for one value set (rendered once per session, copied per test)."""
    return copy.deepcopy(list(_render(name)))


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]


def pod_spec(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "Deployment", f"{PREFIX}-{component}")["spec"]["template"]["spec"]
    return spec


def pod_spec_annotations(docs: list[dict[str, Any]], component: str) -> dict[str, str]:
    found: dict[str, str] = find(docs, "Deployment", f"{PREFIX}-{component}")["spec"]["template"]["metadata"][
        "annotations"
    ]
    return found


def container(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    """The main container of a component's pod."""
    found: dict[str, Any] = pod_spec(docs, component)["containers"][0]
    return found


def arg_after(args: list[str], flag: str) -> list[str]:
    """Every value given to `flag` in an argument list."""
    return [value for option, value in itertools.pairwise(args) if option == flag]


def service_ports(docs: list[dict[str, Any]], component: str) -> dict[str, int]:
    return {p["name"]: p["port"] for p in find(docs, "Service", f"{PREFIX}-{component}")["spec"]["ports"]}


def registry_doc(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The registry the pods load: the chart's ConfigMap, or with modelSource=resources the reconciler's base."""
    found = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] in {f"{PREFIX}-registry", f"{PREFIX}-base"}
    ]
    data = found[0]["data"]
    doc: dict[str, Any] = yaml.safe_load(data.get("registry.yaml") or data["base.yaml"])
    return doc


@pytest.mark.parametrize("values", VALUE_SETS)
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
        ("NetworkPolicy", "-control-plane"),
        ("ServiceMonitor", "-envoy"),
        ("ServiceMonitor", "-broker"),
        ("ServiceMonitor", "-control-plane"),
        ("PersistentVolumeClaim", "-control-plane"),
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
def test_serving_pods_have_probes(values: str) -> None:
    """Broker, Envoy and control-plane containers declare readiness and liveness probes."""
    probed = set()
    for spec in pod_specs(render(values)):
        for main in spec["containers"]:
            if main["name"] in {"broker", "envoy", "control-plane"}:
                assert "readinessProbe" in main and "livenessProbe" in main
                probed.add(main["name"])
    assert probed == {"broker", "envoy", "control-plane"}


def test_only_the_reconciler_talks_to_the_api_server() -> None:
    """Its Role reads the model resources, patches their status, and touches only named objects otherwise."""
    docs = render("full-resources")
    role = find(docs, "Role", f"{PREFIX}-reconciler")
    allowed = {
        (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r.get("resourceNames", ())), tuple(r["verbs"]))
        for r in role["rules"]
    }
    assert allowed == {
        (("model-broker.io",), ("models", "ensembles"), (), ("get", "list", "watch")),
        (("model-broker.io",), ("models/status", "ensembles/status"), (), ("patch",)),
        (("",), ("configmaps",), (), ("create",)),
        (("",), ("configmaps",), (f"{PREFIX}-registry",), ("get", "update")),
        (
            ("apps",),
            ("deployments",),
            (f"{PREFIX}-broker", f"{PREFIX}-envoy", f"{PREFIX}-control-plane"),
            ("get", "patch"),
        ),
    }
    assert not any(d["kind"].startswith("Cluster") for d in docs)
    for spec in pod_specs(docs):
        if spec.get("serviceAccountName") != f"{PREFIX}-reconciler":
            assert spec["automountServiceAccountToken"] is False


def test_reconciler_rolls_every_reader_of_the_registry_and_reaches_the_control_plane() -> None:
    """It rolls exactly the Deployments that mount the registry it publishes (its Role may patch them),
    and sends weight-only changes to the control plane's admin port."""
    docs = render("full-resources")
    args = container(docs, "reconciler")["args"]
    readers = {
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Deployment"
        and any(
            source.get("configMap", {}).get("name") == f"{PREFIX}-registry"
            for volume in d["spec"]["template"]["spec"]["volumes"]
            for source in volume.get("projected", {}).get("sources", [])
        )
    }
    assert readers == {f"{PREFIX}-broker", f"{PREFIX}-envoy", f"{PREFIX}-control-plane"}
    assert set(arg_after(args, "--roll")) == readers
    patchable = next(r for r in find(docs, "Role", f"{PREFIX}-reconciler")["rules"] if "deployments" in r["resources"])
    assert set(patchable["resourceNames"]) == readers and "patch" in patchable["verbs"]
    admin_port = service_ports(docs, "control-plane")["admin"]
    assert arg_after(args, "--admin") == [f"http://{CONTROL_PLANE_HOST}:{admin_port}"]


@pytest.mark.parametrize(
    ("values", "persistent"),
    [({}, True), ({"controlPlane": {"persistence": {"enabled": False}}}, False)],
    ids=["persistent", "emptydir"],
)
def test_control_plane_is_one_writer_with_its_state_on_a_volume(values: dict[str, Any], persistent: bool) -> None:
    """One replica, replaced with Recreate (never two writers), its state file on the state volume:
    a claim of its own when persistence is on, an emptyDir otherwise."""
    docs = render_values(values)
    deployment = find(docs, "Deployment", f"{PREFIX}-control-plane")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    spec = deployment["spec"]["template"]["spec"]
    state_file = registry_doc(docs)["control_plane"]["state_file"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if state_file.startswith(m["mountPath"] + "/"))
    assert not mount.get("readOnly")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    if persistent:
        assert [c["metadata"]["name"] for c in claims] == [volume["persistentVolumeClaim"]["claimName"]]
    else:
        assert "emptyDir" in volume and claims == []


def test_full_values_claim_storage_as_asked() -> None:
    """The claim gets the storage class, size and access modes of the values."""
    claim = find(render("full"), "PersistentVolumeClaim", f"{PREFIX}-control-plane")["spec"]
    wanted = FULL_VALUES["controlPlane"]["persistence"]
    assert claim["storageClassName"] == wanted["storageClassName"]
    assert claim["accessModes"] == wanted["accessModes"]
    assert claim["resources"]["requests"]["storage"] == wanted["size"]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_control_plane_service_reaches_what_it_binds(values: str) -> None:
    """The Service's grpc, admin, feedback and metrics ports lead to the ports the registry tells the control plane
    to bind, on every interface, and the probes ask the admin port's unauthenticated /healthz."""
    docs = render(values)
    registry = registry_doc(docs)
    main = container(docs, "control-plane")
    assert main["args"] == ["control-plane", "--config", "/etc/model-broker/registry.yaml"]
    named = {p["name"]: p["containerPort"] for p in main["ports"]}
    service = find(docs, "Service", f"{PREFIX}-control-plane")["spec"]
    targets = {p["name"]: named[p["targetPort"]] for p in service["ports"]}
    plane = registry["control_plane"]
    assert plane["address"] == "0.0.0.0"
    assert targets == {
        "grpc": plane["port"],
        "admin": plane["admin_port"],
        "feedback": plane["feedback_port"],
        "metrics": registry["metrics"]["port"],
    }
    for probe in (main["readinessProbe"], main["livenessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "admin"}


def test_every_envoy_and_broker_finds_the_control_plane(tmp_path: Path) -> None:
    """Envoy's control-plane cluster and every broker's --control-plane name the control-plane Service
    on the gRPC port it exposes; each Envoy reports its own pod name as its node id."""
    docs = render("full")
    grpc = service_ports(docs, "control-plane")["grpc"]
    assert arg_after(container(docs, "broker")["args"], "--control-plane") == [f"{CONTROL_PLANE_HOST}:{grpc}"]
    envoy = yaml.safe_load(envoy_config_from_chart(docs, tmp_path))
    cluster = next(c for c in envoy["staticResources"]["clusters"] if c["name"] == "model_broker_control_plane")
    endpoints = [
        e["endpoint"]["address"]["socketAddress"] for e in cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"]
    ]
    assert cluster["type"] == "STRICT_DNS"
    assert endpoints == [{"address": CONTROL_PLANE_HOST, "portValue": grpc}]
    proxy = container(docs, "envoy")
    assert arg_after(proxy["args"], "--service-node") == ["$(POD_NAME)"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in proxy["env"]


TOKEN_CASES = {
    "generated": {},
    "generated-resources": {"modelSource": "resources"},
    "existing-resources": RESOURCES_VALUES,
}


@pytest.mark.parametrize("values", TOKEN_CASES.values(), ids=TOKEN_CASES.keys())
def test_control_plane_and_reconciler_share_the_admin_token(values: dict[str, Any]) -> None:
    """The token the control plane checks is the one the reconciler sends: one Secret, key `token`,
    generated (40 random characters) unless an existing Secret is named; no other pod gets it."""
    docs = render_values(values)
    refs = {
        c["name"]: e["valueFrom"]["secretKeyRef"]
        for spec in pod_specs(docs)
        for c in spec["containers"] + spec.get("initContainers", [])
        for e in c.get("env", [])
        if e["name"] == "MODEL_BROKER_ADMIN_TOKEN"
    }
    readers = {"control-plane", "reconciler"} if values.get("modelSource") == "resources" else {"control-plane"}
    assert set(refs) == readers
    existing = values.get("controlPlane", {}).get("adminToken", {}).get("existingSecret")
    secrets = [d for d in docs if d["kind"] == "Secret"]
    name = existing or f"{PREFIX}-admin-token"
    assert all(ref == {"name": name, "key": "token"} for ref in refs.values())
    if existing:
        assert secrets == []
    else:
        assert [s["metadata"]["name"] for s in secrets] == [name]
        assert re.fullmatch(r"[A-Za-z0-9]{40}", base64.b64decode(secrets[0]["data"]["token"]).decode())


def admits(policy: dict[str, Any], labels: dict[str, str], port: int) -> bool:
    """Whether a NetworkPolicy's ingress rules let a pod with these labels (same namespace) reach `port`."""
    for rule in policy["spec"]["ingress"]:
        if port not in [p["port"] for p in rule.get("ports", [])]:
            continue
        peers = rule.get("from")
        if peers is None or any(labels.items() >= p["podSelector"]["matchLabels"].items() for p in peers):
            return True
    return False


def test_network_policy_guards_the_control_plane() -> None:
    """gRPC only from Envoy and broker pods, feedback only from Envoy (it authenticated the caller), the admin
    API only from the reconciler, metrics from anyone."""
    docs = render("full-resources")
    policy = find(docs, "NetworkPolicy", f"{PREFIX}-control-plane")
    labels = {
        d["metadata"]["name"].removeprefix(f"{PREFIX}-"): d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] == "Deployment"
    }
    assert labels["control-plane"].items() >= policy["spec"]["podSelector"]["matchLabels"].items()
    labels["elsewhere"] = {"app.kubernetes.io/name": "something-else"}
    ports = service_ports(docs, "control-plane")
    reached = {(pod, name) for pod in labels for name, port in ports.items() if admits(policy, labels[pod], port)}
    assert reached == {
        ("envoy", "grpc"),
        ("envoy", "feedback"),
        ("broker", "grpc"),
        ("reconciler", "admin"),
        *((pod, "metrics") for pod in labels),
    }


def test_only_envoy_mounts_the_certificate_and_key_sets() -> None:
    """The listener's TLS files and each consumer's JWKS file come from the Secret and ConfigMap the values
    name, mounted where Envoy's config step and Envoy look for them; no other pod mounts either."""
    docs = render("full")
    registry = registry_doc(docs)
    tls = registry["listener"]["tls"]
    wanted = {
        tls["certificate_chain"]: ("secret", FULL_VALUES["envoy"]["tls"]["secretName"]),
        tls["private_key"]: ("secret", FULL_VALUES["envoy"]["tls"]["secretName"]),
    }
    for consumer in registry["consumers"]:
        if "jwks_file" in consumer.get("jwt", {}):
            wanted[consumer["jwt"]["jwks_file"]] = ("configMap", FULL_VALUES["envoy"]["jwksConfigMap"])
    assert len(wanted) == 3
    spec = pod_spec(docs, "envoy")
    volumes = {v["name"]: v for v in spec["volumes"]}
    for reader in spec["initContainers"] + spec["containers"]:
        for file, (kind, source) in wanted.items():
            mount = next(m for m in reader["volumeMounts"] if file.startswith(m["mountPath"] + "/"))
            volume = volumes[mount["name"]]
            assert mount["readOnly"] is True
            assert volume[kind].get("secretName", volume[kind].get("name")) == source
            key = file.removeprefix(mount["mountPath"] + "/")
            assert key in [i["path"] for i in volume[kind].get("items", [{"path": key}])]
    sources = {source for _, source in wanted.values()}
    for other in pod_specs(docs):
        if other["containers"][0]["name"] != "envoy":
            assert not any(source in json.dumps(other["volumes"]) for source in sources)


def test_a_jwks_file_the_envoy_pod_cannot_see_fails_the_render() -> None:
    """A consumer's jwks_file outside envoy.jwksConfigMap's mount is refused by `helm install`, not by a crash loop."""
    consumer = {
        "name": "app",
        "jwt": {"issuer": "https://login.example.com/", "jwks_file": "jwks.json"},
        "models": ["*"],
    }
    with pytest.raises(helm.HelmError, match=r"consumers\[0\]\.jwt\.jwks_file: set envoy\.jwksConfigMap"):
        render_values({"registry": {"consumers": [consumer]}})


def test_audit_spools_on_the_broker_volume_and_ships_to_aws(tmp_path: Path) -> None:
    """With registry.audit, each broker pod spools on its own writable volume and the registry
    the broker loads (checked by the broker's own loader) points the spool there."""
    docs = render("full")
    registry = registry_doc(docs)
    spool = registry["audit"]["spool"]["dir"]
    broker = container(docs, "broker")
    mount = next(m for m in broker["volumeMounts"] if m["mountPath"] == spool)
    assert not mount.get("readOnly")
    volume = next(v for v in pod_spec(docs, "broker")["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["sizeLimit"] == "2Gi"
    config = tmp_path / "registry.yaml"
    config.write_text(yaml.safe_dump(registry))
    loaded = load_registry(config, envoy_files=False)
    assert loaded.audit is not None and loaded.audit.sink.aws is not None and loaded.audit.spool.dir == spool
    assert not any("audit-spool" in json.dumps(spec["volumes"]) for spec in pod_specs(render("default")))


FEAST_CLUSTER = {
    "redis": {"url": "redis://feast-redis-0.feast-redis:6379", "redis_type": "redis_cluster"},
    "project": "fraud",
    "feature_views": [{"name": "customer_stats", "entities": ["customer"], "ttl_seconds": 86400}],
}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, {"embedded": {"path": "features.json"}}),
        (
            {"externalRedis": {"url": "redis://features-0.features:6379", "redisType": "redis_cluster"}},
            {"redis": {"url": "redis://features-0.features:6379", "redis_type": "redis_cluster"}},
        ),
        (
            {"externalRedis": {"url": "redis://features:6379/0"}},
            {"redis": {"url": "redis://features:6379/0", "redis_type": "redis"}},
        ),
        ({"registry": {"feature_store": {"feast": FEAST_CLUSTER}}}, {"feast": FEAST_CLUSTER}),
    ],
    ids=["embedded", "external-cluster", "external-redis", "feast-cluster"],
)
def test_the_feature_store_the_pods_load(values: dict[str, Any], expected: dict[str, Any], tmp_path: Path) -> None:
    """One source in the registry, as the values say (Feast's section as is), and the broker's loader accepts it."""
    registry = registry_doc(render_values(values))
    store = registry["feature_store"]
    assert {k: v for k, v in store.items() if k in ("redis", "embedded", "feast")} == expected
    config = tmp_path / "registry.yaml"
    config.write_text(yaml.safe_dump(registry))
    (tmp_path / "features.json").write_text("{}")
    load_registry(config, envoy_files=False)


def test_a_local_audit_sink_fails_the_render() -> None:
    """JSONL files inside one pod are no audit trail on Kubernetes: `helm install` says to use aws."""
    audit = {"spool": {"dir": "spool"}, "sink": {"local": {"dir": "records"}}}
    with pytest.raises(helm.HelmError, match=r"registry\.audit\.sink: on Kubernetes use the aws sink"):
        render_values({"registry": {"audit": audit}})


def envoy_config_from_chart(docs: list[dict[str, Any]], tmp_path: Path) -> str:
    """Run the Envoy pod's init container command as the pod would, each of its mounts a local directory
    holding what the chart puts there (registry, TLS pair, JWKS files): the bootstrap, routes and
    clusters it writes, as one document."""
    spec = pod_spec(docs, "envoy")
    init = spec["initContainers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    local = {m["mountPath"]: tmp_path / m["name"] for m in init["volumeMounts"]}

    # One pass, longest mount first: a local directory may itself lie under a mount path (/tmp).
    mounts = re.compile("|".join(re.escape(m) + r"(?![\w-])" for m in sorted(local, key=len, reverse=True)))

    def here(text: str) -> str:
        return mounts.sub(lambda found: str(local[found.group(0)]), text)

    registry_yaml = here(yaml.safe_dump(registry_doc(docs)))
    registry = yaml.safe_load(registry_yaml)
    for mount in init["volumeMounts"]:
        directory = local[mount["mountPath"]]
        directory.mkdir()
        if mount["name"] == "registry":
            (directory / "registry.yaml").write_text(registry_yaml)
            features = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == f"{PREFIX}-features"]
            for doc in features:
                (directory / "features.json").write_text(doc["data"]["features.json"])
        elif "secret" in volumes[mount["name"]]:
            cert, key = self_signed_pair(directory)
            cert.rename(directory / "tls.crt")
            key.rename(directory / "tls.key")
        elif "configMap" in volumes[mount["name"]]:
            for consumer in registry.get("consumers", []):
                jwks_file = Path(consumer.get("jwt", {}).get("jwks_file", "/"))
                if jwks_file.parent == directory:
                    jwks_file.write_text(json.dumps(Signer.new(consumer["name"]).jwks()))
    assert cli.main([here(a) for a in init["args"]]) == 0
    # Envoy's validate mode never reads the watched files: validate their resources in place.
    return yaml.safe_dump(inlined(next(p for p in local.values() if p.name == "envoy-config")))


def test_envoy_follows_registry_edits_beside_the_proxy() -> None:
    """The pod runs the init container's envoy-config again with --watch, on the same mounts, so route
    and cluster files follow the registry ConfigMap without restarting Envoy."""
    spec = pod_spec(render("full"), "envoy")
    init = spec["initContainers"][0]
    watcher = next(c for c in spec["containers"] if c["name"] == "envoy-config-watch")
    assert watcher["args"] == [*init["args"], "--watch"] and "--xds-dir" in init["args"]
    assert watcher["volumeMounts"] == init["volumeMounts"]
    envoy = container(render("full"), "envoy")
    assert arg_after(envoy["args"], "-c") == [f"{arg_after(init['args'], '--xds-dir')[0]}/envoy.yaml"]


def test_only_edits_the_pods_cannot_follow_roll_them() -> None:
    """`helm upgrade` with other models keeps every pod (they reload the file); another broker
    setting rolls them (the checksum on each pod template)."""

    def checksums(values: dict[str, Any]) -> dict[str, str]:
        docs = render_values(values)
        return {
            name: pod_spec_annotations(docs, name)["checksum/registry"] for name in ("broker", "envoy", "control-plane")
        }

    models = copy.deepcopy(FULL_VALUES)
    models["registry"]["models"] = models["registry"]["models"][:1]
    models["registry"]["registry_version"] = "next"
    slower = copy.deepcopy(FULL_VALUES)
    slower["registry"]["broker"] = {"message_timeout_ms": 900}
    assert checksums(models) == checksums(FULL_VALUES)
    assert all(a != b for a, b in zip(checksums(slower).values(), checksums(FULL_VALUES).values(), strict=True))


@pytest.mark.parametrize("values", ["default", "full"])
def test_envoy_config_of_the_chart_passes_envoy_validate(values: str, tmp_path: Path) -> None:
    """The Envoy config the chart's init container generates from the chart's registry is accepted by Envoy
    (with the full values: HTTPS from the TLS Secret, an API-key and a JWT consumer)."""
    docs = render(values)
    config = envoy_config_from_chart(docs, tmp_path)
    if values == "full":
        assert "transportSocket" in json.dumps(yaml.safe_load(config)["staticResources"]["listeners"][0])
        assert "localJwks" in config
    result = validate_with_envoy(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_finds_every_broker_pod_and_worker(tmp_path: Path) -> None:
    """Envoy's ext_proc clusters (gRPC and http_service) resolve the headless broker Service on exactly
    the ports the Service exposes for each."""
    docs = render("full")
    envoy = yaml.safe_load(envoy_config_from_chart(docs, tmp_path))
    service = find(docs, "Service", f"{PREFIX}-broker")
    assert service["spec"]["clusterIP"] == "None"
    for cluster_name, prefix in (("model_broker_ext_proc", "grpc-"), ("model_broker_ext_proc_http", "http-")):
        cluster = next(c for c in envoy["staticResources"]["clusters"] if c["name"] == cluster_name)
        endpoints = [
            e["endpoint"]["address"]["socketAddress"] for e in cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"]
        ]
        assert cluster["type"] == "STRICT_DNS"
        assert {e["address"] for e in endpoints} == {f"{PREFIX}-broker.{NAMESPACE}.svc.cluster.local"}
        assert [e["portValue"] for e in endpoints] == [
            p["port"] for p in service["spec"]["ports"] if p["name"].startswith(prefix)
        ]


def test_reconciler_base_accepts_the_example_resources() -> None:
    """The base the chart gives the reconciler plus examples/k8s resources convert into a valid registry.

    The base alone declares no models; its consumers' allow-lists may name models the resources bring.
    """
    base = registry_doc(render("full-resources"))
    resources = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "examples" / "k8s").glob("*.yaml"))]
    conversion = convert(base, [r for r in resources if r.get("kind") in {"Model", "Ensemble"}])
    assert conversion.registry is not None, conversion.base_problems
    assert all(v.accepted for v in conversion.verdicts.values()), conversion.verdicts
    assert base["models"] == [] and conversion.registry.consumers


def test_committed_crds_ship_with_the_chart() -> None:
    """Helm installs the generated CRDs from the chart's crds/ directory."""
    chart = helm.Chart.load(CHART)
    assert [c["name"] for c in chart.crds] == ["crds/crds.yaml"]


def test_cli_prints_the_committed_crds() -> None:
    """`model-broker crds` prints exactly the chart's crds/crds.yaml."""
    result = run_cli("crds")
    assert result.returncode == 0 and result.stdout == (CHART / "crds" / "crds.yaml").read_text()


def notes(values: dict[str, Any]) -> str:
    """What `helm install` prints (NOTES.txt) for these values."""
    rendered = helm.Chart.load(CHART).render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_notes_run_the_cli_where_it_and_its_token_are(name: str) -> None:
    """NOTES never expects `model-broker` on the user's PATH: each CLI line execs into a Deployment the chart
    renders, whose container has the admin token, and names the admin port that container listens on."""
    text, docs = notes(VALUE_SETS[name]), render(name)
    lines = [line.strip() for line in text.splitlines() if re.search(r"model-broker (weights|audit)", line)]
    assert lines, text
    for line in lines:
        match = re.fullmatch(rf"kubectl -n {NAMESPACE} exec deploy/(\S+) -- model-broker (.+) --admin (\S+)", line)
        assert match is not None, line
        main = find(docs, "Deployment", match.group(1))["spec"]["template"]["spec"]["containers"][0]
        assert "MODEL_BROKER_ADMIN_TOKEN" in {e["name"] for e in main.get("env", [])}, line
        admin_port = next(p["containerPort"] for p in main["ports"] if p["name"] == "admin")
        assert match.group(3) == f"http://127.0.0.1:{admin_port}", line
        assert cli_parses(match.group(2).split()), line


def cli_parses(words: list[str]) -> bool:
    """Whether the CLI's parser accepts these words (the NOTES' commands are real ones)."""
    try:
        cli.parser().parse_known_args(words)
    except SystemExit:
        return False
    return True
