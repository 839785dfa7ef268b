"""`check` says what a valid name, path or URL looks like, in words with an example, never as a regex."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.registry import Registry, RegistryInvalid, describe, parse_registry
from extproc.registry.patterns import known


def patterns_in(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from patterns_in(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from patterns_in(item)


def test_every_pattern_of_the_schema_has_words() -> None:
    """A field constrained by a pattern without words would make `check` print a raw regex."""
    used = set(patterns_in(Registry.model_json_schema()))
    assert used, "the schema has patterns"
    assert used <= known(), sorted(used - known())


@pytest.mark.parametrize("pattern", sorted(known()))
def test_each_example_is_valid(pattern: str) -> None:
    """The example given for a pattern matches it (a wrong example would mislead more than a regex)."""
    words = describe(pattern)
    assert words is not None
    example = words.rsplit(", e.g. ", 1)[1]
    assert re.search(pattern, example), (pattern, example)


BAD = {
    "feature_store": {"redis": {"url": "http://x"}},
    "entities": [{"name": "Customer", "join_key": "customer id"}],
    "models": [
        {
            "name": "Credit_Risk",
            "path": "/v1 predict",
            "entity": "Customer",
            "features": ["9bad"],
            "sticky": {"header": "X_User"},
            "versions": [{"name": "v1", "weight": 1, "backend": {"service": {"host": "h", "port": 1, "path": "p"}}}],
        }
    ],
    "consumers": [{"name": "app", "api_keys": ["abc"], "models": ["*"]}],
    "audit": {
        "spool": {"dir": "s"},
        "sink": {"aws": {"bucket": "B", "table": "t", "region": "Europe", "prefix": "a b"}},
        "redact": ["a..b"],
    },
}


def test_check_says_pattern_violations_in_words() -> None:
    """Every pattern violation names the field, says what is valid with an example, and quotes what was given."""
    with pytest.raises(RegistryInvalid) as caught:
        parse_registry(BAD)
    messages = [str(p) for p in caught.value.problems]
    assert len(messages) == 14, messages
    for message in messages:
        assert "should be " in message and ", e.g. " in message and "; got " in message, message
        assert not re.search(r"\^|\$|\\[dw]|\{\d+,\d+\}|\[[A-Za-z0-9]-", message), message
    assert "models[0].sticky.header: should be a lowercase HTTP header name" in "\n".join(messages)
