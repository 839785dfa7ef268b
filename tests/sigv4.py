"""Check a request Envoy signed, with botocore's own SigV4 signer.

Envoy signs every header it sends except a few (it includes `user-agent`), while
botocore leaves `user-agent` out; so the check signs exactly the headers the
request's `SignedHeaders` names, and compares signatures.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, ?"
    r"SignedHeaders=([^,]+), ?Signature=([0-9a-f]{64})$"
)


class _SignedHeadersOnly(SigV4Auth):
    def __init__(self, credentials: Credentials, service: str, region: str, signed: list[str]) -> None:
        super().__init__(credentials, service, region)
        self._signed = signed

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        headers = HTTPHeaders()
        for name in self._signed:
            headers[name] = request.headers[name]
        return headers


def sigv4_problem(
    method: str, url: str, headers: Mapping[str, str], body: bytes, access_key: str, secret_key: str
) -> str | None:
    """None when the request carries a valid SigV4 signature for these credentials, else what is wrong."""
    lower = {k.lower(): v for k, v in headers.items()}
    found = AUTH.match(lower.get("authorization", ""))
    if found is None:
        return f"no SigV4 authorization header: {lower.get('authorization')!r}"
    key, _date, region, service, signed, signature = found.groups()
    if key != access_key:
        return f"signed with access key {key}"
    if lower.get("x-amz-content-sha256") != hashlib.sha256(body).hexdigest():
        return "x-amz-content-sha256 does not match the body"
    names = signed.split(";")
    missing = [n for n in names if n not in lower]
    if missing:
        return f"signed headers not sent: {missing}"
    request = AWSRequest(method=method, url=url, data=body, headers={n: lower[n] for n in names})
    request.context["timestamp"] = lower["x-amz-date"]
    auth = _SignedHeadersOnly(Credentials(access_key, secret_key), service, region, names)
    expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    return None if hmac.compare_digest(expected, signature) else "signature mismatch"
