"""The admin API's client: `model-broker weights` (finding the local broker when no URL is given) and the reconciler."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from extproc.errors import BrokerError
from extproc.rollout import discovery
from extproc.rollout.weights import parse_assignments

TIMEOUT_S = 15.0


class AdminUnreachable(Exception):
    """No admin API to talk to: none announced, several, or the URL did not answer."""


def resolve_admin(url: str | None) -> discovery.AdminEndpoint:
    """`--admin URL`, else the one control plane running on this machine.

    The token is the one that control plane announced here for its URL; for an admin
    API this machine did not start (a port-forward to Kubernetes) it is `$MODEL_BROKER_ADMIN_TOKEN`.
    """
    if url is not None:
        announced = discovery.announced_for(url)
        if announced is not None:
            return discovery.AdminEndpoint(url.rstrip("/"), announced.token, announced.pid, announced.registry)
        return discovery.AdminEndpoint(url.rstrip("/"), os.environ.get(discovery.TOKEN_ENV, ""), 0, "")
    found = discovery.running_endpoints()
    if not found:
        raise AdminUnreachable(
            f"no running broker found in {discovery.runtime_dir()}; "
            "start one with `model-broker up` or pass --admin URL"
        )
    if len(found) > 1:
        listing = "\n".join(f"  --admin {e.url}   ({e.registry})" for e in found)
        raise AdminUnreachable(f"several brokers are running; pick one:\n{listing}")
    return found[0]


def request(endpoint: discovery.AdminEndpoint, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One admin call: (status, JSON body). Admin errors come back as their JSON, not as exceptions."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(endpoint.url + path, data=data, method=method)
    req.add_header("authorization", f"Bearer {endpoint.token}")
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": {"code": "http_error", "message": str(exc)}}
    except OSError as exc:
        raise AdminUnreachable(f"{endpoint.url} did not answer: {exc}") from None


def _print_error(status: int, doc: Any) -> int:
    error = doc.get("error", {}) if isinstance(doc, dict) else {}
    print(f"error ({status} {error.get('code', '?')}): {error.get('message', doc)}", file=sys.stderr)
    if status == 401:
        print(
            f"the admin token: a broker started on this machine announces it in {discovery.runtime_dir()} "
            f"(found by URL); for any other, set ${discovery.TOKEN_ENV}",
            file=sys.stderr,
        )
    return 2 if status in (400, 404) else 1


def set_weights(admin: str | None, model: str, assignments: list[str]) -> int:
    """Exit 0 when every connected Envoy and broker worker took the new split, 2 on bad input, 1 otherwise."""
    weights = parse_assignments(assignments)
    if isinstance(weights, BrokerError):
        print(f"error ({weights.code.value}): {weights.message}", file=sys.stderr)
        return 2
    try:
        status, doc = request(resolve_admin(admin), "PUT", f"/weights/{model}", {"weights": weights})
    except AdminUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        return _print_error(status, doc)
    split = " ".join(f"{v}={w}" for v, w in doc["weights"].items())
    envoys, brokers = f"{doc['envoys_acked']}/{doc['envoys']}", f"{doc['brokers_acked']}/{doc['brokers']}"
    print(f"{model}: {split} (revision {doc['revision']}, applied on {envoys} Envoys and {brokers} broker workers)")
    return 0 if doc["envoys_acked"] == doc["envoys"] and doc["brokers_acked"] == doc["brokers"] else 1


def show_weights(admin: str | None) -> int:
    try:
        status, doc = request(resolve_admin(admin), "GET", "/weights")
    except AdminUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        return _print_error(status, doc)
    print(json.dumps(doc, indent=2, sort_keys=True))
    return 0


class AdminApi:
    """The admin API for the reconciler (`reconciler.WeightSetter`): a split in, None or why not out."""

    def __init__(self, endpoint: discovery.AdminEndpoint) -> None:
        self._endpoint = endpoint

    async def set_weights(self, model: str, weights: Mapping[str, int]) -> str | None:
        try:
            status, doc = await asyncio.to_thread(
                request, self._endpoint, "PUT", f"/weights/{model}", {"weights": dict(weights)}
            )
        except AdminUnreachable as exc:
            return str(exc)
        if status != 200:
            error = doc.get("error", {}) if isinstance(doc, dict) else {}
            return f"{status} {error.get('code', '?')}: {error.get('message', doc)}"
        return None  # persisted: an Envoy or broker that missed the push gets it when it reconnects
