"""A fake Bedrock that checks SigV4 as AWS does: a request whose signature was
not made with the credentials it expects (access key, secret, region, service
"bedrock") over exactly what arrived gets 403, the rest is answered by the
fake provider. The expected signature is computed with botocore's signer."""

from __future__ import annotations

import hashlib
import re
import threading
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from spendgate.demo.fake_provider import FakeProviderServer, _Handler

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$"
)


class _ExactHeaders(SigV4Auth):
    """botocore's signer, signing exactly the headers the request names."""

    def __init__(self, credentials: Credentials, region: str, names: list[str]) -> None:
        super().__init__(credentials, "bedrock", region)
        self._names = names

    def headers_to_sign(self, request: AWSRequest) -> Any:
        from botocore.awsrequest import HTTPHeaders

        out = HTTPHeaders()
        for name in self._names:
            out[name] = request.headers[name]
        return out


def signature_problem(
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    expected: Credentials,
    region: str,
) -> str | None:
    """Why the request's SigV4 signature is not the one ``expected`` makes, or None."""
    headers = {k.lower(): v for k, v in headers.items()}
    m = _AUTH.match(headers.get("authorization", ""))
    if not m:
        return f"no SigV4 authorization: {headers.get('authorization', '')[:80]!r}"
    key, day, scope_region, service, signed, signature = m.groups()
    if key != expected.access_key:
        return f"signed with access key {key}, not {expected.access_key}"
    if (scope_region, service) != (region, "bedrock"):
        return f"scope {scope_region}/{service}, not {region}/bedrock"
    date = headers.get("x-amz-date", "")
    if not date.startswith(day):
        return "x-amz-date does not match the credential scope"
    if headers.get("x-amz-content-sha256") != hashlib.sha256(body).hexdigest():
        return "x-amz-content-sha256 is not the hash of the body"
    names = signed.split(";")
    if "host" not in names or any(n not in headers for n in names):
        return f"signed headers {signed} are not all present (host must be)"
    request = AWSRequest(
        method=method,
        url=f"http://{headers['host']}{path}",
        data=body,
        headers={n: headers[n] for n in names},
    )
    request.context["timestamp"] = date
    signer = _ExactHeaders(expected, region, names)
    string_to_sign = signer.string_to_sign(request, signer.canonical_request(request))
    if signer.signature(string_to_sign, request) != signature:
        return "signature mismatch"
    return None


class _SigV4Handler(_Handler):
    server: SigV4FakeBedrock

    def do_POST(self) -> None:
        raw = self._read_body()
        problem = signature_problem(
            self.command,
            self.path,
            dict(self.headers),
            raw,
            self.server.credentials,
            self.server.region,
        )
        with self.server.lock:
            self.server.checked.append(problem)
        if problem:
            self._send_json(403, {"message": f"The request signature is invalid: {problem}"})
            return
        self._read_body = lambda: raw  # type: ignore[method-assign]
        super().do_POST()


class SigV4FakeBedrock(FakeProviderServer):
    """checked: None for each request whose signature was right, else why not."""

    def __init__(self, credentials: Credentials, region: str) -> None:
        super().__init__()
        self.RequestHandlerClass = _SigV4Handler
        self.credentials = credentials
        self.region = region
        self.lock = threading.Lock()
        self.checked: list[str | None] = []
