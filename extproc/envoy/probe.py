"""The fast-path probe's Envoy config: one audited model route, built by the generator's own functions.

`extproc.process.fast_path` runs it against the Envoy in use before a config relies
on ext_proc's `http_service` with a buffered body (see `ext_proc`): if this config
works, the generated one does, because the listener, filters, per-route override and
clusters are the same code. The model is audited, so the probe also proves the response
phase over `http_service` and the audit draft Envoy carries to it (`audit.carried`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.core.v3 import Node

from extproc.envoy.bootstrap import internal_listeners
from extproc.envoy.clusters import ext_proc_cluster, ext_proc_http_cluster, model_clusters
from extproc.envoy.common import _socket
from extproc.envoy.listeners import public_listener
from extproc.envoy.retry_hop import retry_cluster, retry_listener
from extproc.registry import Registry, parse_registry

# The probe's model, entity and the one feature its store holds.
PROBE_MODEL = "fast-path-probe"
PROBE_PATH = "/probe"
PROBE_KEY = "probe:1"
PROBE_FEATURES = {"probed": True}
PROBE_STORE = "features.json"


@dataclass(frozen=True, slots=True)
class ProbePorts:
    listener: int
    admin: int
    broker_grpc: int
    broker_http: int
    model: int


def probe_registry(ports: ProbePorts, workdir: str) -> Registry:
    """A registry of one audited model on `transport: http`, its store, spool and sink in `workdir`."""
    loopback = "127.0.0.1"
    return parse_registry(
        {
            "audit": {
                "spool": {"dir": f"{workdir}/spool", "min_free_bytes": 0},
                "sink": {"local": {"dir": f"{workdir}/records"}},
            },
            "listener": {"address": loopback, "port": ports.listener},
            "admin": {"address": loopback, "port": ports.admin},
            "broker": {
                "address": loopback,
                "port": ports.broker_grpc,
                "http_port": ports.broker_http,
                "workers": 1,
                "transport": "http",
            },
            "feature_store": {"embedded": {"path": f"{workdir}/{PROBE_STORE}"}},
            "entities": [{"name": "probe", "join_key": "id", "store_key": "probe:{id}"}],
            "models": [
                {
                    "name": PROBE_MODEL,
                    "path": PROBE_PATH,
                    "entity": "probe",
                    "features": list(PROBE_FEATURES),
                    "versions": [
                        {
                            "name": "v1",
                            "weight": 100,
                            "backend": {"service": {"host": loopback, "port": ports.model, "path": "/"}},
                        }
                    ],
                }
            ],
        }
    )


def probe_bootstrap(registry: Registry) -> dict[str, Any]:
    """The public listener with its model route, the broker's clusters and the model's; nothing else."""
    clusters = [ext_proc_cluster(registry, 1), ext_proc_http_cluster(registry, 1), *model_clusters(registry)]
    listeners = [public_listener(registry)]
    hop = registry.broker.retry_unanswered
    if hop:
        clusters.append(retry_cluster())
        listeners.append(retry_listener())
    doc: dict[str, Any] = Bootstrap(
        node=Node(id="model-broker-fast-path-probe", cluster="model-broker"),
        admin=Admin(address=_socket(registry.admin.address, registry.admin.port)),
        static_resources=BootstrapStaticResources(listeners=listeners, clusters=clusters),
        bootstrap_extensions=[internal_listeners()] if hop else [],
    ).to_dict()
    return doc
