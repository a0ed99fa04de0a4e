"""A budget full of running requests' holds is not a spent budget, through a
real Envoy with the official SDKs:

* while one long streaming request holds the rest of a REJECT budget whose
  spend is under its limit, the next request gets the *held* 429:
  ``retry-after`` of ``held_retry_after_s``, ``x-should-retry: true``,
  ``budget_held`` as error code, header and metric reason;
* the openai SDK (``max_retries`` above 0) retries it by itself, and its call
  succeeds once the stream ends (its real cost is far below its hold);
* a spent budget still answers the window's reset and
  ``x-should-retry: false``: the SDK gives up after one attempt whatever its
  ``max_retries``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import anthropic
import openai
import pytest

from spendgate.domain.pricing import PriceBook, cost_nanos, format_usd
from spendgate.domain.usage import Usage
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack, start_stack, stop_stack
from tests.e2e.budgets import create_policy
from tests.e2e.streams import GatedStream
from tests.harness import FakeClock, wait_until

pytestmark = pytest.mark.e2e
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "hello spendgate"}]
NOON = datetime(2026, 6, 15, 12, tzinfo=UTC)  # the clock stands still: 12 h to the reset
LIMIT = 100_000  # $0.0001: a request's hold (capped at the limit) fills it
# Answers of 1 + 1 tokens cost far less than what they hold.
CHEAP = {"x-fake-prompt-tokens": "1", "x-fake-completion-tokens": "1"}
PRICE = PriceBook.bundled().lookup(MODEL)
assert PRICE is not None
CHEAP_COST = cost_nanos(Usage(input_tokens=1, output_tokens=1), PRICE)
RETRY_AFTER_S = 1


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = start_stack(clock=FakeClock(NOON), ext_proc={"held_retry_after_s": RETRY_AFTER_S})
    yield s
    stop_stack(s)


def budget(stack: Stack, user: str) -> pb.BudgetPolicy:
    return create_policy(
        stack,
        amount_usd=format_usd(LIMIT).removeprefix("$"),
        scope=pb.SCOPE_USER,
        target=user,
    )


def client(stack: Stack, user: str, max_retries: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": user, **CHEAP},
        max_retries=max_retries,
    )


def rejections(stack: Stack, policy_id: str, reason: str) -> int:
    return stack.ext.ctx.stats.rejections.get((policy_id, reason), 0)


class Call:
    """``fn`` on a thread of its own; ``result()`` waits for what it returned or raised."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn
        self.outcome: list[object] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.outcome.append(self.fn())
        except BaseException as e:
            self.outcome.append(e)

    def result(self) -> object:
        self.thread.join(60)
        assert not self.thread.is_alive()
        (out,) = self.outcome
        return out


def provider_calls(stack: Stack) -> int:
    with stack.provider.log.lock:
        return len(stack.provider.log.requests)


def test_a_held_budget_asks_for_a_retry_and_the_sdk_gets_through(stack: Stack) -> None:
    user = f"held-{uuid.uuid4().hex[:6]}"
    p = budget(stack, user)
    long = GatedStream(stack, client(stack, user, 0))
    try:
        wait_until(lambda: stack.ext.state.holding_requests == 1, message="the stream holds")
        (key,) = stack.ext.state.reserved
        assert stack.ext.state.held(key) == (LIMIT, 1)
        assert stack.ext.state.spent(key) == LIMIT  # all of it held, nothing spent

        with pytest.raises(openai.RateLimitError) as raised:
            client(stack, user, 0).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        e = raised.value
        message = (
            f"Budget held by 1 request in flight: policy '{p.name}' ({p.id}) allows $0.0001 "
            "per 1 day; $0.00 spent; $0.0001 more held by 1 request in flight. Retry "
            "shortly: room comes back as those requests end within the budget (the window "
            "resets at 2026-06-16T00:00:00Z)."
        )
        assert e.body == {
            "message": message,
            "type": "budget_held",
            "param": None,
            "code": "budget_held",
        }
        headers = e.response.headers
        assert headers["retry-after"] == str(RETRY_AFTER_S)
        assert headers["x-should-retry"] == "true"
        assert headers["x-spendgate-error"] == "budget_held"
        assert headers["x-spendgate-reset"] == "2026-06-16T00:00:00Z"
        assert rejections(stack, p.id, "budget_held") == 1
        assert rejections(stack, p.id, "budget_exceeded") == 0

        # The SDK at max_retries 8 meets the held 429, waits retry-after and
        # tries again by itself; the stream ends meanwhile.
        calls_before = provider_calls(stack)
        sdk = client(stack, user, 8)
        caller = Call(lambda: sdk.chat.completions.create(model=MODEL, messages=MESSAGES))  # type: ignore[arg-type]
        wait_until(
            lambda: rejections(stack, p.id, "budget_held") == 2, message="the SDK met the 429"
        )
    finally:
        assert long.finish() is None
    answer = caller.result()
    assert isinstance(answer, openai.types.chat.ChatCompletion), answer
    # 1 to 8 held 429s, then the provider once: the SDK's attempts, none of them ours.
    assert 2 <= rejections(stack, p.id, "budget_held") <= 9
    assert provider_calls(stack) == calls_before + 1
    assert rejections(stack, p.id, "budget_exceeded") == 0
    wait_until(
        lambda: stack.ext.state.spent(key) == 2 * CHEAP_COST,
        message="both answers charged at their real cost",
    )
    assert stack.ext.state.reserved == {}


def test_a_spent_budget_still_makes_the_sdk_give_up_at_once(stack: Stack) -> None:
    user = f"spent-{uuid.uuid4().hex[:6]}"
    p = budget(stack, user)
    # One answer costing more than the limit crosses the line.
    client(stack, user, 0).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_headers={"x-fake-completion-tokens": "1000"},
    )
    c = client(stack, user, 8)
    rejected = stack.ext.ctx.stats.rejected_requests
    with pytest.raises(openai.RateLimitError) as raised:
        c.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert stack.ext.ctx.stats.rejected_requests == rejected + 1  # one attempt of 9
    e = raised.value
    assert e.code == "budget_exceeded"
    assert e.response.headers["retry-after"] == str(12 * 3600)
    assert e.response.headers["x-should-retry"] == "false"
    assert e.response.headers["x-spendgate-error"] == "budget_exceeded"
    assert rejections(stack, p.id, "budget_exceeded") == 1
    assert rejections(stack, p.id, "budget_held") == 0


def test_anthropic_sdk_retries_a_held_budget(stack: Stack) -> None:
    """The anthropic SDK reads the same headers: it retries the held 429 and
    gets through once the holding stream ends."""
    user = f"held-a-{uuid.uuid4().hex[:6]}"
    p = budget(stack, user)
    long = GatedStream(stack, client(stack, user, 0))
    try:
        wait_until(lambda: stack.ext.state.holding_requests == 1, message="the stream holds")
        sdk = anthropic.Anthropic(
            base_url=stack.envoy.base_url,
            api_key="sk-ant-test",
            default_headers={"x-spendgate-user": user, **CHEAP},
            max_retries=8,
        )
        caller = Call(
            lambda: sdk.messages.create(
                model="claude-3-5-haiku-latest",
                max_tokens=10,
                messages=MESSAGES,  # type: ignore[arg-type]
            )
        )
        wait_until(
            lambda: rejections(stack, p.id, "budget_held") >= 1, message="the SDK met the 429"
        )
    finally:
        assert long.finish() is None
    answer = caller.result()
    assert isinstance(answer, anthropic.types.Message), answer
    assert 1 <= rejections(stack, p.id, "budget_held") <= 9
