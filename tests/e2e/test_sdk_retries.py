"""How often each official SDK, at its default retry settings, sends a request
a spent budget rejects (issue 16). spendgate's 429 says `x-should-retry:
false`, which the openai and anthropic SDKs honour. google-genai retries only
when HttpRetryOptions are given, on the status codes they list. boto3 retries
every ThrottlingException (and any unmodelled 429) whatever the headers say,
so no answer stops it that still raises ThrottlingException: the docs give the
client setting (docs/concepts/request-flow.md), and these tests count the
attempts that reach spendgate."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
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

from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack
from tests.harness import wait_until

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "hi"}]
BEDROCK_MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
# The genai setting the docs give (docs/concepts/request-flow.md): HttpRetryOptions'
# default codes without 429.
GENAI_NO_429 = genai_types.HttpRetryOptions(http_status_codes=[408, 500, 502, 503, 504])


@pytest.fixture
def user(stack: Stack) -> Iterator[str]:
    """A caller whose budget ($0) is spent: every request of it is rejected."""
    name = f"u-{uuid.uuid4().hex[:8]}"
    p = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name=f"retries-{name}",
                amount_usd="0.000001",
                action=pb.ACTION_REJECT,
                scope=pb.SCOPE_USER,
                target=name,
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
            )
        ),
        metadata=stack.admin,
    )
    wait_until(lambda: p.id in stack.ext.state.index.policies, message="policy synced")
    # One answer crosses the line; from then on every request gets the 429.
    openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": name},
    ).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    yield name
    stack.budgets.DeleteBudgetPolicy(pb.DeleteBudgetPolicyRequest(id=p.id), metadata=stack.admin)


def _attempts(stack: Stack, call: Callable[[], None], error: type[Exception]) -> int:
    """Requests spendgate rejected while ``call`` ran (it must raise ``error``)."""
    before = stack.ext.ctx.stats.rejected_requests
    with pytest.raises(error) as raised:
        call()
    _check_throttling(raised.value)
    return int(stack.ext.ctx.stats.rejected_requests - before)


def _check_throttling(e: Exception) -> None:
    """Each SDK still raises its own throttling error."""
    if isinstance(e, genai_errors.ClientError):
        assert e.code == 429 and e.status == "RESOURCE_EXHAUSTED"
    elif isinstance(e, ClientError):
        assert e.response["Error"]["Code"] == "ThrottlingException"
    else:
        assert isinstance(e, openai.RateLimitError | anthropic.RateLimitError)


def test_openai_at_its_defaults_sends_once(stack: Stack, user: str) -> None:
    client = openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": user},
    )
    assert client.max_retries == 2  # the default, not turned off here

    def call() -> None:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]

    assert _attempts(stack, call, openai.RateLimitError) == 1


def test_anthropic_at_its_defaults_sends_once(stack: Stack, user: str) -> None:
    client = anthropic.Anthropic(
        base_url=stack.envoy.base_url,
        api_key="sk-ant-test",
        default_headers={"x-spendgate-user": user},
    )
    assert client.max_retries == 2

    def call() -> None:
        client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=10,
            messages=MESSAGES,  # type: ignore[arg-type]
        )

    assert _attempts(stack, call, anthropic.RateLimitError) == 1


@pytest.mark.parametrize(
    "retry_options", [None, GENAI_NO_429], ids=["defaults", "retry-options-without-429"]
)
def test_google_genai_sends_once(
    stack: Stack, user: str, retry_options: genai_types.HttpRetryOptions | None
) -> None:
    client = genai.Client(
        api_key="gm-test",
        http_options=genai_types.HttpOptions(
            base_url=stack.envoy.base_url,
            headers={"x-spendgate-user": user},
            retry_options=retry_options,
        ),
    )

    def call() -> None:
        client.models.generate_content(model="gemini-2.5-flash", contents="hi")

    assert _attempts(stack, call, genai_errors.ClientError) == 1


def _bedrock(stack: Stack, user: str, config: Config | None) -> Any:
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=stack.envoy.base_url,
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        config=config,
    )

    def add_user(request: Any, **_: Any) -> None:
        request.headers["x-spendgate-user"] = user

    client.meta.events.register_first("before-sign.bedrock-runtime.*", add_user)
    return client


def _converse(client: Any) -> Callable[[], None]:
    def call() -> None:
        client.converse(
            modelId=BEDROCK_MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}]
        )

    return call


def test_boto3_at_its_defaults_retries_a_throttling_error(stack: Stack, user: str) -> None:
    # Standard mode, 3 attempts: what the docs tell Bedrock users to change.
    assert _attempts(stack, _converse(_bedrock(stack, user, None)), ClientError) == 3


def test_boto3_with_the_readme_setting_sends_once(stack: Stack, user: str) -> None:
    client = _bedrock(stack, user, Config(retries={"total_max_attempts": 1}))
    assert _attempts(stack, _converse(client), ClientError) == 1
