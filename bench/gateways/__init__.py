"""The Python gateways the broker is measured against; each does the broker's enrichment in-process."""
