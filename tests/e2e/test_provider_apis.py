"""Every metered API shape, end to end: the provider's official SDK → real
Envoy → ext_proc → fake provider. Spend must equal the exact cost of what the
provider billed, and a spent budget must raise each SDK's own throttling error."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import anthropic
import boto3
import openai
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from spendgate.domain.pricing import NANOS_PER_USD, PriceBook, cost_nanos
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack
from tests.e2e.budgets import create_policy, delete_policies, spent
from tests.harness import wait_until

pytestmark = pytest.mark.e2e
PRICES = PriceBook.bundled()
PROVIDER_OF_API = {
    "openai_chat": "openai",
    "openai_completions": "openai",
    "openai_responses": "openai",
    "openai_embeddings": "openai",
    "anthropic": "anthropic",
    "gemini": "google",
    "bedrock": "bedrock",
    "bedrock_invoke": "bedrock",
}
KNOBS = {
    "x-fake-prompt-tokens": "1200",
    "x-fake-cached-tokens": "200",
    "x-fake-completion-tokens": "300",
    "x-fake-reasoning-tokens": "50",
}
ANTHROPIC_KNOBS = {
    "x-fake-prompt-tokens": "3000",
    "x-fake-cached-tokens": "1000",
    "x-fake-cache-write-tokens": "500",
    "x-fake-cache-write-1h-tokens": "250",
    "x-fake-completion-tokens": "400",
}


@pytest.fixture(autouse=True)
def clean(stack: Stack) -> Iterator[None]:
    yield
    delete_policies(stack)


def policy(stack: Stack, *, amount: str, action: int, user: str) -> pb.BudgetPolicy:
    return create_policy(
        stack,
        name=f"sdk-{user}",
        amount_usd=amount,
        action=action,
        scope=pb.SCOPE_USER,
        target=user,
    )


def billed(stack: Stack) -> Decimal:
    total = 0
    for b in stack.provider.log.billed:
        price = PRICES.lookup(b.model, PROVIDER_OF_API[b.api])
        assert price is not None, b.model
        total += cost_nanos(b.usage, price)
    return Decimal(total) / NANOS_PER_USD


# ---- clients ------------------------------------------------------------------


def openai_client(stack: Stack, headers: dict[str, str]) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers=headers,
        max_retries=0,
    )


def anthropic_client(stack: Stack, headers: dict[str, str]) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=stack.envoy.base_url, api_key="sk-ant-test", default_headers=headers, max_retries=0
    )


def gemini_client(stack: Stack, headers: dict[str, str]) -> genai.Client:
    return genai.Client(
        api_key="gm-test",
        http_options=genai_types.HttpOptions(base_url=stack.envoy.base_url, headers=headers),
    )


def bedrock_client(stack: Stack, headers: dict[str, str]) -> Any:
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=stack.envoy.base_url,
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )

    def add_headers(request: Any, **_: Any) -> None:
        for k, v in headers.items():
            request.headers[k] = v

    client.meta.events.register_first("before-sign.bedrock-runtime.*", add_headers)
    return client


# ---- one call per shape (streaming and not) ----------------------------------------

MESSAGES = [{"role": "user", "content": "how much does this cost"}]
BEDROCK_MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"


def openai_chat(stack: Stack, h: dict[str, str]) -> None:
    openai_client(stack, h).chat.completions.create(model="gpt-4.1-mini", messages=MESSAGES)


def openai_chat_stream(stack: Stack, h: dict[str, str]) -> None:
    for _ in openai_client(stack, h).chat.completions.create(
        model="o4-mini", messages=MESSAGES, stream=True
    ):
        pass


def azure_openai_chat(stack: Stack, h: dict[str, str]) -> None:
    # /openai/deployments/{deployment}/chat/completions?api-version=...
    client = openai.AzureOpenAI(
        azure_endpoint=stack.envoy.base_url,
        api_key="az-key",
        api_version="2024-10-21",
        default_headers=h,
        max_retries=0,
    )
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def openai_responses(stack: Stack, h: dict[str, str]) -> None:
    r = openai_client(stack, h).responses.create(model="gpt-4o", input="cost?")
    assert r.usage is not None and r.usage.output_tokens == 300


def openai_responses_stream(stack: Stack, h: dict[str, str]) -> None:
    with openai_client(stack, h).responses.stream(model="gpt-4o-mini", input="cost?") as s:
        for _ in s:
            pass
        assert s.get_final_response().usage is not None


def openai_embeddings(stack: Stack, h: dict[str, str]) -> None:
    r = openai_client(stack, h).embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(r.data) == 2


def anthropic_messages(stack: Stack, h: dict[str, str]) -> None:
    m = anthropic_client(stack, {**h, **ANTHROPIC_KNOBS}).messages.create(
        model="claude-sonnet-4-20250514", max_tokens=500, messages=MESSAGES
    )
    assert m.usage.cache_read_input_tokens == 1000


def anthropic_messages_stream(stack: Stack, h: dict[str, str]) -> None:
    with anthropic_client(stack, {**h, **ANTHROPIC_KNOBS}).messages.stream(
        model="claude-haiku-4-5", max_tokens=500, messages=MESSAGES
    ) as s:
        for _ in s.text_stream:
            pass
        assert s.get_final_message().usage.output_tokens == 400


def gemini_generate(stack: Stack, h: dict[str, str]) -> None:
    client = gemini_client(stack, h)  # keep it referenced: it closes its HTTP client on GC
    r = client.models.generate_content(model="gemini-2.5-flash", contents="cost?")
    assert r.usage_metadata is not None and r.usage_metadata.thoughts_token_count == 50


def gemini_stream(stack: Stack, h: dict[str, str]) -> None:
    client = gemini_client(stack, h)
    for _ in client.models.generate_content_stream(model="gemini-2.5-pro", contents="cost?"):
        pass


def bedrock_converse(stack: Stack, h: dict[str, str]) -> None:
    r = bedrock_client(stack, h).converse(
        modelId=BEDROCK_MODEL, messages=[{"role": "user", "content": [{"text": "cost?"}]}]
    )
    assert r["usage"]["outputTokens"] == 300


def bedrock_converse_stream(stack: Stack, h: dict[str, str]) -> None:
    r = bedrock_client(stack, h).converse_stream(
        modelId="us.anthropic.claude-sonnet-4-20250514-v1:0",
        messages=[{"role": "user", "content": [{"text": "cost?"}]}],
    )
    events = list(r["stream"])
    assert "metadata" in events[-1]


def openai_completions(stack: Stack, h: dict[str, str]) -> None:
    r = openai_client(stack, h).completions.create(
        model="gpt-3.5-turbo-instruct", prompt="how much does this cost"
    )
    assert r.usage is not None and r.usage.completion_tokens == 300


def azure_openai_completions(stack: Stack, h: dict[str, str]) -> None:
    # /openai/deployments/{deployment}/completions?api-version=...
    client = openai.AzureOpenAI(
        azure_endpoint=stack.envoy.base_url,
        api_key="az-key",
        api_version="2024-10-21",
        default_headers=h,
        max_retries=0,
    )
    r = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="cost?")
    assert r.usage is not None and r.usage.prompt_tokens == 1200


def openai_completions_stream(stack: Stack, h: dict[str, str]) -> None:
    chunks = list(
        openai_client(stack, h).completions.create(
            model="gpt-3.5-turbo-instruct", prompt="how much does this cost", stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith("word0")


# Families whose InvokeModel bodies report no cache use are billed none here.
NO_CACHE = {"x-fake-cached-tokens": "0"}
CLAUDE_BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 500,
    "messages": [{"role": "user", "content": "how much does this cost"}],
}


def invoke(stack: Stack, h: dict[str, str], model: str, body: dict[str, Any]) -> dict[str, Any]:
    r = bedrock_client(stack, h).invoke_model(
        modelId=model, body=json.dumps(body), contentType="application/json"
    )
    return dict(json.loads(r["body"].read()))


def invoke_stream(
    stack: Stack, h: dict[str, str], model: str, body: dict[str, Any]
) -> list[dict[str, Any]]:
    r = bedrock_client(stack, h).invoke_model_with_response_stream(
        modelId=model, body=json.dumps(body)
    )
    return [json.loads(e["chunk"]["bytes"]) for e in r["body"]]


def bedrock_invoke_claude(stack: Stack, h: dict[str, str]) -> None:
    m = invoke(stack, {**h, **ANTHROPIC_KNOBS}, BEDROCK_MODEL, CLAUDE_BODY)
    assert m["usage"]["cache_read_input_tokens"] == 1000


def bedrock_invoke_claude_stream(stack: Stack, h: dict[str, str]) -> None:
    chunks = invoke_stream(stack, {**h, **ANTHROPIC_KNOBS}, BEDROCK_MODEL, CLAUDE_BODY)
    assert chunks[-1]["type"] == "message_stop"
    assert chunks[-1]["amazon-bedrock-invocationMetrics"]["outputTokenCount"] == 400


def bedrock_invoke_llama(stack: Stack, h: dict[str, str]) -> None:
    body = {"prompt": "how much does this cost", "max_gen_len": 512}
    r = invoke(stack, {**h, **NO_CACHE}, "meta.llama3-3-70b-instruct-v1:0", body)
    assert r["generation_token_count"] == 300


def bedrock_invoke_llama_stream(stack: Stack, h: dict[str, str]) -> None:
    body = {"prompt": "how much does this cost", "max_gen_len": 512}
    chunks = invoke_stream(stack, {**h, **NO_CACHE}, "us.meta.llama3-3-70b-instruct-v1:0", body)
    assert chunks[-1]["stop_reason"] == "stop"


def bedrock_invoke_nova_stream(stack: Stack, h: dict[str, str]) -> None:
    body = {"messages": [{"role": "user", "content": [{"text": "how much does this cost"}]}]}
    chunks = invoke_stream(stack, h, "amazon.nova-lite-v1:0", body)
    assert chunks[-1]["metadata"]["usage"]["outputTokens"] == 300


def bedrock_invoke_mistral(stack: Stack, h: dict[str, str]) -> None:
    """Mistral's body has no usage: it is read from the response headers."""
    body = {"prompt": "<s>[INST] how much does this cost [/INST]", "max_tokens": 400}
    r = invoke(stack, {**h, **NO_CACHE}, "mistral.mistral-7b-instruct-v0:2", body)
    assert r["outputs"][0]["stop_reason"] == "stop"


def bedrock_invoke_cohere_stream(stack: Stack, h: dict[str, str]) -> None:
    body = {"message": "how much does this cost"}
    chunks = invoke_stream(stack, {**h, **NO_CACHE}, "cohere.command-r-v1:0", body)
    assert chunks[-1]["is_finished"] is True


CALLS: list[Callable[[Stack, dict[str, str]], None]] = [
    openai_chat,
    openai_chat_stream,
    azure_openai_chat,
    openai_responses,
    openai_responses_stream,
    openai_embeddings,
    anthropic_messages,
    anthropic_messages_stream,
    gemini_generate,
    gemini_stream,
    bedrock_converse,
    bedrock_converse_stream,
    openai_completions,
    openai_completions_stream,
    azure_openai_completions,
    bedrock_invoke_claude,
    bedrock_invoke_claude_stream,
    bedrock_invoke_llama,
    bedrock_invoke_llama_stream,
    bedrock_invoke_nova_stream,
    bedrock_invoke_mistral,
    bedrock_invoke_cohere_stream,
]


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.__name__)
def test_each_api_is_charged_exactly(stack: Stack, call: Callable[..., None]) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    p = policy(stack, amount="1000", action=pb.ACTION_ALERT, user=user)
    call(stack, {"x-spendgate-user": user, **KNOBS})
    # A stream's client can finish before the provider logs its bill (no chunk
    # waits for metering any more).
    wait_until(lambda: len(stack.provider.log.billed) >= 1, message="the provider's bill")
    assert len(stack.provider.log.billed) == 1
    expected = billed(stack)
    assert expected > 0
    wait_until(
        lambda: spent(stack, p.id) == expected, message=f"spend {expected} for {call.__name__}"
    )
    assert stack.ext.ctx.stats.unpriced_responses == 0


def expect_openai(fn: Callable[[], None]) -> str:
    with pytest.raises(openai.RateLimitError) as e:
        fn()
    assert e.value.code == "budget_exceeded"
    return str(e.value.body["message"])  # type: ignore[index]


def expect_anthropic(fn: Callable[[], None]) -> str:
    with pytest.raises(anthropic.RateLimitError) as e:
        fn()
    error = e.value.body["error"]  # type: ignore[index]
    assert error["type"] == "rate_limit_error"
    return str(error["message"])


def expect_gemini(fn: Callable[[], None]) -> str:
    with pytest.raises(genai_errors.ClientError) as e:
        fn()
    assert e.value.code == 429 and e.value.status == "RESOURCE_EXHAUSTED"
    return str(e.value.message)


def expect_bedrock(fn: Callable[[], None]) -> str:
    with pytest.raises(ClientError) as e:
        fn()
    assert e.value.response["Error"]["Code"] == "ThrottlingException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    return str(e.value.response["Error"]["Message"])


@pytest.mark.parametrize(
    ("call", "expect"),
    [
        pytest.param(openai_chat, expect_openai, id="openai-chat"),
        pytest.param(azure_openai_chat, expect_openai, id="azure-openai-chat"),
        pytest.param(openai_responses, expect_openai, id="openai-responses"),
        pytest.param(openai_embeddings, expect_openai, id="openai-embeddings"),
        pytest.param(anthropic_messages, expect_anthropic, id="anthropic"),
        pytest.param(anthropic_messages_stream, expect_anthropic, id="anthropic-stream"),
        pytest.param(gemini_generate, expect_gemini, id="gemini"),
        pytest.param(gemini_stream, expect_gemini, id="gemini-stream"),
        pytest.param(bedrock_converse, expect_bedrock, id="bedrock"),
        pytest.param(bedrock_converse_stream, expect_bedrock, id="bedrock-stream"),
        pytest.param(openai_completions, expect_openai, id="openai-completions"),
        pytest.param(bedrock_invoke_claude, expect_bedrock, id="bedrock-invoke"),
        pytest.param(bedrock_invoke_llama_stream, expect_bedrock, id="bedrock-invoke-stream"),
    ],
)
def test_each_sdk_gets_its_own_throttling_error(
    stack: Stack, call: Callable[..., None], expect: Callable[[Callable[[], None]], str]
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    p = policy(stack, amount="0.000001", action=pb.ACTION_REJECT, user=user)
    headers = {"x-spendgate-user": user, **KNOBS}
    call(stack, headers)  # crosses the line and completes
    # A stream is charged beside its client (response_metering: observe),
    # which can return first: until then its hold fills the budget (a
    # budget_held 429, not this test's).
    wait_until(lambda: stack.ext.state.holding_requests == 0, message="the first call charged")
    message = expect(lambda: call(stack, headers))
    assert message.startswith("Budget exceeded: policy") and p.id in message
    assert len(stack.provider.log.billed) == 1  # the provider never saw the second call
