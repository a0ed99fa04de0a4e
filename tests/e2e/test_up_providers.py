"""`spendgate up --config` with examples/spendgate.yaml's providers: section,
each declared provider's url pointed at a local fake (everything else as
shipped): every declared upstream is reached through the real Envoy with the
real SDKs; the OpenAI-compatible upstream is metered and budgeted by its
route; Bedrock requests signed with the client's dummy credentials reach a
SigV4-checking fake signed again by Envoy with the configured ones."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import boto3
import httpx
import openai
import pytest
import yaml
from botocore.config import Config
from botocore.credentials import Credentials
from google import genai
from google.genai import types as genai_types

from spendgate.demo.fake_provider import FakeProviderServer
from tests.e2e.sigv4_fake import SigV4FakeBedrock
from tests.harness import (
    SPENDGATE_CLI,
    UP_PORT_OPTIONS,
    env_without_spendgate,
    free_port,
    spendgate_cli,
    start_spendgate_up,
    wait_until,
)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

# What Envoy signs with (from its environment) and what clients sign with.
ENVOY_AWS = Credentials("AKIDENVOYCONFIGURED1", "envoy-configured-secret")
CLIENT_AWS = Credentials("AKIDCLIENTDUMMY00001", "client-dummy-secret")
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Up:
    cwd: Path
    base: str
    server: str
    provider: FakeProviderServer
    bedrock: SigV4FakeBedrock
    region: str
    output: list[str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return spendgate_cli(self.cwd, self.server, *args)

    def last(self, path_part: str) -> dict[str, Any]:
        found = [r for r in self.provider.log.requests if path_part in r["path"]]
        assert found, (
            f"no request to {path_part}: {[r['path'] for r in self.provider.log.requests]}"
        )
        last = found[-1]
        return {**last, "headers": {k.lower(): v for k, v in last["headers"].items()}}


def example_with_fakes(provider: str, bedrock: str) -> tuple[dict[str, Any], str]:
    """examples/spendgate.yaml with each url (or azure resource) sent to a fake."""
    config = yaml.safe_load((ROOT / "examples" / "spendgate.yaml").read_text())
    providers = config["providers"]
    for name in ("openai", "anthropic", "gemini"):
        providers[name] = {**(providers[name] or {}), "url": provider}
    azure = providers["azure"]
    del azure["resource"]
    azure["url"] = provider
    providers["bedrock"]["url"] = bedrock
    # Only Envoy's environment: no instance-metadata lookups on a test machine.
    providers["bedrock"]["credentials"] = "environment"
    for upstream in providers["compatible"]:
        upstream["url"] = provider
    return config, providers["bedrock"]["region"]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    cwd = tmp_path_factory.mktemp("providers")
    provider = FakeProviderServer()
    provider.start_in_thread()
    region = yaml.safe_load((ROOT / "examples" / "spendgate.yaml").read_text())["providers"][
        "bedrock"
    ]["region"]
    bedrock = SigV4FakeBedrock(ENVOY_AWS, region)
    bedrock.start_in_thread()
    config, _ = example_with_fakes(
        f"http://127.0.0.1:{provider.port}", f"http://127.0.0.1:{bedrock.port}"
    )
    (cwd / "spendgate.yaml").write_text(yaml.safe_dump(config))
    ports = {name: free_port() for name in UP_PORT_OPTIONS}
    args = [*(f"--{k}={v}" for k, v in ports.items()), "--config", "spendgate.yaml"]
    env = {
        "AWS_ACCESS_KEY_ID": ENVOY_AWS.access_key,
        "AWS_SECRET_ACCESS_KEY": ENVOY_AWS.secret_key,
    }
    try:
        proc, output = start_spendgate_up(args, cwd, env)
    except BaseException:
        stop_fakes(provider, bedrock)
        raise
    try:
        yield Up(
            cwd,
            f"http://127.0.0.1:{ports['port']}",
            f"127.0.0.1:{ports['control-plane-port']}",
            provider,
            bedrock,
            region,
            output,
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop_fakes(provider, bedrock)


def stop_fakes(*servers: FakeProviderServer) -> None:
    for server in servers:
        server.shutdown()
        server.server_close()


def test_openai_anthropic_and_gemini_reach_their_upstream(up: Up) -> None:
    host = f"127.0.0.1:{up.provider.port}"
    oai = openai.OpenAI(base_url=f"{up.base}/v1", api_key="sk-test", max_retries=0)
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    assert up.last("/v1/chat/completions")["headers"]["host"] == host

    ant = anthropic.Anthropic(base_url=up.base, api_key="sk-ant-test", max_retries=0)
    message = ant.messages.create(
        model="claude-3-5-haiku-latest",
        max_tokens=50,
        messages=MESSAGES,  # type: ignore[arg-type]
    )
    assert message.usage.output_tokens == 16
    seen = up.last("/v1/messages")
    assert seen["headers"]["host"] == host

    gem = genai.Client(api_key="gm-test", http_options=genai_types.HttpOptions(base_url=up.base))
    answer = gem.models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert answer.usage_metadata is not None and answer.usage_metadata.candidates_token_count == 16
    assert up.last("gemini-2.0-flash")["headers"]["host"] == host


def test_azure_gets_the_configured_api_version_unless_the_client_sends_one(up: Up) -> None:
    path = "/openai/deployments/gpt-4o-mini/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    plain = httpx.post(f"{up.base}{path}", json=body, headers={"api-key": "az-key"}, timeout=30)
    assert plain.status_code == 200, plain.text
    assert up.last(path)["path"] == f"{path}?api-version=2024-10-21"

    client = openai.AzureOpenAI(
        azure_endpoint=up.base, api_key="az-key", api_version="2025-01-01-preview", max_retries=0
    )
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert up.last(path)["path"] == f"{path}?api-version=2025-01-01-preview"
    assert up.last(path)["headers"]["host"] == f"127.0.0.1:{up.provider.port}"


def test_bedrock_is_signed_again_by_envoy_with_the_configured_credentials(up: Up) -> None:
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=up.base,
        region_name=up.region,
        aws_access_key_id=CLIENT_AWS.access_key,
        aws_secret_access_key=CLIENT_AWS.secret_key,
        aws_session_token="client-session-token",  # Envoy drops it with the client's signature
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    before = len(up.bedrock.checked)
    reply = client.converse(
        modelId="anthropic.claude-3-5-haiku-20241022-v1:0",
        messages=[{"role": "user", "content": [{"text": "hi"}]}],
    )
    assert reply["usage"]["outputTokens"] == 16
    # Exactly one request arrived, and its signature is the configured credentials'.
    assert up.bedrock.checked[before:] == [None]
    headers = {k.lower(): v for k, v in up.bedrock.log.requests[-1]["headers"].items()}
    assert f"Credential={ENVOY_AWS.access_key}/" in headers["authorization"]
    assert "x-amz-security-token" not in headers


def test_a_client_signature_alone_is_refused_by_the_fake(up: Up) -> None:
    """The fake really checks: a request signed by the client for the fake's
    own address (not through Envoy) is refused."""
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=f"http://127.0.0.1:{up.bedrock.port}",
        region_name=up.region,
        aws_access_key_id=CLIENT_AWS.access_key,
        aws_secret_access_key=CLIENT_AWS.secret_key,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    with pytest.raises(client.exceptions.ClientError) as e:
        client.converse(
            modelId="amazon.nova-micro-v1:0",
            messages=[{"role": "user", "content": [{"text": "hi"}]}],
        )
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert up.bedrock.checked[-1] == (
        f"signed with access key {CLIENT_AWS.access_key}, not {ENVOY_AWS.access_key}"
    )


def test_the_compatible_upstream_is_metered_and_budgeted_by_its_route(up: Up) -> None:
    created = up.cli(
        "policy",
        *("create", "--name", "vllm-cap", "--amount", "0.000001", "--window", "1d"),
        *("--action", "reject", "--scope", "endpoint", "--target", "vllm", "--json"),
    )
    assert created.returncode == 0, created.stderr
    policy_id = json.loads(created.stdout)["id"]
    vllm = openai.OpenAI(base_url=f"{up.base}/vllm/v1", api_key="sk-vllm", max_retries=0)
    reply = vllm.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    # The prefix is spendgate's: the server sees the OpenAI path.
    assert up.last("/v1/chat/completions")["headers"]["host"] == f"127.0.0.1:{up.provider.port}"

    def spent() -> bool:
        spend = json.loads(up.cli("spend", "--json").stdout)
        entry = next(e for e in spend if e["policy_id"] == policy_id)
        return bool(Decimal(entry["spent_usd"]) > 0)

    wait_until(spent, message="the vllm route's usage reaches its policy")

    def refused() -> bool:
        try:
            vllm.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        except openai.RateLimitError as e:
            assert "vllm-cap" in str(e)
            return True
        return False

    wait_until(refused, message="the vllm route is refused once its budget is spent")
    # Another route is not this budget's: the OpenAI route still answers.
    oai = openai.OpenAI(base_url=f"{up.base}/v1", api_key="sk-test", max_retries=0)
    assert oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).usage  # type: ignore[arg-type]
    assert any("vllm (compatible)" in line for line in up.output)


def test_a_provider_the_file_does_not_declare_gets_the_local_404(tmp_path: Path, up: Up) -> None:
    """Checked on the generated bootstrap: envoy-config prints what up runs."""
    config = {"providers": {"openai": {}}}
    (tmp_path / "only-openai.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [*SPENDGATE_CLI, "envoy-config", "--config", str(tmp_path / "only-openai.yaml")],
        capture_output=True,
        text=True,
        env=env_without_spendgate(),
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    bootstrap = yaml.safe_load(done.stdout)
    clusters = [c["name"] for c in bootstrap["static_resources"]["clusters"]]
    assert clusters == ["spendgate_ext_proc", "demo_provider", "openai"]


@pytest.mark.parametrize(
    ("providers", "message"),
    [
        ({"bedrock": {}}, "providers.bedrock.region: required (e.g. us-west-2)"),
        (
            {"compatible": [{"name": "x", "url": "http://h", "prefix": "/openai"}]},
            "providers.compatible[0].prefix: /openai/ is where a built-in provider's requests go",
        ),
        ({"azure": {"url": "https://u:s3cret@h"}}, "providers.azure.url: no credentials"),
    ],
)
def test_a_bad_providers_section_stops_up_before_anything_starts(
    tmp_path: Path, providers: dict[str, Any], message: str
) -> None:
    (tmp_path / "spendgate.yaml").write_text(yaml.safe_dump({"providers": providers}))
    ports = {name: free_port() for name in UP_PORT_OPTIONS}
    done = subprocess.run(
        [
            *SPENDGATE_CLI,
            "up",
            *(f"--{k}={v}" for k, v in ports.items()),
            "--config",
            "spendgate.yaml",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env_without_spendgate(),
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert (
        done.stderr
        == f"spendgate: --config spendgate.yaml: {message}" + (done.stderr.split(message, 1)[1])
    )
    assert len(done.stderr.strip().splitlines()) == 1 and "s3cret" not in done.stderr
    assert not (tmp_path / ".spendgate").exists()
