"""Model Broker: ML models behind Envoy, requests enriched by an ext_proc server."""

__version__ = "0.1.0"
