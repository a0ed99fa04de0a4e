"""The SigV4-checking fake Bedrock of the e2e tests accepts what botocore
signs with the expected credentials and nothing else."""

from __future__ import annotations

import hashlib

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.e2e.sigv4_fake import signature_problem

EXPECTED = Credentials("AKIDEXPECTED", "expected-secret")
BODY = b'{"messages": [{"role": "user", "content": [{"text": "hi"}]}]}'
PATH = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"


def signed(credentials: Credentials, region: str = "us-west-2") -> dict[str, str]:
    request = AWSRequest(
        method="POST",
        url=f"http://127.0.0.1:8000{PATH}",
        data=BODY,
        headers={
            "content-type": "application/json",
            "x-amz-content-sha256": hashlib.sha256(BODY).hexdigest(),
        },
    )
    SigV4Auth(credentials, "bedrock", region).add_auth(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    headers["host"] = "127.0.0.1:8000"
    return headers


def test_the_expected_signature_passes() -> None:
    assert signature_problem("POST", PATH, signed(EXPECTED), BODY, EXPECTED, "us-west-2") is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("other key", "signed with access key AKIDOTHER, not AKIDEXPECTED"),
        ("other secret", "signature mismatch"),
        ("other region", "scope us-east-1/bedrock, not us-west-2/bedrock"),
        ("other body", "x-amz-content-sha256 is not the hash of the body"),
        ("other path", "signature mismatch"),
        ("other host", "signature mismatch"),
        ("unsigned", "no SigV4 authorization"),
    ],
)
def test_anything_else_is_refused(change: str, problem: str) -> None:
    credentials = {
        "other key": Credentials("AKIDOTHER", "expected-secret"),
        "other secret": Credentials("AKIDEXPECTED", "wrong"),
    }.get(change, EXPECTED)
    headers = signed(credentials, "us-east-1" if change == "other region" else "us-west-2")
    body, path = BODY, PATH
    if change == "other body":
        body = BODY + b" "
    if change == "other path":
        path = PATH.replace("converse", "invoke")
    if change == "other host":
        headers["host"] = "127.0.0.1:8001"
    if change == "unsigned":
        del headers["authorization"]
    assert problem in str(signature_problem("POST", path, headers, body, EXPECTED, "us-west-2"))
