"""Versions from a model registry (MLflow): where to follow it, and the backend each version gets.

A model that declares `registry.mlflow` lists no versions of its own: the control plane
resolves `@champion` / `@challenger` and writes the versions file (`resolved`), and the
backend of version N is `backend_template` with `{version}` replaced by N.
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, field_validator, model_validator

from extproc.registry.common import Port, Strict
from extproc.registry.patterns import MLFLOW_ALIAS

ALIAS = MLFLOW_ALIAS


class MlflowSource(Strict):
    """One registered model of an MLflow tracking server, followed through its REST API."""

    tracking_uri: str
    # The registered model's name in MLflow (any name MLflow accepts).
    name: Annotated[str, Field(min_length=1, max_length=256)]
    champion: Annotated[str, Field(pattern=ALIAS)] = "champion"
    challenger: Annotated[str, Field(pattern=ALIAS)] = "challenger"
    # Between two looks at the aliases; bounded so a stuck registry cannot stall a release for long.
    poll_seconds: Annotated[float, Field(ge=0.5, le=300)] = 10.0
    timeout_ms: Annotated[int, Field(ge=100, le=60_000)] = 5_000
    # A version tag listing the features that version needs (comma-separated), beyond the model's.
    features_tag: Annotated[str, Field(min_length=1, max_length=250)] = "model_broker.features"

    @field_validator("tracking_uri")
    @classmethod
    def _http(cls, uri: str) -> str:
        url = urlsplit(uri)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ValueError("tracking_uri must be an http(s) URL of an MLflow tracking server")
        return uri.rstrip("/")

    @model_validator(mode="after")
    def _two_aliases(self) -> MlflowSource:
        for alias in (self.champion, self.challenger):
            if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
                raise ValueError(f"'{alias}' is reserved by MLflow")
        if self.champion == self.challenger:
            raise ValueError("champion and challenger must be different aliases")
        return self


class ModelRegistrySource(Strict):
    mlflow: MlflowSource


class ServiceTemplate(Strict):
    host: Annotated[str, Field(min_length=1)]
    port: Port
    path: str = "/predict"


class SageMakerTemplate(Strict):
    endpoint: Annotated[str, Field(min_length=1)]
    region: str
    target_variant: str | None = None
    endpoint_url: str | None = None
    credentials: tuple[str, ...] = ("environment", "credentials_file")


class BackendTemplate(Strict):
    """A `backend` whose strings may say `{version}` (the registry's version number)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["service"]}, {"required": ["sagemaker"]}]})

    service: ServiceTemplate | None = None
    sagemaker: SageMakerTemplate | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> BackendTemplate:
        if (self.service is None) == (self.sagemaker is None):
            raise ValueError("declare exactly one of 'service' or 'sagemaker'")
        return self
