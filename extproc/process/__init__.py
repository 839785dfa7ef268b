"""The process layer: a worker, the supervisor of N workers and the control plane, and `up`/`demo`.

The only place that wires adapters, transports and the core together.
"""

from extproc.process.launcher import (
    DEMO_DIR,
    DEMO_WORKDIR,
    READY_TIMEOUT_S,
    demo,
    demo_registry,
    demo_registry_doc,
    envoy_binary,
    free_port,
    free_port_run,
    listener_scheme,
    running,
    up,
    wait_listening,
    wait_ready,
)
from extproc.process.supervisor import (
    MAX_QUICK_DEATHS,
    QUICK_DEATH_SECONDS,
    local_control_plane,
    supervise,
    worker_ports,
)
from extproc.process.worker import (
    DRAIN_SECONDS,
    FIRST_WEIGHTS_SECONDS,
    SHIP_ON_STOP_SECONDS,
    LiveRegistry,
    audited_entities,
    open_audit,
    open_audit_store,
    open_feature_store,
    run_worker,
    serve_worker,
)

__all__ = [
    "DEMO_DIR",
    "DEMO_WORKDIR",
    "DRAIN_SECONDS",
    "FIRST_WEIGHTS_SECONDS",
    "MAX_QUICK_DEATHS",
    "QUICK_DEATH_SECONDS",
    "READY_TIMEOUT_S",
    "SHIP_ON_STOP_SECONDS",
    "LiveRegistry",
    "audited_entities",
    "demo",
    "demo_registry",
    "demo_registry_doc",
    "envoy_binary",
    "free_port",
    "free_port_run",
    "listener_scheme",
    "local_control_plane",
    "open_audit",
    "open_audit_store",
    "open_feature_store",
    "run_worker",
    "running",
    "serve_worker",
    "supervise",
    "up",
    "wait_listening",
    "wait_ready",
    "worker_ports",
]
