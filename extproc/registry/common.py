"""Shared registry types: strict models, name patterns, addresses."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# A model or version name becomes part of Envoy cluster and stat names and,
# later, a Kubernetes object name: keep it a DNS label.
DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
FEATURE_NAME = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$"
# What `model-broker hash-key` prints: the algorithm is named so it can change later.
API_KEY_HASH = r"^sha256:[0-9a-f]{64}$"
# In a consumer's allow-list: every model and every ensemble.
ALL_ROUTES = "*"
JSON_KEY = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"

Port = Annotated[int, Field(ge=1, le=65535)]
FeatureName = Annotated[str, Field(pattern=FEATURE_NAME)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a registry must not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Address(Strict):
    address: str = "127.0.0.1"
    port: Port


class TLS(Strict):
    """PEM files for the public listener; relative paths resolve next to the registry."""

    certificate_chain: str
    private_key: str
