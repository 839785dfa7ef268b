"""The bundled demo: a registry, an embedded feature file and demo model services."""

from extproc.demo.models import credit_score, fraud_score, model_app, start_models

__all__ = ["credit_score", "fraud_score", "model_app", "start_models"]
