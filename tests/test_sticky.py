"""Sticky A/B through two real Envoys: the broker sets the header Envoy hashes, from the body."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from extproc.core.body import sticky_key
from extproc.envoy import route_configuration
from extproc.envoy.ext_proc import body_only, on_transport
from extproc.registry import RegistryInvalid, parse_registry
from tests.conftest import Stack, demo_registry_doc, run_stack
from tests.http import JSON_HEADERS, call
from tests.test_rollout import Envoy, second_envoy

PATH = "/v1/models/credit-risk/predict"
KEYS = [f"user-{i}" for i in range(200)]


@pytest.fixture(scope="module")
def sticky_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Envoy]]:
    """The demo model split 50/50, sticky on the body field `user_id`, behind two Envoys."""
    doc = demo_registry_doc()
    model = doc["models"][0]
    model["sticky"] = {"body_field": "user_id"}
    model["versions"][0]["weight"] = 50
    model["versions"][1]["weight"] = 50
    with run_stack(doc, tmp_path_factory.mktemp("sticky")) as stack:
        yield stack, second_envoy(stack)


async def version_of(
    session: aiohttp.ClientSession, base: str, key: str, n: int, headers: dict[str, str] | None = None
) -> str:
    reply = await call(session, base + PATH, {"user_id": key, "customer_id": f"c-{n % 100 + 1}"}, headers=headers)
    assert reply.status == 200, reply.raw
    assert reply.body["features"], reply.body  # the body mutation survived the reroute
    return str(reply.headers["x-broker-version"])


async def test_same_key_same_version_across_replicas(
    sticky_fleet: tuple[Stack, Envoy], session: aiohttp.ClientSession
) -> None:
    """200 keys x 5 requests over two Envoys: each key always on one version; overall near 50/50."""
    stack, envoy2 = sticky_fleet
    limit = asyncio.Semaphore(16)

    async def one(i: int) -> tuple[str, str]:
        key = KEYS[i % len(KEYS)]
        async with limit:
            return key, await version_of(session, (stack.base, envoy2.base)[i % 2], key, i)

    seen: dict[str, set[str]] = collections.defaultdict(set)
    for key, version in await asyncio.gather(*(one(i) for i in range(len(KEYS) * 5))):
        seen[key].add(version)
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
    split = collections.Counter(next(iter(v)) for v in seen.values())
    assert 35 <= 100 * split["v1"] / len(KEYS) <= 65, split


async def test_client_sticky_header_is_overwritten(
    sticky_fleet: tuple[Stack, Envoy], session: aiohttp.ClientSession
) -> None:
    """A client-sent sticky header changes nothing: each key keeps the version its body field maps to."""
    stack, _ = sticky_fleet
    keys = KEYS[:40]
    honest = [await version_of(session, stack.base, key, i) for i, key in enumerate(keys)]
    assert len(set(honest)) == 2  # else the comparison below proves nothing
    spoof = {**JSON_HEADERS, "x-broker-sticky-key": "always-the-same"}
    spoofed = [await version_of(session, stack.base, key, i, headers=spoof) for i, key in enumerate(keys)]
    assert spoofed == honest


STICKY_KEYS: list[tuple[str, dict[str, Any], str]] = [
    ("string", {"user_id": "u-1"}, "u-1"),
    ("integer", {"user_id": 42}, "42"),
    ("missing", {}, ""),
    ("null", {"user_id": None}, ""),
    ("boolean", {"user_id": True}, ""),
    ("object", {"user_id": {"a": 1}}, ""),
    ("long", {"user_id": "x" * 300}, "x" * 256),
]


@pytest.mark.parametrize(("case", "doc", "expected"), STICKY_KEYS, ids=[s[0] for s in STICKY_KEYS])
def test_sticky_key_from_body(case: str, doc: dict[str, Any], expected: str) -> None:
    """Scalars become the key; anything else is the empty key (requests still flow, just unsticky together)."""
    assert sticky_key(doc, "user_id") == expected


def test_header_sticky_needs_no_broker_phase() -> None:
    """`sticky.header`: Envoy hashes the client's header itself, and the route keeps one ext_proc message."""
    doc = demo_registry_doc()
    doc["models"][0]["sticky"] = {"header": "x-user-id"}
    doc["models"][0]["audit"] = False  # an audited route has a response phase of its own
    route = next(r for r in route_configuration(parse_registry(doc)).virtual_hosts[0].routes if r.name == "credit-risk")
    assert route.route.weighted_clusters.use_hash_policy
    assert [p.header.header_name for p in route.route.hash_policy] == ["x-user-id"]
    # The hot path's one message (on http_service where the transport allows), nothing more.
    hot_path = on_transport(body_only(), http=True)
    assert set(route.typed_per_filter_config) == {"envoy.filters.http.rbac", *hot_path}
    assert {k: route.typed_per_filter_config[k] for k in hot_path} == hot_path


@pytest.mark.parametrize(
    ("sticky", "problem"),
    [
        ({}, "exactly one"),
        ({"body_field": "a", "header": "b"}, "exactly one"),
        ({"header": "x-broker-sticky-key"}, "reserved"),
    ],
    ids=["neither", "both", "reserved-header"],
)
def test_sticky_declaration_rules(sticky: dict[str, str], problem: str) -> None:
    """A sticky declaration names exactly one source, never the broker's own header."""
    doc = demo_registry_doc()
    doc["models"][0]["sticky"] = sticky
    with pytest.raises(RegistryInvalid, match=problem):
        parse_registry(doc)
