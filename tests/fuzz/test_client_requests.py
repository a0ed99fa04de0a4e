"""Request headers, paths and bodies through the real Envoy — credentials,
identity headers, model names, stream flags, bodies that are not JSON, 5 MB
bodies — get the provider's answer or a spendgate 4xx in the provider's error
shape, never a 5xx or a reset; after each example spendgate is proven whole
(tests/fuzz/proof.py)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given

from tests.fuzz import client
from tests.fuzz.conftest import PROFILE, explore
from tests.fuzz.proof import FuzzStack
from tests.fuzz.provider import MARK

pytestmark = pytest.mark.e2e
# Envoy's codec answers 431 itself when the headers pass its 60 KB limit,
# before any filter runs: not spendgate's answer, and not a failure.
ENVOY_CODEC = {431}
SPENDGATE_LOCAL = {400, 403, 404, 429}


def error_message(body: bytes) -> str | None:
    """The message of an error body in any provider's shape (see ext_proc/dialects.py)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    error = doc.get("error")
    message = error.get("message") if isinstance(error, dict) else doc.get("message")
    return message if isinstance(message, str) and message.strip() else None


def check_answer(status: int, headers: httpx.Headers, body: bytes) -> str:
    if MARK in headers:
        return f"provider {status}"
    if status in ENVOY_CODEC:
        return f"envoy {status}"
    assert status in SPENDGATE_LOCAL, f"{status} not from the provider: {body[:500]!r}"
    assert error_message(body), (
        f"{status} without an error message in a provider's shape: {body[:500]!r}"
    )
    return f"spendgate {status}"


def send(fuzz: FuzzStack, req: client.Request) -> str:
    try:
        with (
            httpx.Client(base_url=fuzz.base_url, timeout=60) as http,
            http.stream(req.method, req.path, headers=list(req.headers), content=req.body) as r,
        ):
            body = r.read()
    except httpx.TransportError as e:
        raise AssertionError(f"no answer: {type(e).__name__}: {e} for {req!r}") from e
    return check_answer(r.status_code, r.headers, body)


def test_client_requests_get_a_provider_answer_or_a_clean_4xx(fuzz: FuzzStack) -> None:
    @PROFILE
    @given(client.request())
    def run(req: client.Request) -> None:
        outcome = send(fuzz, req)
        fuzz.outcomes[f"{req.shape}: {outcome}"] += 1
        fuzz.prove()

    explore(run, share=0.35)
