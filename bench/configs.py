"""Config files for the bench: the broker registry (with its audit and ensemble variants), the plain-Envoy
bootstrap and the header-phase variant.

The plain Envoy is built from the same `extproc.envoy` pieces as the
broker's (same routes, same clusters, same local replies) minus ext_proc, the
buffer and the RBAC gate, so the difference between them is the broker's cost.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as Mutation
from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import HeaderMutation, Mutations
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage

from bench import workload
from extproc.envoy import (
    EXT_PROC_FILTER,
    Placement,
    bootstrap_dict,
    local_reply_config,
    route_configuration,
    version_cluster,
)
from extproc.process.fast_path import settled
from extproc.registry import Registry


def registry_doc(
    *,
    listener: int,
    admin: int,
    metrics: int,
    control_plane: int,
    control_plane_admin: int,
    broker: int,
    broker_http: int,
    workers: int,
    backend: int,
    redis_url: str,
    cache_ttl_s: float,
    transport: str = "auto",
) -> dict[str, Any]:
    """The bench registry: one model, one version on the shared backend, features from Redis.

    `transport`: how Envoy reaches the broker on this single-message route (`broker.transport`).
    """
    return {
        "registry_version": "bench",
        "listener": {"address": "127.0.0.1", "port": listener},
        "admin": {"address": "127.0.0.1", "port": admin},
        # Several brokers run at once: none may keep the default metrics port.
        "metrics": {"address": "127.0.0.1", "port": metrics},
        # Likewise the rollout control plane (RTDS and its admin API); its state file lands beside the registry.
        "control_plane": {"port": control_plane, "admin_port": control_plane_admin},
        "broker": {
            "address": "127.0.0.1",
            "port": broker,
            "http_port": broker_http,
            "workers": workers,
            "message_timeout_ms": 500,
            "transport": transport,
        },
        "feature_store": {
            "redis": {"url": redis_url},
            "timeout_ms": workload.STORE_TIMEOUT_MS,
            "cache": {"ttl_seconds": cache_ttl_s, "max_entries": 10_000},
        },
        "entities": [
            {"name": "customer", "join_key": workload.JOIN_KEY, "store_key": workload.store_key("{customer_id}")}
        ],
        "models": [
            {
                "name": workload.MODEL,
                "path": workload.MODEL_PATH,
                "entity": "customer",
                "features": list(workload.FEATURES),
                "inject_as": workload.INJECT_AS,
                "versions": [
                    {
                        "name": "v1",
                        "weight": 100,
                        "backend": {"service": {"host": "127.0.0.1", "port": backend, "path": workload.BACKEND_PATH}},
                    }
                ],
            }
        ],
        "limits": {"max_body_bytes": 65536, "feature_headroom_bytes": 16384},
    }


def audit_section(spool_dir: Path, sink: dict[str, Any]) -> dict[str, Any]:
    """The registry's `audit` section: every model audited, spooled under `spool_dir`, shipped to `sink`.

    Defaults (1 GiB spool, 4 MiB segments, fsync every second, fail closed)
    except sealing and shipping, which run more often so a run's records are
    shipped soon after it and the next run starts with an empty spool.
    """
    return {"spool": {"dir": str(spool_dir), "seal_after_ms": 500}, "sink": sink, "ship_interval_ms": 250}


def aws_sink(*, endpoint_url: str, bucket: str, table: str) -> dict[str, Any]:
    return {"aws": {"bucket": bucket, "table": table, "prefix": "audit", "endpoint_url": endpoint_url}}


def local_sink(directory: Path) -> dict[str, Any]:
    return {"local": {"dir": str(directory)}}


def add_ensemble(doc: dict[str, Any], *, members: int, egress: int) -> None:
    """`members` copies of the bench model (same backend, same features) and one ensemble over all of them.

    The first member is the model itself; the copies differ only in name and
    path. Timeouts are the demo's (2 s per member, 3 s overall), aggregation
    is `all` (every member's answer, nothing combined).
    """
    base = doc["models"][0]
    copies = [f"{base['name']}-{n}" for n in range(2, members + 1)]
    doc["models"] += [{**copy.deepcopy(base), "name": name, "path": f"/v1/models/{name}/predict"} for name in copies]
    doc["egress"] = {"address": "127.0.0.1", "port": egress}
    doc["ensembles"] = [
        {
            "name": workload.ENSEMBLE,
            "path": workload.ENSEMBLE_PATH,
            "members": [{"model": name, "timeout_ms": 2000} for name in [base["name"], *copies]],
            "deadline_ms": 3000,
        }
    ]


def _socket(port: int) -> Address:
    return Address(socket_address=SocketAddress(address="127.0.0.1", port_value=port))


def plain_envoy_bootstrap(registry: Registry, listener: int, admin: int) -> Bootstrap:
    """Envoy → backend with the broker's route table and clusters but no ext_proc, buffer or RBAC.

    The routes still carry the broker's per-route filter configs; Envoy parses
    and ignores config for filters that are not in the chain.
    """
    hcm = HttpConnectionManager(
        stat_prefix="plain",
        route_config=route_configuration(registry),
        http_filters=[HttpFilter(name="envoy.filters.http.router", typed_config=AnyMessage.pack(Router()))],
        local_reply_config=local_reply_config(registry),
        use_remote_address=True,
    )
    return Bootstrap(
        admin=Admin(address=_socket(admin)),
        static_resources=BootstrapStaticResources(
            listeners=[
                Listener(
                    name="plain",
                    address=_socket(listener),
                    filter_chains=[
                        FilterChain(
                            filters=[
                                Filter(
                                    name="envoy.filters.network.http_connection_manager",
                                    typed_config=AnyMessage.pack(hcm),
                                )
                            ]
                        )
                    ],
                )
            ],
            clusters=[version_cluster(m, v) for m in registry.models for v in m.versions],
        ),
    )


def plain_envoy_yaml(registry: Registry, listener: int, admin: int) -> str:
    return yaml.safe_dump(plain_envoy_bootstrap(registry, listener, admin).to_dict(), sort_keys=False)


def broker_envoy_yaml(
    registry: Registry, workers: int, *, header_phase: bool = False, socket_dir: str | None = None
) -> str:
    """The generated bootstrap; `header_phase` also sends request headers (two messages per request).

    That variant exists only to price the header phase against the default
    one-message mode: the same config with one processing-mode field flipped,
    plus the client's `content-length` dropped before ext_proc. The broker does
    not rewrite `content-length` on header-phase routes yet, so Envoy would
    forward the enriched body under the client's length; without the header
    the buffer filter sets the right one.
    """
    doc = bootstrap_dict(settled(registry), workers, Placement(broker_socket_dir=socket_dir))
    if header_phase:
        filters = _http_filters(doc)
        ext_proc = next(f for f in filters if f["name"] == EXT_PROC_FILTER)
        ext_proc["typedConfig"]["processingMode"]["requestHeaderMode"] = "SEND"
        filters.insert(filters.index(ext_proc), _drop_content_length())
    return yaml.safe_dump(doc, sort_keys=False)


def _drop_content_length() -> dict[str, Any]:
    mutation = HeaderMutation(mutations=Mutations(request_mutations=[Mutation(remove="content-length")]))
    http_filter = HttpFilter(name="envoy.filters.http.header_mutation", typed_config=AnyMessage.pack(mutation))
    as_dict: dict[str, Any] = http_filter.to_dict()
    return as_dict


def _http_filters(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The HTTP filter list of the (single) public listener in a generated bootstrap dict."""
    for listener in doc["staticResources"]["listeners"]:
        for chain in listener["filterChains"]:
            for network_filter in chain["filters"]:
                filters: list[dict[str, Any]] | None = network_filter["typedConfig"].get("httpFilters")
                if filters is not None:
                    return filters
    raise LookupError("no HTTP filter chain in the generated bootstrap")


def without_retry_hop(doc: dict[str, Any]) -> None:
    """`broker.retry_unanswered: false`: Envoy posts each message straight to a worker, no retry hop."""
    doc["broker"]["retry_unanswered"] = False


def add_rules(doc: dict[str, Any]) -> None:
    """The model with 3 derived features and 3 rules (issue 19), as `bench.rules_cost` prices them in-process.

    A rules-only v2 (weight 0) on the same backend; for the workload's bodies the first two
    rules never hold and the third holds for amounts over 2500 (about half the requests),
    which then take the pinned route: all three conditions are evaluated on the rest.
    """
    model = doc["models"][0]
    model["versions"].append({**model["versions"][0], "name": "v2", "weight": 0})
    model["derived"] = [
        {"name": "debt_score", "expr": "features.debt_ratio * features.tenure_months"},
        {"name": "amount_over_income", "expr": "body.amount / features.income"},
        {"name": "risky", "expr": "features.late_payments_12m > 2.0 && features.debt_ratio > 0.5", "type": "bool"},
    ]
    model["rules"] = [
        {"name": "germany", "when": "has(body.country) && body.country == 'DE'", "version": "v2"},
        {"name": "late", "when": "features.late_payments_12m >= 5.0 && features.debt_ratio > 0.95", "version": "v2"},
        {"name": "large", "when": "body.amount > 2500.0", "version": "v2"},
    ]
