"""The bundled demo: a registry, an embedded feature file and demo model services."""
