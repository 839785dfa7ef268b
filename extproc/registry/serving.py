"""Where the parts listen and how much they accept: listener, admin, broker workers, metrics, control plane, limits."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from extproc.registry.common import TLS, Address, Port, Strict
from extproc.registry.consumers import RateLimit

Milliseconds = Annotated[int, Field(ge=1, le=86_400_000)]


class Http2Limits(Strict):
    """HTTP/2 limits per client connection (Envoy's edge recommendations)."""

    max_concurrent_streams: Annotated[int, Field(ge=1, le=2_147_483_647)] = 100
    initial_stream_window_size: Annotated[int, Field(ge=65_535, le=2_147_483_647)] = 64 * 1024
    initial_connection_window_size: Annotated[int, Field(ge=65_535, le=2_147_483_647)] = 1024 * 1024


class Listener(Address):
    """The public listener and what one client may hold on it."""

    # Declared certificate files switch the public listener to HTTPS only.
    tls: TLS | None = None
    # Open connections on this listener; past it, new ones are closed at once.
    max_connections: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    # A client must have sent all its headers by then (slowloris), else 408 and the connection closes.
    request_headers_timeout_ms: Milliseconds = 10_000
    # The whole request (body included) must have arrived by then.
    request_timeout_ms: Milliseconds = 60_000
    # A stream with no activity either way for this long is reset.
    stream_idle_timeout_ms: Milliseconds = 300_000
    # A connection with no stream for this long is closed.
    idle_timeout_ms: Milliseconds = 300_000
    max_request_headers_kb: Annotated[int, Field(ge=1, le=8192)] = 60
    max_headers_count: Annotated[int, Field(ge=1, le=10_000)] = 100
    # Bytes Envoy buffers per connection, downstream and to each model (flow control beyond).
    buffer_limit_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 32 * 1024
    http2: Http2Limits = Http2Limits()


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
    # The broker's routes (models, audited ones too, ensembles, /healthz, /models) reach it by
    # `http` (ext_proc `http_service`: JSON over HTTP/1.1, far less CPU per request) or `grpc`;
    # `auto`: http where the Envoy in use proves at start that it honours it (`envoy-config`
    # probes it), else grpc with a loud log line. Sticky-by-body routes always use gRPC: their
    # header and body phases must meet in one worker, which one stream guarantees.
    transport: Transport = "auto"
    workers: Annotated[int, Field(ge=1, le=64)] = 2
    # Envoy's per-message deadline for the broker; must cover the feature store budget.
    message_timeout_ms: Annotated[int, Field(ge=10, le=60_000)] = 500
    # Requests one worker works on at once; more are refused (503 overloaded) rather than queued.
    max_in_flight: Annotated[int, Field(ge=1, le=100_000)] = 256
    # ext_proc streams Envoy keeps open to one worker (audited ones last as long as the model call);
    # Envoy's circuit breaker on the ext_proc cluster is this times the workers.
    max_streams: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    # A message no worker answered (its worker was killed mid-message, or refused the
    # connection) goes to another worker: a dead worker costs no request on single-message
    # routes. On `http_service` routes it costs an in-process hop through Envoy (measured:
    # about a quarter more Envoy CPU per request); false saves it, and then those requests
    # fail with 503 broker_unavailable, as does an `http_service` circuit-breaker overflow.
    retry_unanswered: bool = True


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
    # HTTP: `POST /v1/feedback` as Envoy forwards it, authenticated there (opened when a model declares `feedback`).
    feedback_port: Port = 9467
    state_file: str = "rollout-state.json"


class Limits(Strict):
    max_body_bytes: Annotated[int, Field(ge=64, le=64 * 1024 * 1024)] = 1024 * 1024
    # Envoy buffers client body + injected features: its limit is the sum.
    feature_headroom_bytes: Annotated[int, Field(ge=0, le=16 * 1024 * 1024)] = 64 * 1024
    max_json_depth: Annotated[int, Field(ge=2, le=512)] = 32
    # Objects and arrays in one body; past it 400 before any walk over the document.
    max_json_containers: Annotated[int, Field(ge=1, le=10_000_000)] = 1_000
    # Array items and object members (counted by the body's commas, strings included).
    max_json_elements: Annotated[int, Field(ge=1, le=100_000_000)] = 50_000
    # Per source address: 401s it may cause before every request from it gets 429 (consumers declared).
    unauthenticated: RateLimit = RateLimit(requests=10, burst=20)


class Overload(Strict):
    """Envoy's overload manager: past these it refuses (503 overloaded) instead of falling over."""

    # Heap Envoy may use; at 95% it returns free memory to the OS, at 98% it refuses new requests.
    max_heap_bytes: Annotated[int, Field(ge=16 * 1024 * 1024, le=1 << 40)] = 1 << 30
    # Connections on all listeners together; past it new ones are closed at once.
    max_downstream_connections: Annotated[int, Field(ge=1, le=100_000_000)] = 50_000
    # The retry-after of every `overloaded` answer.
    retry_after_seconds: Annotated[int, Field(ge=1, le=3600)] = 1
