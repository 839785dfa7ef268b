"""The whole registry document: every section, and lookups the rest of the broker uses."""

from __future__ import annotations

from extproc import wire
from extproc.registry.audit import Audit
from extproc.registry.common import Address, Strict
from extproc.registry.consumers import Consumer
from extproc.registry.ensembles import Ensemble
from extproc.registry.features import Entity, FeatureStore
from extproc.registry.models import Model
from extproc.registry.serving import Admin, Broker, ControlPlane, Limits, Listener, Metrics, Overload


class Registry(Strict):
    registry_version: str = "0"
    listener: Listener = Listener(port=8080)
    admin: Admin = Admin(port=9901)
    broker: Broker = Broker()
    metrics: Metrics = Metrics()
    control_plane: ControlPlane = ControlPlane()
    feature_store: FeatureStore
    entities: tuple[Entity, ...] = ()
    models: tuple[Model, ...] = ()
    ensembles: tuple[Ensemble, ...] = ()
    # Envoy's loopback listener the broker calls ensemble members and OIP backends' metadata and
    # readiness through; generated only with ensembles or open_inference models.
    egress: Address = Address(port=8081)
    limits: Limits = Limits()
    overload: Overload = Overload()
    audit: Audit | None = None
    # None declared: open mode, anyone who reaches the listener may call any model.
    consumers: tuple[Consumer, ...] = ()

    @property
    def admin_endpoints_public(self) -> bool:
        """Whether GET /models is served on the public listener (see `Admin.public_endpoints`)."""
        if self.admin.public_endpoints is None:
            return not self.consumers
        return self.admin.public_endpoints

    @property
    def needs_egress(self) -> bool:
        """Whether the broker calls through Envoy's egress listener (ensembles, OIP metadata and readiness)."""
        return bool(self.ensembles) or any(m.protocol == "open_inference" for m in self.models)

    def route_names(self) -> tuple[tuple[str, str], ...]:
        """(name in an allow-list, route name Envoy reports) for every model and ensemble."""
        return (
            *((m.name, m.name) for m in self.models),
            *((e.name, wire.ensemble_route(e.name)) for e in self.ensembles),
        )

    def model(self, name: str) -> Model | None:
        return next((m for m in self.models if m.name == name), None)

    def entity(self, name: str) -> Entity | None:
        return next((e for e in self.entities if e.name == name), None)

    def ensemble(self, name: str) -> Ensemble | None:
        return next((e for e in self.ensembles if e.name == name), None)

    @property
    def takes_feedback(self) -> bool:
        """Whether `POST /v1/feedback` is served: some model declares ground truth."""
        return any(m.feedback is not None for m in self.models)

    def audited(self, model: Model) -> bool:
        """Whether `model`'s executions are audited (its own flag, else `audit.enabled`)."""
        if self.audit is None:
            return False
        return self.audit.enabled if model.audit is None else model.audit
