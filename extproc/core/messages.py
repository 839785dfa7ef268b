"""What Envoy sends in each ext_proc phase, as the processor sees it: no protocol types.

The transports (`extproc.transport`) decode Envoy's gRPC or JSON messages into
these, so the processor is the same code behind both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class HttpHeaders:
    """A header phase: header names lower-case, as Envoy sends them."""

    headers: Mapping[str, str] = field(default_factory=dict)
    end_of_stream: bool = False


@dataclass(frozen=True, slots=True)
class HttpBody:
    """A body phase; buffered, so the whole body at once."""

    body: bytes = b""
    end_of_stream: bool = True
