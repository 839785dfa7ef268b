"""Live weights, pure: checking a split, merging with the registry, the RTDS layer, the state file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc.core.routing import describe_models
from extproc.errors import BrokerError
from extproc.registry import parse_registry
from extproc.rollout.follow import layer_of
from extproc.rollout.state import RolloutState, StateFileInvalid, load_state, save_state
from extproc.rollout.weights import (
    apply_weights,
    change_weights,
    merge_overrides,
    newly_live,
    parse_assignments,
    runtime_layer,
    weights_of_layer,
)
from extproc.rollout.xds import RUNTIME_TYPE_URL, runtime_response
from tests.test_registry import BASE

REGISTRY = parse_registry(BASE)

CHANGES: list[tuple[str, str, dict[str, Any], dict[str, int] | str]] = [
    ("canary", "credit-risk", {"v1": 95, "v2": 5}, {"v1": 95, "v2": 5}),
    ("one-takes-all", "credit-risk", {"v1": 0, "v2": 1}, {"v1": 0, "v2": 1}),
    ("unknown-model", "fraud", {"v1": 1}, "no model named 'fraud'"),
    ("unknown-version", "credit-risk", {"v1": 1, "v2": 1, "v9": 1}, "has no version v9"),
    ("missing-version", "credit-risk", {"v1": 100}, "missing: v2"),
    ("negative", "credit-risk", {"v1": -1, "v2": 101}, "between 0 and 1000000"),
    ("too-large", "credit-risk", {"v1": 10**7, "v2": 1}, "between 0 and 1000000"),
    ("all-zero", "credit-risk", {"v1": 0, "v2": 0}, "needs a weight above 0"),
    ("fraction", "credit-risk", {"v1": 0.5, "v2": 1}, "whole number"),
    ("boolean", "credit-risk", {"v1": True, "v2": 1}, "whole number"),
    ("string", "credit-risk", {"v1": "90", "v2": 10}, "whole number"),
]


@pytest.mark.parametrize(("case", "model", "proposed", "expected"), CHANGES, ids=[c[0] for c in CHANGES])
def test_change_weights(case: str, model: str, proposed: dict[str, Any], expected: dict[str, int] | str) -> None:
    """A complete, whole, non-negative, not-all-zero split passes; anything else says what is wrong."""
    result = change_weights(REGISTRY, model, proposed)
    if isinstance(expected, str):
        assert isinstance(result, BrokerError), case
        assert expected in result.message
    else:
        assert result == expected


ASSIGNMENTS: list[tuple[list[str], dict[str, int] | str]] = [
    (["v1=90", "v2=10"], {"v1": 90, "v2": 10}),
    (["v1=-3"], {"v1": -3}),  # range is checked against the model, not here
    (["v1"], "not VERSION=WEIGHT"),
    (["=5"], "not VERSION=WEIGHT"),
    (["v1=x"], "whole number"),
    (["v1=1", "v1=2"], "given twice"),
]


@pytest.mark.parametrize(("args", "expected"), ASSIGNMENTS, ids=[" ".join(a[0]) for a in ASSIGNMENTS])
def test_parse_assignments(args: list[str], expected: dict[str, int] | str) -> None:
    """VERSION=WEIGHT arguments parse to a mapping, or to an error naming the bad argument."""
    result = parse_assignments(args)
    if isinstance(expected, str):
        assert isinstance(result, BrokerError) and expected in result.message
    else:
        assert result == expected


def test_stale_override_falls_back_to_the_registry() -> None:
    """An override naming a version the registry no longer has is dropped, with the reason."""
    live, dropped = merge_overrides(REGISTRY, {"credit-risk": {"v1": 1, "v3": 9}})
    assert live == {"credit-risk": {"v1": 80, "v2": 20}}
    assert len(dropped) == 1 and "v3" in dropped[0]


def test_newer_declared_split_beats_an_older_override() -> None:
    """An override made while the registry declared 80/20 gives way once it declares another split;
    while it still declares 80/20 the override holds (old state files, without `declared`, too)."""
    override = {"credit-risk": {"v1": 0, "v2": 100}}
    live, dropped = merge_overrides(REGISTRY, override, {"credit-risk": {"v1": 50, "v2": 50}})
    assert live == {"credit-risk": {"v1": 80, "v2": 20}}
    assert dropped == ["credit-risk: the registry's declared split changed since this live change"]
    for declared_then in ({"credit-risk": {"v1": 80, "v2": 20}}, {}, None):
        assert merge_overrides(REGISTRY, override, declared_then) == (override, [])


def test_live_weights_drive_features_and_models_document() -> None:
    """A version taken to 0 stops needing its features, and `/models` shows the live split."""
    live, _ = merge_overrides(REGISTRY, {"credit-risk": {"v1": 100, "v2": 0}})
    registry = apply_weights(REGISTRY, live)
    assert registry.models[0].required_features == ("income",)
    versions = describe_models(registry)["models"][0]["versions"]
    assert [(v["weight"], v["traffic_percent"]) for v in versions] == [(100, 100.0), (0, 0.0)]


def test_runtime_layer_and_response() -> None:
    """Every version's weight under `<prefix>.<cluster>`, packed as the one RTDS resource."""
    layer = runtime_layer({"credit-risk": {"v1": 90, "v2": 10}})
    assert layer == {"model_broker.weights.credit-risk--v1": 90, "model_broker.weights.credit-risk--v2": 10}
    response = runtime_response(layer, revision=7, nonce="3")
    assert (response.version_info, response.nonce, response.type_url) == ("7", "3", RUNTIME_TYPE_URL)
    assert response.resources[0].type_url == RUNTIME_TYPE_URL


def test_a_broker_reads_back_the_layer_envoy_gets() -> None:
    """What a broker worker takes from an RTDS answer is the split the control plane published;
    a version the layer leaves out keeps its declared weight, as in Envoy."""
    live = {"credit-risk": {"v1": 3, "v2": 97}}
    layer = layer_of(runtime_response(runtime_layer(live), revision=2, nonce="1"))
    assert layer is not None
    assert weights_of_layer(REGISTRY, layer) == live
    assert weights_of_layer(REGISTRY, {"model_broker.weights.credit-risk--v2": 5.0}) == {
        "credit-risk": {"v1": 80, "v2": 5}
    }


def test_newly_live_versions() -> None:
    """Only a version going from 0 to some traffic needs the workers' features first."""
    assert newly_live({"m": {"a": 1, "b": 0}}, {"m": {"a": 1, "b": 5}}) == ["m--b"]
    assert newly_live({"m": {"a": 1, "b": 5}}, {"m": {"a": 0, "b": 5}}) == []


def test_state_round_trip_and_corruption(tmp_path: Path) -> None:
    """The state file round-trips; a missing file is empty state; a corrupt one is refused, not guessed."""
    path = tmp_path / "state.json"
    assert load_state(path) == RolloutState()
    state = RolloutState(3, {"credit-risk": {"v1": 1, "v2": 2}}, {"credit-risk": {"v1": 80, "v2": 20}})
    save_state(path, state)
    assert load_state(path) == state
    path.write_text('{"revision": 2, "weights": {"m": {"v": 1}}}')  # written before `declared` existed
    assert load_state(path) == RolloutState(2, {"m": {"v": 1}})
    bad = ("{", '{"revision": "x", "weights": {}}', '{"revision": 1, "weights": {"m": {"v": "a"}}}', '{"revision": 1}')
    for text in (*bad, '{"revision": 1, "weights": {}, "declared": []}'):
        path.write_text(text)
        with pytest.raises(StateFileInvalid):
            load_state(path)
