"""Transports: how Envoy's ext_proc messages reach the protocol-free processor.

`grpc_stream` is the gRPC stream loop (receive, dispatch, send). May import the core, never the reverse.
"""

from extproc.transport.grpc_stream import (
    ExtProcService,
    Handler,
    add_service,
    read_attributes,
    read_consumer,
    read_response_attributes,
)

__all__ = [
    "ExtProcService",
    "Handler",
    "add_service",
    "read_attributes",
    "read_consumer",
    "read_response_attributes",
]
