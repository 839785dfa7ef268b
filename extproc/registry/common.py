"""Shared registry types: strict models, name patterns (defined in `patterns`), addresses."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from extproc.registry.patterns import FEATURE_NAME

# In a consumer's allow-list: every model and every ensemble.
ALL_ROUTES = "*"

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
