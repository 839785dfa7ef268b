"""Transports: how Envoy's ext_proc messages reach the protocol-free processor.

Each front end decodes Envoy's message into the processor's calls (`extproc.core.messages`)
and encodes its answer (`extproc.core.responses`): `grpc_stream` (the gRPC stream loop,
`grpc_answers` its protobufs). `request_info` reads attributes and the consumer the same
way for all. May import the core, never the reverse.
"""

from extproc.transport.grpc_answers import encode as encode_grpc
from extproc.transport.grpc_stream import ExtProcService, Handler, add_service
from extproc.transport.request_info import read_attributes, read_consumer, read_response_attributes

__all__ = [
    "ExtProcService",
    "Handler",
    "add_service",
    "encode_grpc",
    "read_attributes",
    "read_consumer",
    "read_response_attributes",
]
