"""Every request reaches the provider it was written for, paths are
normalised before anything matches them, and API keys are read the way each
provider reads them: the official SDKs at their defaults (only the base URL
points at Envoy) → real Envoy (envoy/envoy.yaml) → ext_proc → fake provider,
which records the Host each route rewrote."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import anthropic
import boto3
import httpx
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
OPENAI_HOST = "api.openai.com"
ANTHROPIC_HOST = "api.anthropic.com"
GEMINI_HOST = "generativelanguage.googleapis.com"
BEDROCK_HOST = "bedrock-runtime.us-east-1.amazonaws.com"
AZURE_HOST = "YOUR-RESOURCE.openai.azure.com"
MESSAGES = [{"role": "user", "content": "where does this go"}]
CHAT_BODY = {"model": "gpt-4o-mini", "messages": MESSAGES}
PROVIDER_OF_API = {"openai_chat": "openai", "anthropic": "anthropic", "gemini": "google"}
PROVIDER_OF_API |= {"bedrock": "bedrock"}


@pytest.fixture(autouse=True)
def clean(stack: Stack) -> Iterator[None]:
    stack.provider.log.clear()
    yield
    delete_policies(stack)


def key_policy(stack: Stack, key: str, amount: str = "0.000001") -> pb.BudgetPolicy:
    """A REJECT budget for one API key (the control plane stores its hash)."""
    return create_policy(stack, amount_usd=amount, scope=pb.SCOPE_API_KEY, target=key)


def wait_for_spend(stack: Stack, policy_id: str, want: Decimal) -> None:
    wait_until(lambda: spent(stack, policy_id) == want, message=f"spend {want} on {policy_id}")


def billed(stack: Stack) -> Decimal:
    total = 0
    for b in stack.provider.log.billed:
        price = PRICES.lookup(b.model, PROVIDER_OF_API[b.api])
        assert price is not None, b.model
        total += cost_nanos(b.usage, price)
    return Decimal(total) / NANOS_PER_USD


def seen(stack: Stack) -> list[tuple[str, str, str]]:
    """(method, path, Host) of each request the provider received."""
    with stack.provider.log.lock:
        return [
            (
                r["method"],
                r["path"],
                next(v for k, v in r["headers"].items() if k.lower() == "host"),
            )
            for r in stack.provider.log.requests
        ]


# ---- the official clients, at their defaults but for the base URL --------------


def openai_client(stack: Stack, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.envoy.base_url + "/v1", api_key=key, max_retries=0)


def anthropic_client(stack: Stack, key: str = "sk-ant-test") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.envoy.base_url, api_key=key, max_retries=0)


def gemini_client(stack: Stack, key: str = "gm-test", version: str = "") -> genai.Client:
    options = genai_types.HttpOptions(base_url=stack.envoy.base_url)
    if version:
        options.api_version = version
    return genai.Client(api_key=key, http_options=options)


def bedrock_client(stack: Stack, access_key_id: str = "AKIDEXAMPLE") -> Any:
    return boto3.client(
        "bedrock-runtime",
        endpoint_url=stack.envoy.base_url,
        region_name="us-east-1",
        aws_access_key_id=access_key_id,
        aws_secret_access_key="secret",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def azure_client(stack: Stack, key: str = "az-key") -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=stack.envoy.base_url, api_key=key, api_version="2024-10-21", max_retries=0
    )


def openai_chat(stack: Stack, key: str) -> None:
    openai_client(stack, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def anthropic_messages(stack: Stack, key: str) -> None:
    anthropic_client(stack, key).messages.create(
        model="claude-haiku-4-5", max_tokens=100, messages=MESSAGES
    )


def gemini_generate(stack: Stack, key: str) -> None:
    client = gemini_client(stack, key)  # referenced while in use: it closes on GC
    r = client.models.generate_content(model="gemini-2.5-flash", contents="where?")
    assert r.usage_metadata is not None


def gemini_generate_v1beta(stack: Stack, key: str) -> None:
    client = gemini_client(stack, key, version="v1beta")
    r = client.models.generate_content(model="gemini-2.5-flash", contents="where?")
    assert r.usage_metadata is not None


def gemini_query_key(stack: Stack, key: str) -> None:
    """Gemini's REST form with the key in ?key= (curl, browsers, older clients)."""
    r = httpx.post(
        stack.envoy.base_url + "/v1beta/models/gemini-2.5-flash:generateContent",
        params={"key": key},
        json={"contents": [{"parts": [{"text": "where?"}]}]},
    )
    r.raise_for_status()


def bedrock_converse(stack: Stack, key: str) -> None:
    bedrock_client(stack, key).converse(
        modelId="anthropic.claude-3-5-haiku-20241022-v1:0",
        messages=[{"role": "user", "content": [{"text": "where?"}]}],
    )


def azure_chat(stack: Stack, key: str) -> None:
    azure_client(stack, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


SDK_CALLS = [
    pytest.param(openai_chat, OPENAI_HOST, "/v1/chat/completions", id="openai"),
    pytest.param(anthropic_messages, ANTHROPIC_HOST, "/v1/messages", id="anthropic"),
    pytest.param(
        gemini_generate,
        GEMINI_HOST,
        "/v1/models/gemini-2.5-flash:generateContent",
        id="google-genai-default",
    ),
    pytest.param(
        gemini_generate_v1beta,
        GEMINI_HOST,
        "/v1beta/models/gemini-2.5-flash:generateContent",
        id="google-genai-v1beta",
    ),
    pytest.param(
        gemini_query_key,
        GEMINI_HOST,
        "/v1beta/models/gemini-2.5-flash:generateContent?key=",
        id="gemini-query-key",
    ),
    pytest.param(
        bedrock_converse,
        BEDROCK_HOST,
        "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse",
        id="boto3-bedrock",
    ),
    pytest.param(
        azure_chat,
        AZURE_HOST,
        "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21",
        id="azure-openai",
    ),
]


@pytest.mark.parametrize(("call", "host", "path"), SDK_CALLS)
def test_each_sdk_reaches_its_own_provider(
    stack: Stack, call: Callable[[Stack, str], None], host: str, path: str
) -> None:
    key = f"k-{uuid.uuid4().hex[:8]}"
    call(stack, key)
    [(method, sent_path, sent_host)] = seen(stack)
    assert (method, sent_host) == ("POST", host)
    assert sent_path == (path + key if path.endswith("?key=") else path)
    assert len(stack.provider.log.billed) == 1


def test_route_budgets_are_charged_to_the_route_the_sdk_reached(stack: Stack) -> None:
    """ENDPOINT policies name routes: each SDK's spend lands on its own."""
    calls = {
        "openai": openai_chat,
        "anthropic": anthropic_messages,
        "gemini": gemini_generate,
        "bedrock": bedrock_converse,
        "azure-openai": azure_chat,
    }
    policies = {}
    for route in calls:
        policies[route] = stack.budgets.CreateBudgetPolicy(
            pb.CreateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(
                    name=f"route-{route}",
                    amount_usd="1000",
                    action=pb.ACTION_ALERT,
                    scope=pb.SCOPE_ENDPOINT,
                    target=route,
                    window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                )
            ),
            metadata=stack.admin,
        )
    wait_until(
        lambda: all(p.id in stack.ext.state.index.policies for p in policies.values()),
        message="policies synced",
    )
    for route, call in calls.items():
        stack.provider.log.clear()
        before = {r: spent(stack, p.id) for r, p in policies.items()}
        call(stack, f"k-{route}")
        cost = billed(stack)
        assert cost > 0
        wait_for_spend(stack, policies[route].id, before[route] + cost)
        after = {r: spent(stack, p.id) for r, p in policies.items()}
        assert after == {**before, route: before[route] + cost}


def anthropic_raw(stack: Stack, method: str, path: str, headers: dict[str, str]) -> None:
    body = {"model": "claude-2.1", "prompt": "\n\nHuman: hi\n\nAssistant:"}
    httpx.request(
        method,
        stack.envoy.base_url + path,
        headers=headers,
        json=body if method == "POST" else None,
    )


def test_anthropic_and_gemini_paths_under_v1_reach_their_own_provider(stack: Stack) -> None:
    """/v1/models, /v1/files, /v1/complete are OpenAI paths too; the
    credentials decide."""
    client = anthropic_client(stack)
    with contextlib.suppress(anthropic.APIError):
        client.models.list()
    with contextlib.suppress(anthropic.APIError):
        client.beta.files.list()
    # Legacy text completions and files as curl sends them: x-api-key, with or
    # without anthropic-version.
    anthropic_raw(stack, "POST", "/v1/complete", {"x-api-key": "sk-ant-test"})
    anthropic_raw(
        stack, "GET", "/v1/files", {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
    )
    gemini = gemini_client(stack)
    with contextlib.suppress(genai_errors.APIError):
        list(gemini.models.list())
    with contextlib.suppress(genai_errors.APIError):
        gemini.models.count_tokens(model="gemini-2.5-flash", contents="how many?")
    openai_models = openai_client(stack).models.list()
    assert [m.id for m in openai_models.data] == ["gpt-4o-mini"]
    assert seen(stack) == [
        ("GET", "/v1/models", ANTHROPIC_HOST),
        ("GET", "/v1/files", ANTHROPIC_HOST),
        ("POST", "/v1/complete", ANTHROPIC_HOST),
        ("GET", "/v1/files", ANTHROPIC_HOST),
        ("GET", "/v1/models", GEMINI_HOST),
        ("POST", "/v1/models/gemini-2.5-flash:countTokens", GEMINI_HOST),
        ("GET", "/v1/models", OPENAI_HOST),
    ]


UNCLAIMED = [
    pytest.param("POST", "/v1/chat/completions", {}, id="no-credentials"),
    pytest.param("POST", "/v1/chat/completions", {"api-key": "az"}, id="azure-key-on-openai-path"),
    pytest.param(
        "POST",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"authorization": "Bearer sk-openai"},
        id="openai-key-on-gemini-path",
    ),
    pytest.param("POST", "/model/m/converse", {}, id="bedrock-unsigned"),
    pytest.param("POST", "/openai/deployments/d/chat/completions", {}, id="azure-no-key"),
    pytest.param("POST", "/V1/chat/completions", {"authorization": "Bearer k"}, id="upper-case"),
    pytest.param("GET", "/", {"authorization": "Bearer k"}, id="root"),
    pytest.param("POST", "/v2/chat/completions", {"authorization": "Bearer k"}, id="unknown-path"),
]


@pytest.mark.parametrize(("method", "path", "headers"), UNCLAIMED)
def test_a_request_no_provider_claims_gets_a_local_404(
    stack: Stack, method: str, path: str, headers: dict[str, str]
) -> None:
    before = stack.ext.ctx.stats.messages
    r = httpx.request(method, stack.envoy.base_url + path, headers=headers, json=CHAT_BODY)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == "no_provider_route" and error["type"] == "invalid_request_error"
    assert "no provider route matches" in error["message"]
    assert seen(stack) == []  # no provider called, no key sent anywhere
    assert stack.ext.ctx.stats.messages == before  # nor asked ext_proc


def test_the_openai_sdk_reads_the_local_404(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.envoy.base_url + "/v2", api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert e.value.code == "no_provider_route"
    assert seen(stack) == []


# ---- path tricks against a REJECT budget -----------------------------------------

TRICKS = [
    pytest.param("/v1/chat/completion%73", id="pct-73"),
    pytest.param("/v1/%63hat/completions", id="pct-63"),
    pytest.param("/v1//chat/completions", id="double-slash"),
    pytest.param("//v1/chat/completions", id="leading-double-slash"),
    pytest.param("/v1/./chat/completions", id="dot"),
    pytest.param("/v1/x/../chat/completions", id="dot-dot"),
    pytest.param("/v1/chat\\completions", id="backslash"),
]


def raw_chat(stack: Stack, path: str, key: str) -> httpx.Response:
    # httpx would normalise some of these; send the path byte for byte.
    with httpx.Client(base_url=stack.envoy.base_url) as client:
        request = client.build_request(
            "POST", "/", headers={"authorization": f"Bearer {key}"}, json=CHAT_BODY
        )
        request.url = request.url.copy_with(raw_path=path.encode())
        return client.send(request)


@pytest.mark.parametrize("path", TRICKS)
def test_path_tricks_are_metered_as_the_api_they_reach(stack: Stack, path: str) -> None:
    key = f"sk-{uuid.uuid4().hex[:8]}"
    p = key_policy(stack, key)
    first = raw_chat(stack, path, key)
    assert first.status_code == 200, first.text
    # Served: so charged, exactly, and under the normalised path.
    [(_, sent_path, host)] = seen(stack)
    assert (sent_path, host) == ("/v1/chat/completions", OPENAI_HOST)
    expected = billed(stack)
    assert expected > 0
    wait_until(lambda: spent(stack, p.id) == expected, message="trick charged")
    # ... and the budget it crossed refuses the next one.
    second = raw_chat(stack, path, key)
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "budget_exceeded"
    assert len(seen(stack)) == 1


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/v1/chat%2Fcompletions", id="pct-2F"),
        pytest.param("/v1/chat%2fcompletions", id="pct-2f"),
        pytest.param("/v1/chat%5Ccompletions", id="pct-5C"),
        pytest.param("/v1%2Fchat%2Fcompletions", id="pct-2F-twice"),
        pytest.param("/v1/chat/completions%2F", id="pct-2F-trailing"),
    ],
)
def test_escaped_slashes_are_refused(stack: Stack, path: str) -> None:
    key = f"sk-{uuid.uuid4().hex[:8]}"
    key_policy(stack, key)
    r = raw_chat(stack, path, key)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "escaped_slash_in_path"
    assert seen(stack) == []


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/v1/%00/chat/completions", id="nul-segment"),
        pytest.param("/v1/chat/completions%00", id="nul-trailing"),
        pytest.param("/%00", id="nul-root"),
    ],
)
def test_a_path_envoy_cannot_normalise_gets_a_400_in_the_openai_shape(
    stack: Stack, path: str
) -> None:
    """Found by the fuzz harness: Envoy's own 400 for such a path had no body."""
    r = raw_chat(stack, path, "sk-nul")
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "invalid_path"
    assert seen(stack) == []
    # The SDK reads it as its own error, message included.
    client = openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1/%00", api_key="sk-nul", max_retries=0
    )
    with pytest.raises(openai.BadRequestError, match="cannot be normalised"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    client.close()


def test_bedrock_model_arn_keeps_its_escaped_slash(stack: Stack) -> None:
    """Bedrock model ids may be ARNs (`…:inference-profile/us.…`): boto3 sends
    the `/` as %2F inside one path segment, and that reaches Bedrock as sent."""
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-haiku-4-5"
    with contextlib.suppress(ClientError):
        bedrock_client(stack).converse(
            modelId=arn, messages=[{"role": "user", "content": [{"text": "where?"}]}]
        )
    [(method, path, host)] = seen(stack)
    assert (method, host) == ("POST", BEDROCK_HOST)
    assert path == (
        "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile"
        "%2Fus.anthropic.claude-haiku-4-5/converse"
    )


# ---- API keys, read the way each provider reads them ---------------------------------


def expect_throttled(call: Callable[[], None]) -> None:
    with pytest.raises(
        (
            openai.RateLimitError,
            anthropic.RateLimitError,
            genai_errors.ClientError,
            ClientError,
            httpx.HTTPStatusError,
        )
    ) as e:
        call()
    err = e.value
    if isinstance(err, genai_errors.ClientError):
        assert err.code == 429
    elif isinstance(err, httpx.HTTPStatusError):
        assert err.response.status_code == 429
    elif isinstance(err, ClientError):
        assert err.response["Error"]["Code"] == "ThrottlingException"


@pytest.mark.parametrize(("call", "host", "path"), SDK_CALLS)
def test_an_api_key_budget_binds_every_sdk(
    stack: Stack, call: Callable[[Stack, str], None], host: str, path: str
) -> None:
    # For Bedrock the API key is the SigV4 access key id.
    key = f"AKIA{uuid.uuid4().hex[:12].upper()}"
    p = key_policy(stack, key)
    call(stack, key)  # crosses the line and completes
    expected = billed(stack)
    wait_until(lambda: spent(stack, p.id) == expected, message="charged to the key")
    expect_throttled(lambda: call(stack, key))
    assert len(stack.provider.log.billed) == 1
    call(stack, key + "X")  # another key: its own budget (none), admitted
    assert len(stack.provider.log.billed) == 2


def post(stack: Stack, path: str, headers: list[tuple[str, str]]) -> httpx.Response:
    return httpx.post(stack.envoy.base_url + path, headers=headers, json=CHAT_BODY)


@pytest.mark.parametrize(
    ("path", "headers", "error"),
    [
        pytest.param(
            "/v1/messages",
            [("authorization", "Bearer junk"), ("x-api-key", "{blocked}")],
            "more than one API key (the authorization header and the x-api-key header)",
            id="bearer-junk-plus-x-api-key",
        ),
        pytest.param(
            "/v1/chat/completions",
            [("authorization", "Bearer junk"), ("x-api-key", "{blocked}")],
            "more than one API key",
            id="openai-path-bearer-junk-plus-x-api-key",
        ),
        pytest.param(
            "/v1/messages",
            [
                ("anthropic-version", "2023-06-01"),
                ("x-api-key", "{blocked}"),
                ("x-api-key", "{blocked}"),
            ],
            "the x-api-key header is sent more than once",
            id="x-api-key-twice",
        ),
        pytest.param(
            "/v1/chat/completions",
            [("authorization", "Bearer {blocked}"), ("authorization", "Bearer {blocked}")],
            "authorization header",
            id="authorization-twice",
        ),
        pytest.param(
            "/v1beta/models/gemini-2.5-flash:generateContent?key={blocked}",
            [("x-goog-api-key", "junk")],
            "the x-goog-api-key header and the ?key= query parameter",
            id="gemini-header-plus-query",
        ),
        pytest.param(
            "/v1/messages",
            [("anthropic-version", "2023-06-01"), ("api-key", "{blocked}")],
            "the api-key header is not how the anthropic provider reads an API key",
            id="azure-key-to-anthropic",
        ),
    ],
)
def test_ambiguous_keys_are_refused_before_any_provider(
    stack: Stack, path: str, headers: list[tuple[str, str]], error: str
) -> None:
    blocked = f"sk-blocked-{uuid.uuid4().hex[:6]}"
    key_policy(stack, blocked)
    sent = [(k, v.format(blocked=blocked)) for k, v in headers]
    r = post(stack, path.format(blocked=blocked), sent)
    assert r.status_code == 400, r.text
    assert r.headers["x-spendgate-error"] == "ambiguous_api_key"
    assert error in r.text
    assert seen(stack) == []


def test_bearer_tab_and_case_variants_are_the_same_key(stack: Stack) -> None:
    key = f"sk-{uuid.uuid4().hex[:8]}"
    key_policy(stack, key)
    assert post(stack, "/v1/chat/completions", [("authorization", f"bearer\t{key}")]).is_success
    for variant in (f"Bearer {key}", f"BEARER  {key}", f"Bearer\t{key}"):
        r = post(stack, "/v1/chat/completions", [("authorization", variant)])
        assert r.status_code == 429, variant
    assert len(stack.provider.log.billed) == 1
