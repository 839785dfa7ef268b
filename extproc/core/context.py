"""Per-request lifecycle state: who the request is and how long each stage took.

Protocol state (which ext_proc message comes next) stays in the transport (`extproc/transport/`); the two
are kept apart so neither grows into the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter, time

from extproc.audit.record import AuditDraft


@dataclass(slots=True)
class RequestContext:
    request_id: str = ""
    route_name: str = ""
    content_type: str = ""
    # From the response attributes (audited routes only): the status Envoy is
    # sending and the version whose host answered (None when no model did).
    response_status: int | None = None
    version: str | None = None
    # The execution being audited, from its request phase to its record.
    audit: AuditDraft | None = None
    started_at: float = field(default_factory=time)
    # The consumer Envoy verified (API key or JWT); empty in open mode. For audit and metrics.
    consumer: str = ""
    stages: list[tuple[str, float]] = field(default_factory=list)
    # An Open Inference Protocol route: errors take OIP's shape.
    oip: bool = False
    # Request headers a route asked for as attributes (an OIP entity key in a header), by name.
    headers: dict[str, str] = field(default_factory=dict)
    # Set by the processor once Envoy will send nothing more on this stream (an
    # immediate response, or the answer to the last phase the route asks for).
    finished: bool = False
    _mark: float = field(default_factory=perf_counter)

    def lap(self, stage: str) -> None:
        """Close the current stage under `stage` and start the next one."""
        now = perf_counter()
        self.stages.append((stage, now - self._mark))
        self._mark = now

    def resume(self, stages: list[tuple[str, float]], since_s: float) -> None:
        """Continue a request whose earlier stages another call timed: the next lap counts from `since_s` ago."""
        self.stages = stages
        self._mark = perf_counter() - max(0.0, since_s)

    def server_timing(self) -> str:
        """The stages as a `Server-Timing` header value, durations in milliseconds."""
        return ", ".join(f"broker-{name};dur={seconds * 1000:.3f}" for name, seconds in self.stages)
