"""Refusals before any work: bounded in-flight work per worker, and a full audit trail (fail-closed).

Past the in-flight limit a request is refused at once, not queued. A queued request waits out
Envoy's message timeout and fails anyway, after holding memory and delaying the ones ahead of it;
a refusal costs microseconds and tells the client when to come back (503 `overloaded`, `retry-after`).
"""

from __future__ import annotations

from extproc.errors import BrokerError, ErrorCode

OVERLOADED = BrokerError(
    ErrorCode.OVERLOADED, "the broker is at capacity; retry after the number of seconds in retry-after"
)

# Refusal when the audit spool is full and the policy is fail-closed.
AUDIT_FULL = BrokerError(ErrorCode.AUDIT_UNAVAILABLE, "the audit trail cannot record this request; try again shortly")


class Admission:
    """Counts the requests one worker is working on; one event loop, so no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0

    def admit(self) -> bool:
        """Take a slot, or False (the caller refuses the request) when all are taken."""
        if self.busy >= self.limit:
            return False
        self.busy += 1
        return True

    def release(self) -> None:
        self.busy -= 1
