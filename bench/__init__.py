"""Side-by-side benchmark of the broker (not a test): `python -m bench.run`.

Plain Envoy, Envoy + broker and two Python gateways doing the same enrichment,
all on loopback in one run, so the broker's cost is read against its neighbours.
"""
