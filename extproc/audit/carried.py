"""An audit draft carried by Envoy between the two `http_service` calls of an audited request.

Over `http_service` each message is its own HTTP call and may reach another worker, so no
stream holds the draft between the request and the response phase. The request phase hands
it to Envoy as dynamic metadata (one string: JSON keeps the input's numbers exact, where a
protobuf `Struct` would turn every integer into a double) and Envoy forwards that namespace
with the response phase, which writes the record wherever it lands.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import orjson

from extproc.audit.record import AuditDraft

_FIELDS = tuple(f.name for f in dataclasses.fields(AuditDraft) if f.name != "written")


@dataclasses.dataclass(frozen=True, slots=True)
class Carried:
    """What the response phase needs of its request phase: the draft, its stages, when it answered."""

    draft: AuditDraft
    stages: list[tuple[str, float]]
    answered_at: float


def pack(draft: AuditDraft, stages: Sequence[tuple[str, float]], answered_at: float) -> str:
    doc: dict[str, Any] = {name: getattr(draft, name) for name in _FIELDS}
    doc["stages"] = stages
    doc["answered_at"] = answered_at
    return orjson.dumps(doc).decode()


def unpack(text: object) -> Carried | str:
    """The carried draft, or why the metadata is not one (a mangled value is the broker's bug, said as such)."""
    try:
        doc = orjson.loads(text) if isinstance(text, str) else None
        if not isinstance(doc, dict):
            return "the audit draft in Envoy's metadata is not a JSON object"
        stages = [(str(name), float(seconds)) for name, seconds in doc.pop("stages")]
        answered_at = float(doc.pop("answered_at"))
        return Carried(AuditDraft(**doc), stages, answered_at)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return f"the audit draft in Envoy's metadata does not read: {exc!r}"
