"""Which entity a body row names, as the store looks it up and as errors name it.

The own layout keys a hash by one join key's value in a template; Feast keys by
typed join-key values (several for a composite key). Pure: values or `BrokerError`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extproc.core.body import entity_key
from extproc.core.features import EntityKey
from extproc.errors import BrokerError, ErrorCode

_INT_RANGES = {"int64": range(-(2**63), 2**63), "int32": range(-(2**31), 2**31)}


@dataclass(frozen=True, slots=True)
class EntityRef:
    """One entity: what the store looks it up by, and how the client and the audit name it."""

    key: EntityKey
    # The join key's value ("c-42"); `customer_id=1, merchant_id=m-7` for a composite key.
    label: str


@dataclass(frozen=True, slots=True)
class KeyPlan:
    """How a route finds its entity in a body row, compiled from the registry."""

    # (join key, Feast value type) per join key; the own layout has exactly one.
    join_keys: tuple[tuple[str, str], ...]
    # Feast: typed values; own layout: `prefix + value + suffix`.
    feast: bool = False
    prefix: str = ""
    suffix: str = ""

    @property
    def join_key(self) -> str:
        """The first join key: the one the audit record names the entity by."""
        return self.join_keys[0][0]

    def ref(self, row: dict[str, Any]) -> EntityRef | BrokerError:
        if not self.feast:
            text = entity_key(row, self.join_key)
            return text if isinstance(text, BrokerError) else EntityRef(self.prefix + text + self.suffix, text)
        pairs = []
        for name, kind in self.join_keys:
            value = typed_join_value(row, name, kind)
            if isinstance(value, BrokerError):
                return value
            pairs.append((name, value))
        label = str(pairs[0][1]) if len(pairs) == 1 else ", ".join(f"{k}={v}" for k, v in pairs)
        return EntityRef(tuple(pairs), label)

    def ref_of_text(self, text: str) -> EntityRef | BrokerError:
        """The entity of a key that arrived as text rather than in a JSON row (OIP requests)."""
        return _text_ref(self, text)


def _text_ref(plan: KeyPlan, text: str) -> EntityRef | BrokerError:
    """An entity key that arrived as text (an OIP tensor, parameter or header), typed as its join key is."""
    name, kind = plan.join_keys[0]
    if len(plan.join_keys) != 1:
        return BrokerError(ErrorCode.INVALID_ENTITY_KEY, "this model's features need several join keys in the body")
    if not plan.feast:
        return EntityRef(plan.prefix + text + plan.suffix, text)
    value: str | int = text
    if kind != "string":
        try:
            value = int(text)
        except ValueError:
            return BrokerError(ErrorCode.INVALID_ENTITY_KEY, f"'{name}' must be an integer ({kind})")
    checked = typed_join_value({name: value}, name, kind)
    return checked if isinstance(checked, BrokerError) else EntityRef(((name, checked),), text)


def union_of(plans: Sequence[KeyPlan]) -> KeyPlan:
    """One plan for several routes of one entity (an ensemble): Feast's join keys merged in order."""
    first = plans[0]
    if not first.feast:
        return first  # the own layout: the registry guarantees one entity, so one template
    return KeyPlan(tuple(dict.fromkeys(jk for plan in plans for jk in plan.join_keys)), feast=True)


def typed_join_value(row: dict[str, Any], name: str, kind: str) -> str | int | BrokerError:
    """A join key's value as Feast serializes it: strings for `string`, integers in range for `int64`/`int32`."""
    if name not in row:
        return BrokerError(ErrorCode.MISSING_ENTITY_KEY, f"the request body has no '{name}' field")
    value = row[name]
    if kind == "string":
        if isinstance(value, str) and value and len(value) <= 256 and value.isprintable():
            return value
        return BrokerError(
            ErrorCode.INVALID_ENTITY_KEY, f"'{name}' must be a non-empty string of at most 256 printable characters"
        )
    if isinstance(value, int) and not isinstance(value, bool) and value in _INT_RANGES[kind]:
        return value
    return BrokerError(ErrorCode.INVALID_ENTITY_KEY, f"'{name}' must be an integer ({kind})")
