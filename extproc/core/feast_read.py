"""One read of Feast's Redis online store, planned once per feature list.

A plan turns an entity's join-key values into the HMGETs Feast's own reader
would send (one per feature view), and the replies into a `FeatureRow` with
each view's max age enforced from its `_ts` field. Pure: the adapter sends.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from extproc.core.feast_codec import (
    FeastValueError,
    JoinValue,
    KeyEncoder,
    decode_value,
    event_time,
    feature_field,
    timestamp_field,
)
from extproc.core.features import MISSING, STALE, FeatureRow

log = logging.getLogger("model_broker.features")

# Feast's entity key as the broker carries it: (join key, value) for every join key a route needs.
FeastKey = tuple[tuple[str, JoinValue], ...]
Reply = Sequence[bytes | None]


@dataclass(frozen=True, slots=True)
class FeastView:
    """A feature view as the reader needs it: its entities' join keys and its max age."""

    name: str
    # (join key, Feast value type: string, int64, int32, bytes) of each of its entities.
    join_keys: tuple[tuple[str, str], ...]
    # Feast's `ttl`: a row older than this is stale; 0 means no max age.
    ttl_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class _ViewRead:
    view: FeastView
    refs: tuple[str, ...]
    # The refs' murmur3 fields, then the view's `_ts` field.
    fields: tuple[bytes, ...]
    # The view's join keys, their names encoded once (only the values change per entity).
    key: KeyEncoder


class ReadPlan:
    """The HMGETs for one list of feature references (`view:feature`)."""

    def __init__(self, project: str, views: Mapping[str, FeastView], refs: tuple[str, ...]) -> None:
        self._project = project.encode()
        by_view: dict[str, list[str]] = {}
        for ref in refs:
            view, sep, feature = ref.partition(":")
            if not sep or view not in views or not feature:
                raise ValueError(f"{ref!r} is not a reference to a declared feature view ('view:feature')")
            by_view.setdefault(view, []).append(ref)
        self.reads = tuple(
            _ViewRead(
                views[view],
                tuple(names),
                (*(feature_field(view, r.partition(":")[2]) for r in names), timestamp_field(view)),
                KeyEncoder(views[view].join_keys),
            )
            for view, names in by_view.items()
        )

    def commands(self, key: FeastKey) -> list[tuple[bytes, tuple[bytes, ...]]]:
        """(Redis key, fields) per view, in `reads` order: Feast's serialized entity key, then the project."""
        values = dict(key)
        return [(read.key.encode(values) + self._project, read.fields) for read in self.reads]

    def row(self, replies: Sequence[Reply], now: float) -> FeatureRow | None:
        """One entity's replies (one per view) as a row; None when no view has anything for it.

        A field that is absent is missing; an empty value is Feast's null (present, None);
        every feature of a view whose `_ts` is older than its TTL is stale. The row is
        fresh until the first of its views that is not stale yet reaches its TTL.
        """
        values: dict[str, object] = {}
        absent: dict[str, str] = {}
        known = False
        fresh_until = math.inf
        for read, reply in zip(self.reads, replies, strict=True):
            ts = reply[-1]  # after the refs' fields
            known = known or any(raw is not None for raw in reply)
            ttl = read.view.ttl_seconds
            stale = False
            if ts is not None and ttl > 0:
                expires = _event_time(ts, read.view.name) + ttl
                stale = now > expires
                if not stale:
                    fresh_until = min(fresh_until, expires)
            for ref, raw in zip(read.refs, reply, strict=False):  # the last field, `_ts`, has no ref
                values[ref] = None
                if raw is None:
                    absent[ref] = MISSING
                elif stale:
                    absent[ref] = STALE
                else:
                    try:
                        values[ref] = decode_value(raw)
                    except FeastValueError as exc:
                        # Written by something other than Feast: no value the model can use.
                        log.warning("feature %s: unreadable value (%s); counted as missing", ref, exc)
                        absent[ref] = MISSING
        return FeatureRow(values, absent, fresh_until) if known else None


def _event_time(raw: bytes, view: str) -> float:
    try:
        return event_time(raw)
    except FeastValueError as exc:
        log.warning("feature view %s: unreadable event time (%s); its values count as stale", view, exc)
        return float("-inf")
