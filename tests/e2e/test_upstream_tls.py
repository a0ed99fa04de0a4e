"""Envoy verifies the provider's certificate, through the real Envoy: fake
providers behind TLS with certificates from a CA made at run time.

- openai     → the fake (certificate for localhost), the test CA trusted: served and metered.
- anthropic  → the same fake, the system bundle trusted (it lacks the test
               CA): a 503 in Anthropic's error shape, no request decrypted.
- azure      → a fake whose certificate names another host, the test CA
               trusted: a 503 in OpenAI's shape, no request decrypted.
- bedrock, gemini → the fake for another host: a 503 in AWS's, Google's shape.
- /ip/       → a compatible upstream by IP address, the first fake (its IP SAN
               is checked): served.
- /wild/     → a compatible upstream api.wild.spendgate.test, a fake with a
               certificate for *.wild.spendgate.test: served.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anthropic
import boto3
import httpx
import openai
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from spendgate import envoy_config, upstream_tls
from spendgate.providers import Compatible, Providers
from spendgate.upstreams import Upstream
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack, start_stack, stop_stack
from tests.e2e.budgets import create_policy, spent
from tests.e2e.tls_fake import OTHER_HOST, WILDCARD_DOMAIN, TlsFakeProvider, fakes_of
from tests.harness import tempdir, wait_until

pytestmark = pytest.mark.e2e
WILD_HOST = f"api.{WILDCARD_DOMAIN}"
KEY = "sk-secret-never-leaves-envoy"
MODEL = "gpt-4o-mini"
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


@dataclass
class Tls:
    stack: Stack
    good: TlsFakeProvider  # certificate for localhost and 127.0.0.1
    wrong_host: TlsFakeProvider  # certificate for elsewhere.spendgate.test only
    wildcard: TlsFakeProvider  # certificate for *.wild.spendgate.test


def _trust(config: dict[str, Any], cluster: str, ca_file: str) -> None:
    for name, typed in upstream_tls.tls_contexts(config):
        if name == cluster:
            typed["common_tls_context"]["validation_context"]["trusted_ca"] = {"filename": ca_file}


def _send(config: dict[str, Any], cluster: str, host: str, port: int, ca_file: str) -> None:
    envoy_config.adapt(config, upstreams={cluster: Upstream(cluster, True, host, port)})
    _trust(config, cluster, ca_file)


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    with fakes_of(tempdir()) as fakes:
        ca, good, wrong_host = str(fakes.ca), fakes.good, fakes.wrong_host
        system = upstream_tls.resolve_ca_file("")
        # Compatible upstreams as providers: writes them: one by IP address,
        # one by a host name that resolves nowhere, so its cluster is pointed
        # at the fake's address with the TLS context (SNI, SAN check) kept.
        by_ip = Compatible("ip", "/ip/", Upstream("compatible-ip", True, "127.0.0.1", good.port))
        wild = Compatible(
            "wild", "/wild/", Upstream("compatible-wild", True, WILD_HOST, fakes.wildcard.port)
        )

        def edit(config: dict[str, Any]) -> None:
            _send(config, "openai", "localhost", good.port, ca)
            _send(config, "anthropic", "localhost", good.port, system)
            _send(config, "azure_openai", "localhost", wrong_host.port, ca)
            _send(config, "gemini", "localhost", wrong_host.port, ca)
            _send(config, "bedrock", "localhost", wrong_host.port, ca)
            envoy_config.apply_providers(config, Providers(compatible=(by_ip, wild)))
            _trust(config, by_ip.cluster, ca)
            _trust(config, wild.cluster, ca)
            (cluster,) = [
                c for c in config["static_resources"]["clusters"] if c["name"] == wild.cluster
            ]
            cluster["type"] = "STATIC"
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            endpoint["address"]["socket_address"]["address"] = "127.0.0.1"

        stack = start_stack(envoy=edit)
        try:
            yield Tls(stack, good, wrong_host, fakes.wildcard)
        finally:
            stop_stack(stack)


def test_a_provider_certificate_from_the_configured_ca_is_served_and_metered(tls: Tls) -> None:
    policy = create_policy(
        tls.stack, amount_usd="100", action=pb.ACTION_ALERT, scope=pb.SCOPE_GLOBAL
    )
    client = openai.OpenAI(base_url=tls.stack.envoy.base_url + "/v1", api_key=KEY)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    seen = tls.good.log.requests[-1]
    assert seen["path"] == "/v1/chat/completions"
    assert {k.lower(): v for k, v in seen["headers"].items()}["authorization"] == f"Bearer {KEY}"
    wait_until(lambda: spent(tls.stack, policy.id) > 0, message="usage reaches the control plane")


def test_ip_address_upstream_is_checked_against_the_ip_san(tls: Tls) -> None:
    client = openai.OpenAI(base_url=tls.stack.envoy.base_url + "/ip/v1", api_key=KEY)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.usage is not None
    assert tls.good.log.requests[-1]["path"] == "/v1/chat/completions"


def test_a_wildcard_certificate_matches_the_host_name(tls: Tls) -> None:
    client = openai.OpenAI(base_url=tls.stack.envoy.base_url + "/wild/v1", api_key=KEY)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.usage is not None
    seen = tls.wildcard.log.requests[-1]
    assert seen["path"] == "/v1/chat/completions"
    host = {k.lower(): v for k, v in seen["headers"].items()}["host"]
    assert host == f"{WILD_HOST}:{tls.wildcard.port}"


def _reason(message: str) -> None:
    assert message.startswith("spendgate: the provider could not be reached or closed the")
    assert "CERTIFICATE_VERIFY_FAILED" in message and KEY not in message


def test_the_system_bundle_does_not_trust_the_test_ca(tls: Tls) -> None:
    """(b): Envoy refuses the fake; the client gets Anthropic's error shape
    and nothing is charged."""
    route = create_policy(
        tls.stack,
        amount_usd="100",
        action=pb.ACTION_ALERT,
        scope=pb.SCOPE_ENDPOINT,
        target="anthropic",
    )
    everything = create_policy(
        tls.stack, amount_usd="100", action=pb.ACTION_ALERT, scope=pb.SCOPE_GLOBAL
    )
    before = tls.good.counts()
    requests = len(tls.good.log.requests)
    client = anthropic.Anthropic(base_url=tls.stack.envoy.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as raised:
        client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
        )
    error = raised.value
    assert error.status_code == 503
    assert error.response.headers["x-spendgate-error"] == "provider_unreachable"
    assert isinstance(error.body, dict) and error.body["type"] == "error"
    assert error.body["error"]["type"] == "api_error"
    _reason(error.body["error"]["message"])
    tls.good.assert_refused_since(before)
    assert len(tls.good.log.requests) == requests
    # A request served after it is charged; once its usage is in, so would
    # be anything the refused one had been charged (usage is sent in order).
    openai.OpenAI(base_url=tls.stack.envoy.base_url + "/v1", api_key=KEY).chat.completions.create(
        model=MODEL, messages=MESSAGES
    )
    wait_until(
        lambda: spent(tls.stack, everything.id) > 0, message="usage reaches the control plane"
    )
    assert spent(tls.stack, route.id) == Decimal(0)


def test_a_certificate_for_another_host_name_is_refused(tls: Tls) -> None:
    """(c): the certificate chains to the trusted CA but names another host."""
    before = tls.wrong_host.counts()
    client = openai.AzureOpenAI(
        azure_endpoint=tls.stack.envoy.base_url,
        api_key=KEY,
        api_version="2024-10-21",
        max_retries=0,
    )
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    error = raised.value
    assert error.status_code == 503
    assert isinstance(error.body, dict)
    assert {k: v for k, v in error.body.items() if k != "message"} == {
        "type": "provider_unreachable",
        "param": None,
        "code": "provider_unreachable",
    }
    _reason(error.body["message"])
    assert OTHER_HOST in error.body["message"]  # the SANs it showed
    tls.wrong_host.assert_refused_since(before)
    assert tls.wrong_host.log.requests == []


def test_gemini_clients_get_googles_error_shape(tls: Tls) -> None:
    before = tls.wrong_host.counts()
    r = httpx.post(
        tls.stack.envoy.base_url + "/v1beta/models/gemini-2.0-flash:generateContent",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": KEY},
        timeout=10,
    )
    assert r.status_code == 503
    assert r.headers["x-spendgate-error"] == "provider_unreachable"
    error = r.json()["error"]
    assert {k: v for k, v in error.items() if k != "message"} == {
        "code": 503,
        "status": "UNAVAILABLE",
    }
    _reason(error["message"])
    tls.wrong_host.assert_refused_since(before)


def test_bedrock_clients_get_the_aws_error_shape(tls: Tls) -> None:
    before = tls.wrong_host.counts()
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=tls.stack.envoy.base_url,
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key=KEY,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    with pytest.raises(ClientError) as raised:
        client.converse(
            modelId="anthropic.claude-3-haiku-20240307-v1:0",
            messages=[{"role": "user", "content": [{"text": "hi"}]}],
        )
    error = raised.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert error["Error"]["Code"] == "ServiceUnavailableException"
    _reason(error["Error"]["Message"])
    tls.wrong_host.assert_refused_since(before)
    assert tls.wrong_host.log.requests == []
