"""The only modules that import network clients: redis, boto3, kubernetes, aiohttp (egress).

Third-party exceptions are translated into the broker's own here and nowhere else.
Each adapter is imported by name where it is wired (`extproc.process`, the CLI), not
re-exported here: their client libraries are heavy and some are optional extras
(`kubernetes_asyncio` comes with `.[k8s]` only).
"""

__all__: list[str] = []
