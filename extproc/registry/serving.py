"""Where the parts listen and how much they accept: listener, admin, broker workers, metrics, control plane, limits."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from extproc.registry.common import TLS, Address, Port, Strict


class Listener(Address):
    # Declared certificate files switch the public listener to HTTPS only.
    tls: TLS | None = None


class Admin(Address):
    # Serve the broker's admin endpoints (GET /models) on the public listener.
    # Default: yes in open mode (no consumers), no once consumers are declared.
    public_endpoints: bool | None = None


# How Envoy reaches the broker on single-message routes; see `Broker.transport`.
Transport = Literal["auto", "grpc", "http"]


class Broker(Strict):
    """Where the ext_proc workers listen: one gRPC port per worker, `port`, `port+1`, …, and
    (unless `transport: grpc`) one HTTP port per worker for Envoy's `http_service`, `http_port`, …"""

    address: str = "127.0.0.1"
    port: Port = 50051
    http_port: Port = 50151
    # Routes that send the broker one message per request (plain models, ensembles, /healthz,
    # /models) reach it by `http` (ext_proc `http_service`: JSON over HTTP/1.1, far less CPU
    # per request) or `grpc`; `auto`: http where the Envoy in use proves at start that it
    # honours it (`envoy-config` probes it), else grpc with a loud log line. Routes with
    # several phases per request (audited, sticky by body) always use gRPC: one stream keeps
    # their state together.
    transport: Transport = "auto"
    workers: Annotated[int, Field(ge=1, le=64)] = 2
    # Envoy's per-message deadline for the broker; must cover the feature store budget.
    message_timeout_ms: Annotated[int, Field(ge=10, le=60_000)] = 500


class Metrics(Strict):
    """Where the supervisor serves Prometheus metrics for all workers (`/metrics`)."""

    address: str = "127.0.0.1"
    port: Port = 9464


class ControlPlane(Strict):
    """The rollout control plane: live weights for every Envoy (RTDS) and the admin API.

    `state_file` holds the live weights so they survive broker and Envoy restarts;
    a relative path resolves next to the registry.
    """

    address: str = "127.0.0.1"
    # gRPC: the runtime discovery service every Envoy subscribes to.
    port: Port = 18000
    # HTTP admin API (`weights set`), bearer-token authenticated.
    admin_port: Port = 9466
    state_file: str = "rollout-state.json"


class Limits(Strict):
    max_body_bytes: Annotated[int, Field(ge=64, le=64 * 1024 * 1024)] = 1024 * 1024
    # Envoy buffers client body + injected features: its limit is the sum.
    feature_headroom_bytes: Annotated[int, Field(ge=0, le=16 * 1024 * 1024)] = 64 * 1024
    max_json_depth: Annotated[int, Field(ge=2, le=512)] = 32
