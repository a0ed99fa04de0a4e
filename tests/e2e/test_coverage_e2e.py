"""No way around a budget through what spendgate does not meter, end to end
(official SDKs or raw HTTP → real Envoy → ext_proc → fake provider):

- requests of no metered API shape are admission-checked and counted, or
  refused with ``unmetered_requests: reject``;
- only OPTIONS and HEAD skip the budget check;
- a ``stream`` flag a lenient provider takes as true is metered as a stream,
  and an empty body is admission-checked;
- Bedrock and Gemini streams cut by the client or by the provider are charged
  the input the request carried.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from spendgate.domain.pricing import NANOS_PER_USD, PriceBook, cost_nanos
from spendgate.domain.usage import Usage
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack, start_stack, stop_stack
from tests.e2e.budgets import create_policy, delete_policies, spent
from tests.harness import wait_until

pytestmark = pytest.mark.e2e
PRICES = PriceBook.bundled()
MESSAGES = [{"role": "user", "content": "hello"}]
# Raw HTTP requests carry the credentials each provider's SDK would send (a
# request speaking no provider's API is not routed anywhere).
OPENAI_AUTH = {"authorization": "Bearer sk-test"}
BEDROCK_AUTH = {
    "authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261204/us-east-1/bedrock/"
    "aws4_request, SignedHeaders=host;x-amz-date, Signature=" + "0" * 64
}
GEMINI_AUTH = {"x-goog-api-key": "gm-test"}


@pytest.fixture(autouse=True)
def clean(stack: Stack) -> Iterator[None]:
    yield
    delete_policies(stack)


def user_policy(stack: Stack, user: str, *, amount: str, action: int) -> pb.BudgetPolicy:
    return create_policy(
        stack,
        name=f"cov-{user}",
        amount_usd=amount,
        action=action,
        scope=pb.SCOPE_USER,
        target=user,
    )


def spent_budget(stack: Stack) -> dict[str, str]:
    """Headers of a user whose REJECT budget is already spent (one chat
    completion crossed it)."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    user_policy(stack, user, amount="0.000001", action=pb.ACTION_REJECT)
    headers = {"x-spendgate-user": user}
    openai_client(stack, headers).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    wait_until(lambda: stack.provider.log.billed, message="the crossing request billed")
    return headers


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


BATCH = [
    {
        "custom_id": "one",
        "params": {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": MESSAGES},
    }
]


# ---- requests of no metered shape: count ------------------------------------------


def test_unmetered_request_is_counted_and_reaches_the_provider(stack: Stack) -> None:
    before = stack.ext.ctx.stats.unmetered.get(("openai", "POST"), 0)
    r = openai_client(stack, {}).images.generate(model="dall-e-3", prompt="a cat")
    assert r.data[0].url == "https://images.invalid/1"
    assert stack.ext.ctx.stats.unmetered[("openai", "POST")] == before + 1
    assert stack.ext.ctx.unmetered_paths.first_time("openai", "POST", "/v1/images/generations") is (
        False
    )


def test_unmetered_request_is_refused_by_a_spent_budget(stack: Stack) -> None:
    headers = spent_budget(stack)
    with pytest.raises(openai.RateLimitError) as e:
        openai_client(stack, headers).images.generate(model="dall-e-3", prompt="a cat")
    assert e.value.code == "budget_exceeded"
    with pytest.raises(openai.RateLimitError):
        openai_client(stack, headers).audio.speech.create(
            model="tts-1", voice="alloy", input="hello"
        )
    with pytest.raises(anthropic.RateLimitError) as a:
        anthropic_client(stack, headers).messages.batches.create(requests=BATCH)  # type: ignore[arg-type]
    assert a.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    paths = [r["path"] for r in stack.provider.log.requests]
    assert paths == ["/v1/chat/completions"]  # only the crossing request got through


def test_get_is_admission_checked_head_is_not(stack: Stack) -> None:
    headers = spent_budget(stack)
    with pytest.raises(openai.RateLimitError):
        openai_client(stack, headers).models.list()
    headers = {**headers, **OPENAI_AUTH}
    # HEAD and OPTIONS never cost anything: not budgeted, they reach the
    # provider (whose HTTP server answers them 501 Not Implemented).
    r = httpx.head(stack.envoy.base_url + "/v1/models", headers=headers)
    assert r.status_code == 501
    r = httpx.options(stack.envoy.base_url + "/v1/chat/completions", headers=headers)
    assert r.status_code == 501


# ---- requests of no metered shape: reject ------------------------------------------


@pytest.fixture(scope="module")
def strict() -> Iterator[Stack]:
    s = start_stack(ext_proc={"unmetered_requests": "reject"})
    yield s
    stop_stack(s)


def test_reject_refuses_unmetered_requests_in_each_sdks_shape(strict: Stack) -> None:
    with pytest.raises(openai.PermissionDeniedError) as e:
        openai_client(strict, {}).images.generate(model="dall-e-3", prompt="a cat")
    assert e.value.code == "unmetered_request"
    assert "POST /v1/images/generations" in e.value.message
    with pytest.raises(anthropic.PermissionDeniedError) as a:
        anthropic_client(strict, {}).messages.batches.create(requests=BATCH)  # type: ignore[arg-type]
    assert "POST /v1/messages/batches" in a.value.message
    # Metered APIs are untouched.
    openai_client(strict, {}).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    paths = [r["path"] for r in strict.provider.log.requests]
    assert paths == ["/v1/chat/completions"]
    assert strict.ext.ctx.stats.rejections == {("", "unmetered_request"): 2}


# ---- stream flags and bodies -----------------------------------------------------------


def billed(stack: Stack) -> Decimal:
    total = 0
    for b in stack.provider.log.billed:
        price = PRICES.lookup(b.model, "bedrock" if b.api.startswith("bedrock") else None)
        assert price is not None, b.model
        total += cost_nanos(b.usage, price)
    return Decimal(total) / NANOS_PER_USD


@pytest.mark.parametrize("flag", ["true", 1, "yes"], ids=["string-true", "one", "yes"])
def test_stream_flag_a_lenient_provider_streams_for_is_metered(stack: Stack, flag: object) -> None:
    """The provider streams for ``"stream": "true"``: spendgate asks it for
    usage (stream_options) and meters the stream exactly."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    p = user_policy(stack, user, amount="1000", action=pb.ACTION_ALERT)
    r = httpx.post(
        stack.envoy.base_url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": flag},
        headers={"x-spendgate-user": user, "x-fake-completion-tokens": "300", **OPENAI_AUTH},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.rstrip().endswith("data: [DONE]")
    assert len(stack.provider.log.billed) == 1  # usage was asked for and reported
    expected = billed(stack)
    wait_until(lambda: spent(stack, p.id) == expected, message=f"spend {expected}")


def test_empty_body_is_admission_checked(stack: Stack) -> None:
    headers = spent_budget(stack)
    url = stack.envoy.base_url + "/v1/chat/completions"
    r = httpx.post(url, headers={**headers, **OPENAI_AUTH})
    assert r.status_code == 429
    before = stack.ext.ctx.stats.unparsed_requests
    r = httpx.post(url, headers=OPENAI_AUTH)  # no budget: the provider says 400
    assert r.status_code == 400
    assert stack.ext.ctx.stats.unparsed_requests == before + 1


# ---- cut streams charge their input ------------------------------------------------------

CONVERSE = "anthropic.claude-3-5-haiku-20241022-v1:0"
FLASH = "gemini-2.5-flash"


def cut_stream(
    stack: Stack, path: str, body: bytes, headers: dict[str, str], by: str, *, events: int
) -> None:
    """Stream ``path`` and have the stream cut after ``events`` events (the
    last of them the first text): by the provider (it drops the connection)
    or by the client (it hangs up)."""
    gate = uuid.uuid4().hex
    headers = {**headers, "x-fake-gate": gate, "content-type": "application/json"}
    if by == "provider":
        headers["x-fake-cut-after"] = str(events - 1)
    for _ in range(events - 1):  # the first event goes at once, the others on the gate
        stack.provider.open_gate(gate)
    received = b""
    try:
        with httpx.stream("POST", stack.envoy.base_url + path, content=body, headers=headers) as r:
            assert r.status_code == 200
            for part in r.iter_bytes():
                received += part
                if by == "client" and b"word0" in received:
                    break  # hang up after the first text
    except httpx.HTTPError:
        assert by == "provider"
    assert b"word0" in received and b"word1" not in received
    stack.provider.open_gate(gate)  # let a provider still waiting find the connection gone


@pytest.mark.parametrize("by", ["client", "provider"])
def test_cut_bedrock_stream_is_charged_the_input_it_carried(stack: Stack, by: str) -> None:
    """Bedrock never reported the input: it is estimated from the request
    body's size (content-length), the output from the text streamed."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    p = user_policy(stack, user, amount="1000", action=pb.ACTION_ALERT)
    before = stack.ext.ctx.stats.estimated_responses
    body = json.dumps(
        {"messages": [{"role": "user", "content": [{"text": "how much " * 200}]}]}
    ).encode()
    path = f"/model/{CONVERSE}/converse-stream"
    cut_stream(stack, path, body, {"x-spendgate-user": user, **BEDROCK_AUTH}, by, events=2)
    usage = Usage(input_tokens=-(-len(body) // 4), output_tokens=2, estimated=True)  # "word0 "
    price = PRICES.lookup(CONVERSE, "bedrock")
    assert price is not None
    expected = Decimal(cost_nanos(usage, price)) / NANOS_PER_USD
    wait_until(lambda: spent(stack, p.id) == expected, message=f"spend {expected}")
    assert stack.ext.ctx.stats.estimated_responses == before + 1
    assert stack.provider.log.billed == []  # the provider never reported usage


@pytest.mark.parametrize("by", ["client", "provider"])
def test_cut_gemini_stream_is_charged_the_input_it_carried(stack: Stack, by: str) -> None:
    """Gemini's first chunk reports the prompt: that input is charged, with
    the output estimated from the text streamed."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    p = user_policy(stack, user, amount="1000", action=pb.ACTION_ALERT)
    body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "how much"}]}]}).encode()
    path = f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse"
    headers = {"x-spendgate-user": user, "x-fake-prompt-tokens": "1200", **GEMINI_AUTH}
    cut_stream(stack, path, body, headers, by, events=1)
    usage = Usage(input_tokens=1200, output_tokens=2, estimated=True)
    price = PRICES.lookup(FLASH, "google")
    assert price is not None
    expected = Decimal(cost_nanos(usage, price)) / NANOS_PER_USD
    wait_until(lambda: spent(stack, p.id) == expected, message=f"spend {expected}")


def test_request_the_client_gave_up_on_is_charged_its_input(stack: Stack) -> None:
    """A client timeout before any answer: the provider bills the work all the
    same (a retry storm of timeouts is not free), so the prompt is charged."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    p = user_policy(stack, user, amount="1000", action=pb.ACTION_ALERT)
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 400}]})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            stack.envoy.base_url + "/v1/chat/completions",
            content=body,
            headers={
                "x-spendgate-user": user,
                "content-type": "application/json",
                "x-fake-delay-ms": "3000",
                **OPENAI_AUTH,
            },
            timeout=httpx.Timeout(5, read=0.5),
        )
    usage = Usage(input_tokens=-(-len(body) // 4), output_tokens=0, estimated=True)
    price = PRICES.lookup("gpt-4o", "openai")
    assert price is not None
    expected = Decimal(cost_nanos(usage, price)) / NANOS_PER_USD
    wait_until(lambda: spent(stack, p.id) == expected, message=f"spend {expected}")
