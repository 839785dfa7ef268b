"""Feast's `feast.types.Value` protobuf: Value.proto vendored unchanged, the rest generated.

Regenerate with scripts/gen-feast-proto.
"""

from extproc.core.feast_proto.Value_pb2 import Value

__all__ = ["Value"]
