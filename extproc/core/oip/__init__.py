"""The Open Inference Protocol (KServe V2) on the request path: tensors, infer requests, GET endpoints.

`tensors` (datatypes, shapes, conversion) → `infer` (entity keys from a request, feature
tensors, the forwarded body, OIP errors) → `logic` (derived features and rules, per row)
→ `endpoints` (health, server and model metadata,
readiness, read from the backends through Envoy's egress listener). Pure but for `endpoints`,
which reads through a `BackendReader` the process layer supplies.
"""

from extproc.core.oip.endpoints import (
    BackendReader,
    BackendUnreachable,
    ModelEndpoint,
    answer,
    client_metadata,
    compile_endpoints,
    egress_path,
    server_metadata,
)
from extproc.core.oip.infer import (
    InferRequest,
    OipPlan,
    check_oip_content_type,
    compile_plan,
    error_json,
    feature_tensors,
    forward_body,
    member_body,
    output_element,
    read_infer_request,
)
from extproc.core.oip.logic import OipLogicOutcome, apply_oip_logic, member_view, row_bodies
from extproc.core.oip.tensors import DATATYPES, convert, element_count, flatten, tensor_problem

__all__ = [
    "DATATYPES",
    "BackendReader",
    "BackendUnreachable",
    "InferRequest",
    "ModelEndpoint",
    "OipLogicOutcome",
    "OipPlan",
    "answer",
    "apply_oip_logic",
    "check_oip_content_type",
    "client_metadata",
    "compile_endpoints",
    "compile_plan",
    "convert",
    "egress_path",
    "element_count",
    "error_json",
    "feature_tensors",
    "flatten",
    "forward_body",
    "member_body",
    "member_view",
    "output_element",
    "read_infer_request",
    "row_bodies",
    "server_metadata",
    "tensor_problem",
]
