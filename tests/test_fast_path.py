"""The fence around the fast path: the pinned Envoy must honour ext_proc `http_service` with a body.

`test_the_pinned_envoy_honours_the_fast_path` is the test that fails the day a new
Envoy closes the door (envoyproxy/envoy#35488): then `auto` falls back to gRPC, loudly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.envoy.common import HTTP_EXT_PROC_FILTER
from extproc.process.fast_path import FastPathClosed, Verdict, probe, settle_transport
from extproc.registry import parse_registry
from tests.conftest import demo_registry_doc
from tests.test_cli import run_cli, write


def test_the_pinned_envoy_honours_the_fast_path() -> None:
    """The pinned Envoy sends the buffered body over http_service and applies the broker's answer."""
    verdict = probe()
    assert verdict.open, verdict.reason


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    """The public listener's HTTP connection manager."""
    filters = config["staticResources"]["listeners"][0]["filterChains"][0]["filters"]
    found: dict[str, Any] = next(
        f["typedConfig"] for f in filters if f["name"] == "envoy.filters.network.http_connection_manager"
    )
    return found


def _without_override(config: dict[str, Any]) -> None:
    """An Envoy that ignores the per-route override behaves as if the override were not there."""
    for route in _hcm(config)["routeConfig"]["virtualHosts"][0]["routes"]:
        route.get("typedPerFilterConfig", {}).pop(HTTP_EXT_PROC_FILTER, None)


def test_an_envoy_that_ignores_the_override_is_a_closed_door() -> None:
    """If Envoy stops sending the body on the overridden route, the probe says so (the model got nothing)."""
    verdict = probe(adjust=_without_override)
    assert not verdict.open
    assert "the model did not get the enriched body" in verdict.reason


def _without_carrying_the_draft(config: dict[str, Any]) -> None:
    """An Envoy that stops forwarding the broker's own metadata to the response phase."""
    for f in _hcm(config)["httpFilters"]:
        if f["name"] == HTTP_EXT_PROC_FILTER:
            f["typedConfig"]["metadataOptions"].pop("forwardingNamespaces", None)


def test_an_envoy_that_loses_the_audit_draft_is_a_closed_door() -> None:
    """Audited routes use http_service only while Envoy carries the request phase's draft to the response phase."""
    verdict = probe(adjust=_without_carrying_the_draft)
    assert not verdict.open
    assert "the audit record did not get its request phase's draft" in verdict.reason
    assert "'input': None" in verdict.reason  # the record was written, from the response phase alone


def test_an_envoy_that_does_not_run_is_a_closed_door() -> None:
    """A binary that exits at once (refused config, wrong binary) is a closed door, not a hang."""
    verdict = probe("/bin/false")
    assert not verdict.open
    assert "Envoy did not start" in verdict.reason


def _closed() -> Verdict:
    return Verdict(False, "closed for the test")


def _never() -> Verdict:
    raise AssertionError("transport: grpc must not probe")


@pytest.mark.parametrize(
    ("declared", "verdict", "settled"),
    [("auto", lambda: Verdict(True, "open"), "http"), ("auto", _closed, "grpc"), ("grpc", _never, "grpc")],
    ids=["auto-open", "auto-closed", "grpc-never-probes"],
)
def test_transport_settles_on_what_envoy_honours(declared: str, verdict: Any, settled: str) -> None:
    """`auto` is http where proven and gRPC otherwise; `grpc` never asks."""
    registry = parse_registry(demo_registry_doc(broker={"transport": declared}))
    assert settle_transport(registry, verdict) == settled


def test_auto_falls_back_loudly(caplog: pytest.LogCaptureFixture) -> None:
    """A closed door under `auto` is logged as an error that names the fallback and the fix."""
    registry = parse_registry(demo_registry_doc(broker={"transport": "auto"}))
    with caplog.at_level(logging.ERROR):
        settle_transport(registry, _closed)
    assert "FAST PATH UNAVAILABLE" in caplog.text and "closed for the test" in caplog.text


def test_http_refuses_to_start_when_closed() -> None:
    """`transport: http` on an Envoy that does not honour it is an error, not a silent downgrade."""
    registry = parse_registry(demo_registry_doc(broker={"transport": "http"}))
    with pytest.raises(FastPathClosed, match="closed for the test"):
        settle_transport(registry, _closed)


def _filters(config: dict[str, Any]) -> list[str]:
    return [f["name"] for f in _hcm(config)["httpFilters"]]


def test_envoy_config_falls_back_to_grpc_for_an_envoy_that_closed_the_door(tmp_path: Path) -> None:
    """`envoy-config --envoy` on a closed door: auto prints a gRPC-only config and the loud line; http exits 2."""
    doc = demo_registry_doc()
    auto = run_cli("envoy-config", "--config", write(tmp_path, doc), "--envoy", "/bin/false")
    assert auto.returncode == 0, auto.stderr
    assert "FAST PATH UNAVAILABLE" in auto.stderr
    assert HTTP_EXT_PROC_FILTER not in _filters(yaml.safe_load(auto.stdout))
    doc["broker"]["transport"] = "http"
    strict = run_cli("envoy-config", "--config", write(tmp_path, doc), "--envoy", "/bin/false")
    assert strict.returncode == 2 and "does not honour it" in strict.stderr
    proven = run_cli("envoy-config", "--config", write(tmp_path, demo_registry_doc()))
    assert proven.returncode == 0 and HTTP_EXT_PROC_FILTER in _filters(yaml.safe_load(proven.stdout))
