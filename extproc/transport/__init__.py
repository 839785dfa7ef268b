"""Transports: how Envoy's ext_proc messages reach the protocol-free processor.

Each front end decodes Envoy's message into the processor's calls (`extproc.core.messages`)
and encodes its answer (`extproc.core.responses`): `grpc_stream` (the gRPC stream loop,
`grpc_answers` its protobufs) and `http_service` (Envoy's `http_service`: one JSON POST per
message over HTTP/1.1, `http_messages` its JSON). `request_info` reads attributes and the
consumer the same way for both. `unanswered` takes Envoy's access-log stream of audited
requests whose `http_service` response phase never came. May import the core, never the reverse.
"""

from extproc.transport.grpc_answers import encode as encode_grpc
from extproc.transport.grpc_stream import ExtProcService, Handler, add_service
from extproc.transport.http_messages import decode as decode_json
from extproc.transport.http_messages import encode as encode_json
from extproc.transport.http_service import HttpService
from extproc.transport.request_info import read_attributes, read_consumer, read_response_attributes
from extproc.transport.unanswered import add_unanswered_service

__all__ = [
    "ExtProcService",
    "Handler",
    "HttpService",
    "add_service",
    "add_unanswered_service",
    "decode_json",
    "encode_grpc",
    "encode_json",
    "read_attributes",
    "read_consumer",
    "read_response_attributes",
]
