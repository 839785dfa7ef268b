"""Coverage-guided fuzzing (atheris/libFuzzer) of the request-body path the broker runs on every call.

    .venv/bin/pip install -e '.[bench]'
    mkdir -p /tmp/fuzz-corpus
    .venv/bin/python bench/fuzz_body.py -dict=bench/json.dict -max_total_time=120 /tmp/fuzz-corpus

Each input is a content type and a body: half the time the raw bytes, half the time a
JSON object built from them (structure-aware: values of every kind, deep nesting,
huge numbers, lone surrogates, duplicate keys), since byte mutations alone rarely make
JSON that gets past the parser. The body path must answer every one with
an enriched JSON object or a `BrokerError`: any exception, or an enriched body that
is not a JSON object carrying exactly the injected features, is a crash libFuzzer
reports with the input that caused it. Not a test: run by hand, result in the README.
"""

from __future__ import annotations

import collections
import json
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    import orjson

    from extproc.core.body import check_content_type, entity_key, inject_features, parse_json_object
    from extproc.errors import BrokerError, ErrorCode

MAX_DEPTH = 32
FEATURES: dict[str, Any] = {"income": 81500, "debt_ratio": 0.31, "name": "ü\u2028", "big": 2**63}
REFUSALS = {ErrorCode.INVALID_JSON, ErrorCode.INVALID_BODY}
# What the inputs became, printed at every power of two from 2**16 (libFuzzer exits
# without running atexit hooks): a run that never got past the parser proves little.
OUTCOMES: collections.Counter[str] = collections.Counter()


def count(outcome: str) -> None:
    OUTCOMES[outcome] += 1
    total = OUTCOMES.total()
    if total >= 2**16 and total & (total - 1) == 0:
        print(f"outcomes after {total}:", dict(OUTCOMES.most_common()), file=sys.stderr, flush=True)


KEYS = ["customer_id", "features", "amount", "", "ü", "customer_id"]


def scalar(provider: atheris.FuzzedDataProvider) -> Any:
    """Values the stdlib writes and orjson may refuse: 128-bit integers, NaN, lone surrogates."""
    kind = provider.ConsumeIntInRange(0, 4)
    if kind == 0:
        return None if provider.ConsumeBool() else provider.ConsumeBool()
    if kind == 1:
        return provider.ConsumeInt(provider.ConsumeIntInRange(1, 16))
    if kind == 2:
        return provider.ConsumeRegularFloat() if provider.ConsumeBool() else provider.ConsumeFloat()
    return provider.ConsumeUnicode(provider.ConsumeIntInRange(0, 24))


def json_text(provider: atheris.FuzzedDataProvider, depth: int) -> str:
    """JSON text of any kind; objects may repeat keys (which a dict could not hold)."""
    kind = provider.ConsumeIntInRange(0, 3 if depth < 40 else 1)
    if kind <= 1:
        return json.dumps(scalar(provider))
    count = provider.ConsumeIntInRange(0, 4)
    if kind == 2:
        return "[" + ", ".join(json_text(provider, depth + 1) for _ in range(count)) + "]"
    return json_object(provider, depth + 1, count)


def json_object(provider: atheris.FuzzedDataProvider, depth: int, count: int) -> str:
    keys = [KEYS[provider.ConsumeIntInRange(0, len(KEYS) - 1)] for _ in range(count)]
    return "{" + ", ".join(f"{json.dumps(k)}: {json_text(provider, depth)}" for k in keys) + "}"


def body_from(provider: atheris.FuzzedDataProvider) -> bytes:
    if provider.ConsumeBool():
        raw: bytes = provider.ConsumeBytes(provider.remaining_bytes())
        return raw
    text = json_object(provider, 0, provider.ConsumeIntInRange(1, 5))
    return text.encode("utf-8", errors="surrogatepass")


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    content_type = provider.ConsumeUnicodeNoSurrogates(provider.ConsumeIntInRange(0, 64))
    raw = body_from(provider)
    refused = check_content_type(content_type)
    assert refused is None or refused.code == ErrorCode.UNSUPPORTED_MEDIA_TYPE
    doc = parse_json_object(raw, MAX_DEPTH)
    if isinstance(doc, BrokerError):
        assert doc.code in REFUSALS, doc
        count(doc.code.value)
        return
    key = entity_key(doc, "customer_id")
    assert isinstance(key, (str, BrokerError))
    count("forwarded" if isinstance(key, str) else key.code.value)
    enriched = orjson.loads(inject_features(doc, "features", FEATURES))
    assert isinstance(enriched, dict)
    assert enriched["features"] == FEATURES


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
