"""Shadow versions through a real Envoy: mirrored enriched requests, answers recorded, never returned."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from extproc.process.launcher import free_port
from extproc.registry import RegistryInvalid, parse_registry
from extproc.rollout.control_plane import shadow_path
from extproc.rollout.shadow import Answer, ShadowPairs, compare_answers
from tests.aws import wait_listed
from tests.conftest import Stack, demo_registry_doc, run_stack
from tests.http import call

AGREE = "/v1/models/credit-risk/predict"
DISAGREE = "/v1/models/credit-risk-disagree/predict"


def shadow_registry() -> dict[str, Any]:
    """credit-risk: all traffic on v1, shadow v3 (v1's logic: agrees); the twin shadows v2 (weighs late payments)."""
    doc = demo_registry_doc()
    agree = doc["models"][0]
    agree["versions"][0]["weight"], agree["versions"][1]["weight"] = 100, 0
    disagree = json.loads(json.dumps(agree))
    agree["versions"].append(
        {
            "name": "v3",
            "weight": 0,
            "backend": {"service": {"host": "127.0.0.1", "port": free_port(), "path": "/predict"}},
        }
    )
    agree["shadow"] = {"version": "v3", "compare_field": "score"}
    disagree.update(name="credit-risk-disagree", path=DISAGREE, shadow={"version": "v2", "compare_field": "score"})
    for version in disagree["versions"]:
        version["backend"]["service"]["port"] = free_port()
    doc["models"].append(disagree)
    return doc


@pytest.fixture(scope="module")
def shadow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_stack(shadow_registry(), tmp_path_factory.mktemp("shadow")) as stack:
        yield stack


def records(stack: Stack, model: str) -> list[dict[str, Any]]:
    path = shadow_path(str(stack.workdir / "rollout-state.json"))
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["model"] == model]


async def wait_records(stack: Stack, model: str, count: int) -> list[dict[str, Any]]:
    """The control plane writes a record once both halves arrived; poll the file for up to 10 s."""
    for _ in range(50):
        found = records(stack, model)
        if len(found) >= count:
            break
        await asyncio.sleep(0.2)
    return found


async def test_shadow_sees_the_enriched_request_and_the_client_never_sees_it(
    shadow_stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Clients get only v1's answers; each request's shadow answer is recorded with the same features."""
    replies = [await call(session, shadow_stack.base + AGREE, {"customer_id": f"c-{i + 1}"}) for i in range(30)]
    assert {(r.status, r.headers["x-broker-version"], r.body["version"]) for r in replies} == {(200, "v1", "v1")}
    found = await wait_records(shadow_stack, "credit-risk", 30)
    assert len(found) == 30
    assert {r["request_id"] for r in found} == {r.headers["x-request-id"] for r in replies}
    for record in found:
        assert (record["primary_version"], record["shadow_version"]) == ("v1", "v3")
        assert record["shadow"]["version"] == "v3"
        assert record["shadow"]["features"] == record["primary"]["features"]
        assert record["match"] is True and record["abs_diff"] == 0
    # Each comparison is in the audit trail too, linked to its execution by the client's request id.
    ids = {r.headers["x-request-id"] for r in replies}
    config = str(shadow_stack.config)
    trail = await wait_listed(
        config, "credit-risk", lambda ss: ids <= {s["parent_request_id"] for s in ss if s["kind"] == "shadow"}
    )
    shadows = [s for s in trail if s["kind"] == "shadow" and s["parent_request_id"] in ids]
    assert sorted(s["parent_request_id"] for s in shadows) == sorted(ids)
    assert {s["version"] for s in shadows} == {"v1"}


async def test_agreement_metrics_move_when_the_shadow_disagrees(
    shadow_stack: Stack, session: aiohttp.ClientSession
) -> None:
    """A shadow that weighs late payments disagrees on customers who have them: mismatches and a mean |diff| > 0."""
    for i in range(40):
        reply = await call(session, shadow_stack.base + DISAGREE, {"customer_id": f"c-{i + 1}"})
        assert reply.status == 200 and reply.body["version"] == "v1"
    found = await wait_records(shadow_stack, "credit-risk-disagree", 40)
    late = [r for r in found if r["primary"]["features"]["late_payments_12m"] > 0]
    assert late and all(not r["match"] and r["abs_diff"] > 0 for r in late)
    async with session.get(f"http://127.0.0.1:{shadow_stack.doc['metrics']['port']}/metrics") as resp:
        text = await resp.text()

    def sample(name: str, labels: str) -> float:
        found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    shadow = 'model="credit-risk-disagree",shadow="v2"'
    assert sample(
        "model_broker_shadow_comparisons_total", 'model="credit-risk-disagree",result="mismatch",shadow="v2"'
    ) == len(late)
    assert sample("model_broker_shadow_abs_difference_sum", shadow) > 0
    assert sample("model_broker_shadow_comparisons_total", 'model="credit-risk",result="mismatch",shadow="v3"') == 0


COMPARES = [
    ("equal", b'{"score": 0.5}', b'{"score": 0.5}', (True, 0.0)),
    ("different", b'{"score": 0.5}', b'{"score": 0.25}', (False, 0.25)),
    ("missing", b'{"score": 0.5}', b"{}", (False, None)),
    ("not-json", b"oops", b'{"score": 1}', (False, None)),
    ("strings", b'{"score": "high"}', b'{"score": "high"}', (True, None)),
]


@pytest.mark.parametrize(("case", "primary", "shadow", "expected"), COMPARES, ids=[c[0] for c in COMPARES])
def test_compare_answers(case: str, primary: bytes, shadow: bytes, expected: tuple[bool, float | None]) -> None:
    """Exact match of the declared field, and |difference| only when both are numbers."""
    assert compare_answers("score", primary, shadow)[:2] == expected


def test_pairs_match_by_request_and_forget_orphans() -> None:
    """Halves pair in either order; a half whose twin never comes is dropped after the TTL."""
    pairs = ShadowPairs(ttl_s=5)
    assert pairs.add("m", "r1", True, Answer("v3", b"s"), now=0) is None
    assert pairs.add("m", "r1", False, Answer("v1", b"p"), now=1) == (Answer("v1", b"p"), Answer("v3", b"s"))
    assert pairs.add("m", "r2", False, Answer("v1", b"p"), now=2) is None
    assert pairs.add("m", "r3", False, Answer("v1", b"p"), now=10) is None  # r2 expires here
    assert pairs.add("m", "r2", True, Answer("v3", b"s"), now=11) is None


def test_shadow_registry_rules() -> None:
    """The shadow must be a declared version; its extra features are fetched even at weight 0."""
    doc = shadow_registry()
    disagree = parse_registry(doc).model("credit-risk-disagree")
    assert disagree is not None and "late_payments_12m" in disagree.required_features
    doc["models"][0]["shadow"]["version"] = "v9"
    with pytest.raises(RegistryInvalid, match="'v9' is not a version of credit-risk"):
        parse_registry(doc)
