"""Dynamic mode (`envoy-config --xds-dir [--watch]`): listeners fixed, routes and clusters from watched files."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.envoy import CLUSTERS_FILE, Placement, XdsFiles
from extproc.envoy.xds_files import BOOTSTRAP_FILE, EnvoyFiles, plan, render, restart_needed
from extproc.process.launcher import envoy_binary, wait_listening, wait_ready
from extproc.registry import Registry, parse_registry
from tests.conftest import Proc, Stack, demo_registry_doc
from tests.test_cli import run_cli, validate_with_envoy

CREDIT = "/v1/models/credit-risk/predict"
FRAUD = "/v1/models/fraud/predict"
# Envoy notices a rename at once; the watcher polls each second and waits between phases.
APPLY_TIMEOUT_S = 20


def only(doc: dict[str, Any], *models: str) -> dict[str, Any]:
    """`doc` serving just `models`: no ensemble, so the listeners of the full demo are not needed."""
    out = copy.deepcopy(doc)
    out["models"] = [m for m in out["models"] if m["name"] in models]
    out["ensembles"] = []
    return out


def files(doc: dict[str, Any], tmp_path: Path) -> EnvoyFiles:
    return render(parse_registry(doc), str(tmp_path / "xds"), None, Placement())


def test_listeners_do_not_depend_on_models(tmp_path: Path) -> None:
    """One model, or models + ensemble + shadow: the same bootstrap, so no new model needs a restart."""
    full = demo_registry_doc()
    full["models"][0]["shadow"] = {"version": "v2", "compare_field": "score"}
    assert files(only(full, "credit-risk"), tmp_path).bootstrap == files(full, tmp_path).bootstrap


def test_bootstrap_names_no_cluster_both_static_and_dynamic(tmp_path: Path) -> None:
    """Model clusters only in the clusters file; base clusters only in the bootstrap."""
    rendered = files(demo_registry_doc(), tmp_path)
    static = {c["name"] for c in rendered.bootstrap["staticResources"]["clusters"]}
    assert static.isdisjoint(rendered.clusters)
    assert set(rendered.clusters) == {"credit-risk--v1", "credit-risk--v2", "fraud--v1"}
    assert set(rendered.routes) == {"models", "egress", "shadow"}


def _names(text: str) -> list[str]:
    return [r["name"] for r in yaml.safe_load(text)["resources"]]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (("credit-risk",), ("credit-risk",), []),
        (
            ("credit-risk",),
            ("credit-risk", "fraud"),
            # Union first (fraud's cluster before its route); the union is already the new set.
            [[CLUSTERS_FILE], ["routes-models.yaml"]],
        ),
        (
            ("credit-risk", "fraud"),
            ("fraud",),
            # Routes first, then credit-risk's clusters go.
            [["routes-models.yaml"], [CLUSTERS_FILE]],
        ),
        (
            ("credit-risk",),
            ("fraud",),
            [[CLUSTERS_FILE], ["routes-models.yaml"], [CLUSTERS_FILE]],
        ),
    ],
    ids=["unchanged", "added", "removed", "replaced"],
)
def test_plan_never_routes_to_a_missing_cluster(
    before: tuple[str, ...], after: tuple[str, ...], expected: list[list[str]], tmp_path: Path
) -> None:
    """Clusters = old + new, then routes, then clusters = new; unchanged files are not rewritten."""
    doc = demo_registry_doc()
    old, new = files(only(doc, *before), tmp_path), files(only(doc, *after), tmp_path)
    phases = plan(old, new)
    assert [[name for name, _ in phase] for phase in phases] == expected
    if len(expected) == 3:
        assert set(_names(phases[0][0][1])) == set(old.clusters) | set(new.clusters)
        assert set(_names(phases[2][0][1])) == set(new.clusters)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: d["listener"].update(port=d["listener"]["port"] + 1), "listener"),
        (lambda d: d["limits"].update(max_body_bytes=4096), "limits"),
        (lambda d: d["broker"].update(message_timeout_ms=900), "broker"),
    ],
    ids=["listener", "limits", "broker"],
)
def test_base_edits_need_a_restart(edit: Callable[[dict[str, Any]], None], named: str, tmp_path: Path) -> None:
    """An edit of what the listeners depend on is refused, naming the section; a model edit is not."""
    doc = demo_registry_doc()
    old: Registry = parse_registry(doc)
    changed = copy.deepcopy(doc)
    edit(changed)
    new = parse_registry(changed)
    reason = restart_needed(old, new, files(doc, tmp_path), files(changed, tmp_path))
    assert reason is not None and named in reason and "restart" in reason
    fewer = only(doc, "fraud")
    assert restart_needed(old, parse_registry(fewer), files(doc, tmp_path), files(fewer, tmp_path)) is None


def inlined(xds: Path) -> dict[str, Any]:
    """The dynamic bootstrap with the files' resources put in place (validate mode ignores path sources)."""
    boot: dict[str, Any] = yaml.safe_load((xds / BOOTSTRAP_FILE).read_text())
    for listener in boot["staticResources"]["listeners"]:
        hcm = listener["filterChains"][0]["filters"][-1]["typedConfig"]
        if "rds" not in hcm:  # the stats listener's fixed routes are inline
            continue
        name = hcm.pop("rds")["routeConfigName"]
        (route,) = yaml.safe_load((xds / XdsFiles.routes_file(name)).read_text())["resources"]
        hcm["routeConfig"] = {k: v for k, v in route.items() if k != "@type"}
    clusters = yaml.safe_load((xds / CLUSTERS_FILE).read_text())["resources"]
    boot["staticResources"]["clusters"] += [{k: v for k, v in c.items() if k != "@type"} for c in clusters]
    del boot["dynamicResources"]
    return boot


def test_dynamic_files_validate_in_envoy(tmp_path: Path) -> None:
    """The bootstrap validates; the files' resources validate too, inlined (validate mode never reads them)."""
    doc = demo_registry_doc()
    doc["models"][0]["shadow"] = {"version": "v2", "compare_field": "score"}
    config = tmp_path / "registry.yaml"
    config.write_text(yaml.safe_dump(doc))
    xds = tmp_path / "xds"
    result = run_cli("envoy-config", "--config", str(config), "--xds-dir", str(xds))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    for sub in ("boot", "inlined"):
        (tmp_path / sub).mkdir()
    checked = validate_with_envoy((xds / BOOTSTRAP_FILE).read_text(), tmp_path / "boot")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    flat = validate_with_envoy(yaml.safe_dump(inlined(xds)), tmp_path / "inlined")
    assert flat.returncode == 0, flat.stdout + flat.stderr


def test_watch_needs_xds_dir(tmp_path: Path) -> None:
    """`--watch` alone is a usage error, not a silent static print."""
    config = tmp_path / "registry.yaml"
    config.write_text(yaml.safe_dump(demo_registry_doc()))
    result = run_cli("envoy-config", "--config", str(config), "--watch")
    assert result.returncode == 2 and "--xds-dir" in result.stderr


def post(base: str, path: str) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        base + path, data=json.dumps({"customer_id": "c-7"}).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read() or b"null")


def until(check: Callable[[], bool], timeout_s: float = APPLY_TIMEOUT_S) -> None:
    """Until `check()` holds; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not applied in time"
        time.sleep(0.2)


def replace(path: Path, doc: dict[str, Any] | str) -> None:
    """A new registry by rename, as kubelet's symlink swap delivers a ConfigMap edit."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)


@contextlib.contextmanager
def dynamic_stack(tmp_path: Path) -> Iterator[tuple[Stack, dict[str, Any], Path]]:
    """Demo models of the full demo; broker, watcher and Envoy (dynamic mode) on a credit-risk-only registry."""
    full = demo_registry_doc()
    stack = Stack(only(full, "credit-risk"), tmp_path)
    full_config = tmp_path / "full.yaml"
    full_config.write_text(yaml.safe_dump(full))
    xds = tmp_path / "xds"
    stack.config.write_text(yaml.safe_dump(stack.doc, sort_keys=False))
    procs = stack.procs
    try:
        subprocess.run(
            stack.cli("envoy-config", "--config", str(stack.config), "--xds-dir", str(xds)), check=True, timeout=60
        )
        procs["models"] = Proc("models", stack.cli("demo-models", "--config", str(full_config)), tmp_path / "m.log")
        procs["watch"] = Proc(
            "watch",
            stack.cli("envoy-config", "--config", str(stack.config), "--xds-dir", str(xds), "--watch"),
            tmp_path / "watch.log",
        )
        for proc in (procs["models"], procs["watch"]):
            proc.start()
        stack.start_broker()
        procs["envoy"] = Proc(
            "envoy",
            [envoy_binary(), "-c", str(xds / BOOTSTRAP_FILE), "--log-level", "warn", "--disable-hot-restart"],
            tmp_path / "envoy.log",
        ).start()
        for model in full["models"]:
            for version in model["versions"]:
                wait_listening(version["backend"]["service"]["port"])
        wait_ready(stack.base + "/healthz")
        yield stack, full, xds
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


def error_code(reply: tuple[int, dict[str, str], Any]) -> str | None:
    body = reply[2]
    return body.get("error", {}).get("code") if isinstance(body, dict) else None


def apply(stack: Stack, doc: dict[str, Any], check: Callable[[], bool]) -> float:
    """Seconds from the registry edit until `check()` holds through Envoy, on every broker worker
    (six calls in a row); no process restarts: the watcher, Envoy and the broker follow the file."""
    start = time.monotonic()
    replace(stack.config, doc)
    until(lambda: all(check() for _ in range(6)))
    return time.monotonic() - start


def test_models_come_and_go_without_restarting_envoy(tmp_path: Path) -> None:
    """Add fraud, drop credit-risk, through one Envoy process; bad and base edits are refused, routes kept."""
    with dynamic_stack(tmp_path) as (stack, full, xds):
        envoy, broker = stack.procs["envoy"].popen, stack.procs["broker"].popen
        assert post(stack.base, CREDIT)[0] == 200
        status, _, body = post(stack.base, FRAUD)
        assert (status, body["error"]["code"]) == (404, "unknown_route")

        added = apply(stack, only(full, "credit-risk", "fraud"), lambda: post(stack.base, FRAUD)[0] == 200)
        status, headers, body = post(stack.base, FRAUD)
        assert headers["x-broker-version"] == body["version"] == "v1"

        # Envoy's own 404 once its routes have it; the broker may say unknown_model a moment before.
        removed = apply(stack, only(full, "fraud"), lambda: error_code(post(stack.base, CREDIT)) == "unknown_route")

        # Refused: an invalid registry, then a listener port change. Fraud keeps serving.
        routes = (xds / "routes-models.yaml").read_text()
        watch_log = stack.procs["watch"].log
        replace(stack.config, "models: [unclosed")
        until(lambda: "not valid YAML" in watch_log.read_text())
        moved = only(full, "fraud")
        moved["listener"]["port"] += 1
        replace(stack.config, moved)
        until(lambda: "restart the Envoy pods" in watch_log.read_text())
        assert "Envoy keeps the current routes" in watch_log.read_text() and "(listener)" in watch_log.read_text()
        assert (xds / "routes-models.yaml").read_text() == routes
        assert post(stack.base, FRAUD)[0] == 200
        for proc, popen in ((stack.procs["envoy"], envoy), (stack.procs["broker"], broker)):
            assert popen is not None and popen.poll() is None and proc.popen is popen
        print(f"added in {added:.1f} s, removed in {removed:.1f} s")
