"""End to end: official SDK → real Envoy → ext_proc → fake provider, with the
control plane recording spend. One stack per module; each test uses its own
policies (deleted afterwards) and its own caller identity."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import httpx
import openai
import pytest

from spendgate.domain.pricing import NANOS_PER_USD, PriceBook, cost_nanos, parse_usd
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack
from tests.harness import wait_until

pytestmark = pytest.mark.e2e
PRICES = PriceBook.bundled()
# With these fake-provider knobs a gpt-4o-mini response costs exactly
# 1000 x $0.15/M + 500 x $0.60/M = $0.00045.
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}
BIG_COST = Decimal("0.00045")


@pytest.fixture(autouse=True)
def clean_policies(stack: Stack) -> Iterator[None]:
    yield
    resp = stack.budgets.ListBudgetPolicies(
        pb.ListBudgetPoliciesRequest(page_size=1000), metadata=stack.admin
    )
    for p in resp.policies:
        stack.budgets.DeleteBudgetPolicy(
            pb.DeleteBudgetPolicyRequest(id=p.id), metadata=stack.admin
        )
    wait_until(lambda: len(stack.ext.state.index) == 0, message="policies gone from ext_proc")
    stack.provider.log.clear()


def create(stack: Stack, **fields: object) -> pb.BudgetPolicy:
    fields.setdefault("window", pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1))
    fields.setdefault("action", pb.ACTION_REJECT)
    fields.setdefault("name", f"test-{uuid.uuid4().hex[:6]}")
    policy = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(policy=pb.BudgetPolicy(**fields)),  # type: ignore[arg-type]
        metadata=stack.admin,
    )
    wait_until(
        lambda: policy.id in stack.ext.state.index.policies, message="policy reaches ext_proc"
    )
    return policy


def spend_of(stack: Stack, policy_id: str, member: str = "") -> pb.SpendEntry | None:
    resp = stack.budgets.ListSpend(
        pb.ListSpendRequest(policy_id=policy_id, member=member), metadata=stack.admin
    )
    return next((e for e in resp.entries if e.member == member), None)


def wait_for_spend(stack: Stack, policy_id: str, expected: Decimal, member: str = "") -> None:
    def reached() -> bool:
        e = spend_of(stack, policy_id, member)
        return e is not None and Decimal(e.spent_usd) == expected

    try:
        wait_until(reached, message=f"control plane spend {expected}")
    except AssertionError:
        raise AssertionError(
            f"spend is {spend_of(stack, policy_id, member)}, want {expected}"
        ) from None


def sdk(
    stack: Stack,
    *,
    user: str = "",
    key: str = "sk-test",
    prefix: str = "/v1",
    headers: dict[str, str] | None = None,
) -> openai.OpenAI:
    extra = {"x-spendgate-user": user} if user else {}
    return openai.OpenAI(
        base_url=stack.envoy.base_url + prefix,
        api_key=key,
        default_headers={**extra, **(headers or {})},
        max_retries=2,
    )


def billed_cost(stack: Stack) -> Decimal:
    """What the fake provider billed, priced exactly from the catalog."""
    total = 0
    for b in stack.provider.log.billed:
        price = PRICES.lookup(b.model)
        assert price is not None
        total += cost_nanos(b.usage, price)
    return Decimal(total) / NANOS_PER_USD


def chat(client: openai.OpenAI, model: str = "gpt-4o-mini", **kw: object) -> object:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hello spendgate"}],
        **kw,  # type: ignore[arg-type]
    )


def test_reject_budget_returns_429_that_the_openai_sdk_understands(stack: Stack) -> None:
    user = f"alice-{uuid.uuid4().hex[:6]}"
    policy = create(
        stack, name="alice-daily", amount_usd="0.0018", scope=pb.SCOPE_USER, target=user
    )
    client = sdk(stack, user=user, headers=BIG)
    for _ in range(4):  # 4 x $0.00045 = $0.0018: the 4th reaches the limit
        chat(client)
    with pytest.raises(openai.RateLimitError) as exc:
        chat(client)
    err = exc.value
    assert err.status_code == 429
    body = err.body
    assert isinstance(body, dict)
    assert body["type"] == "budget_exceeded" and body["code"] == "budget_exceeded"
    message = body["message"]
    assert "'alice-daily'" in message and policy.id in message
    assert "allows $0.0018 per 1 day; $0.0018 spent" in message
    assert "resets at" in message and message in str(err)
    headers = err.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-spendgate-policy"] == policy.id
    assert headers["x-should-retry"] == "false"
    # The SDK did not retry (max_retries=2): the provider saw only 4 requests.
    assert len(stack.provider.log.billed) == 4
    # Another user is not affected.
    chat(sdk(stack, user="bob", headers=BIG))
    # The control plane's spend is exactly what the provider billed for alice.
    assert billed_cost(stack) == BIG_COST * 5
    wait_for_spend(stack, policy.id, BIG_COST * 4)
    entry = spend_of(stack, policy.id)
    assert entry is not None and entry.exceeded and entry.request_count == 4
    assert entry.limit_usd == "0.0018" and entry.remaining_usd == "0.00"


def test_spend_equals_exact_sum_of_billed_usage(stack: Stack) -> None:
    policy = create(stack, amount_usd="100", scope=pb.SCOPE_GLOBAL, action=pb.ACTION_ALERT)
    client = sdk(stack)
    varied = [
        ("gpt-4o-mini", "17", "3", "0"),
        ("gpt-4o", "1234", "567", "1024"),
        ("gpt-4.1-nano", "5", "1", "0"),
        ("o3-mini", "999", "4321", "0"),
    ]
    for model, prompt, completion, cached in varied:
        chat(
            client,
            model=model,
            extra_headers={
                "x-fake-prompt-tokens": prompt,
                "x-fake-completion-tokens": completion,
                "x-fake-cached-tokens": cached,
            },
        )
        stream = chat(
            client,
            model=model,
            stream=True,
            extra_headers={"x-fake-prompt-tokens": prompt, "x-fake-completion-tokens": completion},
        )
        for _ in stream:  # type: ignore[attr-defined]
            pass
    assert len(stack.provider.log.billed) == 8
    expected = billed_cost(stack)
    assert expected > 0
    wait_for_spend(stack, policy.id, expected)
    assert stack.ext.ctx.stats.unpriced_responses == 0


def test_streaming_reaches_client_chunk_by_chunk_and_is_charged(stack: Stack) -> None:
    policy = create(stack, amount_usd="10", scope=pb.SCOPE_GLOBAL)
    gate = uuid.uuid4().hex
    client = sdk(stack, headers={"x-fake-gate": gate, "x-fake-chunks": "5", **BIG})
    # The provider sends each event only after the client has received the one
    # before: if Envoy or ext_proc buffered the stream, this would hang.
    received = []
    for event in chat(client, stream=True):  # type: ignore[attr-defined]
        stack.provider.open_gate(gate)
        if event.choices and event.choices[0].delta.content:
            received.append(event.choices[0].delta.content)
        elif not event.choices:
            assert event.usage is not None and event.usage.completion_tokens == 500
    assert received == [f"word{i} " for i in range(5)]
    sent = json.loads(stack.provider.log.requests[-1]["body"])
    assert sent["stream_options"] == {"include_usage": True}
    wait_for_spend(stack, policy.id, BIG_COST)


def test_alert_policy_never_blocks(stack: Stack) -> None:
    policy = create(stack, amount_usd="0.0001", scope=pb.SCOPE_GLOBAL, action=pb.ACTION_ALERT)
    client = sdk(stack, headers=BIG)
    for _ in range(3):
        chat(client)
    wait_for_spend(stack, policy.id, BIG_COST * 3)
    entry = spend_of(stack, policy.id)
    assert entry is not None and entry.exceeded


def test_new_window_admits_again(stack: Stack) -> None:
    user = f"carol-{uuid.uuid4().hex[:6]}"
    policy = create(
        stack,
        amount_usd="0.00045",
        scope=pb.SCOPE_USER,
        target=user,
        window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_HOURS, count=1),
    )
    client = sdk(stack, user=user, headers=BIG)
    chat(client)
    with pytest.raises(openai.RateLimitError):
        chat(client)
    wait_for_spend(stack, policy.id, BIG_COST)
    stack.clock.advance(timedelta(hours=1))
    chat(client)  # a new window: admitted, and counted from zero
    wait_for_spend(stack, policy.id, BIG_COST)
    with pytest.raises(openai.RateLimitError):
        chat(client)


@pytest.mark.parametrize(
    ("scope", "target", "blocked", "allowed"),
    [
        pytest.param(
            pb.SCOPE_ENDPOINT,
            "demo",
            {"prefix": "/demo/v1"},
            {"prefix": "/v1"},
            id="endpoint-route",
        ),
        pytest.param(
            pb.SCOPE_API_KEY,
            "sk-team-red",
            {"key": "sk-team-red"},
            {"key": "sk-team-blue"},
            id="api-key",
        ),
        pytest.param(
            pb.SCOPE_TAG,
            "team=*",
            {"headers": {"x-spendgate-tags": "team=red"}},
            {"headers": {"x-spendgate-tags": "team=blue"}},
            id="tag-wildcard",
        ),
        pytest.param(pb.SCOPE_USER, "*", {"user": "dave"}, {"user": "erin"}, id="user-wildcard"),
        pytest.param(
            pb.SCOPE_MODEL, "gpt-4o", {"model": "gpt-4o"}, {"model": "gpt-4o-mini"}, id="model"
        ),
    ],
)
def test_scopes_block_only_their_members(
    stack: Stack, scope: int, target: str, blocked: dict[str, object], allowed: dict[str, object]
) -> None:
    create(stack, amount_usd="0.000001", scope=scope, target=target)

    def client_for(spec: dict[str, object]) -> tuple[openai.OpenAI, str]:
        headers = {**BIG, **spec.get("headers", {})}  # type: ignore[dict-item]
        c = sdk(
            stack,
            user=str(spec.get("user", "")),
            key=str(spec.get("key", "sk-x")),
            prefix=str(spec.get("prefix", "/v1")),
            headers=headers,
        )
        return c, str(spec.get("model", "gpt-4o-mini"))

    blocked_client, blocked_model = client_for(blocked)
    allowed_client, allowed_model = client_for(allowed)
    chat(blocked_client, model=blocked_model)  # crosses the line, completes
    with pytest.raises(openai.RateLimitError):
        chat(blocked_client, model=blocked_model)
    # Not this member (or, for '*', a member with a budget of its own): admitted.
    chat(allowed_client, model=allowed_model)


def test_non_json_request_body_passes_through_and_ext_proc_keeps_serving(stack: Stack) -> None:
    r = httpx.post(
        stack.envoy.base_url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json", "authorization": "Bearer sk-test"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    chat(sdk(stack))


def test_truncated_stream_is_charged_an_estimate(stack: Stack) -> None:
    policy = create(stack, amount_usd="10", scope=pb.SCOPE_GLOBAL)
    before = stack.ext.ctx.stats.estimated_responses
    gate = uuid.uuid4().hex
    client = sdk(stack, headers={"x-fake-cut-after": "2", "x-fake-gate": gate}).with_options(
        max_retries=0
    )
    received = []
    with pytest.raises(openai.APIError):
        for event in chat(client, stream=True):  # type: ignore[attr-defined]
            stack.provider.open_gate(gate)  # after the 3rd event the provider hangs up
            if event.choices and event.choices[0].delta.content:
                received.append(event.choices[0].delta.content)
    assert received == ["word0 ", "word1 "]
    wait_until(
        lambda: stack.ext.ctx.stats.estimated_responses == before + 1, message="estimated charge"
    )
    assert stack.provider.log.billed == []  # the provider never reported usage
    wait_until(
        lambda: (e := spend_of(stack, policy.id)) is not None and e.spent_usd != "0.00",
        message="estimate reaches the control plane",
    )
    chat(sdk(stack))


def test_client_abort_mid_stream_is_still_charged(stack: Stack) -> None:
    policy = create(stack, amount_usd="10", scope=pb.SCOPE_GLOBAL)
    before = stack.ext.ctx.stats.estimated_responses
    gate = uuid.uuid4().hex
    stack.provider.open_gate(gate)
    with httpx.stream(
        "POST",
        stack.envoy.base_url + "/v1/chat/completions",
        json={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-fake-gate": gate, "authorization": "Bearer sk-test"},
    ) as r:
        for line in r.iter_lines():
            if "word0" in line:
                break  # hang up after the first content chunk
    stack.provider.open_gate(gate)
    wait_until(
        lambda: stack.ext.ctx.stats.estimated_responses == before + 1,
        message="aborted stream charged",
    )
    wait_until(
        lambda: (e := spend_of(stack, policy.id)) is not None and parse_usd(e.spent_usd) > 0,
        message="estimate recorded",
    )


def test_two_megabyte_request_body_is_metered(stack: Stack) -> None:
    policy = create(stack, amount_usd="10", scope=pb.SCOPE_GLOBAL, action=pb.ACTION_ALERT)
    words = "token " * 350_000  # ~2.1 MB of JSON
    resp = sdk(stack).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": words}], stream=True
    )
    for _ in resp:
        pass
    assert stack.provider.log.requests[-1]["body_bytes"] > 2_000_000
    assert stack.provider.log.billed[-1].prompt_tokens == 8 + 350_000
    wait_for_spend(stack, policy.id, billed_cost(stack))


def test_provider_error_costs_nothing(stack: Stack) -> None:
    policy = create(stack, amount_usd="10", scope=pb.SCOPE_GLOBAL)
    with pytest.raises(openai.InternalServerError):
        chat(sdk(stack, headers={"x-fake-status": "500"}).with_options(max_retries=0))
    chat(sdk(stack, headers=BIG))
    wait_for_spend(stack, policy.id, BIG_COST)


def test_price_change_applies_to_the_next_request(stack: Stack) -> None:
    from spendgate.v1 import pricing_pb2 as pp
    from spendgate.v1 import pricing_pb2_grpc
    from tests.harness import grpc_channel

    policy = create(stack, amount_usd="100", scope=pb.SCOPE_GLOBAL, action=pb.ACTION_ALERT)
    pricing = pricing_pb2_grpc.PricingServiceStub(grpc_channel(stack.cp.port))
    o = pricing.SetPriceOverride(
        pp.SetPriceOverrideRequest(
            override=pp.PriceOverride(
                model="gpt-4o-mini", price=pp.Price(input="100", output="200")
            )
        ),
        metadata=stack.admin,
    )

    def price_in_ext_proc() -> Decimal | None:
        found = stack.ext.ctx.prices.lookup("gpt-4o-mini-2024-07-18", "openai")
        return found.input if found else None

    wait_until(lambda: price_in_ext_proc() == Decimal(100), message="override reaches ext_proc")
    chat(sdk(stack, headers=BIG))  # 1000 x $100/M + 500 x $200/M
    wait_for_spend(stack, policy.id, Decimal("0.2"))
    pricing.DeletePriceOverride(pp.DeletePriceOverrideRequest(id=o.id), metadata=stack.admin)
    wait_until(lambda: price_in_ext_proc() == Decimal("0.15"), message="override removed")
    chat(sdk(stack, headers=BIG))  # back to the catalog price
    wait_for_spend(stack, policy.id, Decimal("0.2") + BIG_COST)


def burst(stack: Stack) -> tuple[int, Decimal]:
    """100 concurrent slow streams against a USER budget with room for ten;
    returns how many were admitted and what each answer costs."""
    from concurrent.futures import ThreadPoolExecutor

    user = f"burst-{uuid.uuid4().hex[:6]}"
    # Each answer: 10 prompt tokens ("hello spendgate" + 8) and 500 completion
    # tokens of gpt-4o-mini = $0.0003015; the budget holds ten.
    per_request = Decimal("0.0003015")
    create(stack, amount_usd=str(per_request * 10), scope=pb.SCOPE_USER, target=user)
    client = sdk(
        stack, user=user, headers={"x-fake-completion-tokens": "500", "x-fake-chunk-delay-ms": "30"}
    )

    def one(_: int) -> bool:
        try:
            for _ in chat(client.with_options(max_retries=0), stream=True, max_tokens=500):  # type: ignore[attr-defined]
                pass
            return True
        except openai.RateLimitError:
            return False

    with ThreadPoolExecutor(100) as pool:
        admitted = sum(pool.map(one, range(100)))
    assert billed_cost(stack) == per_request * admitted
    return admitted, per_request


def test_reservations_bound_concurrent_overshoot(stack: Stack) -> None:
    """Each admitted request holds its estimated cost while it runs, so at
    most the request that crosses the line goes beyond the budget."""
    admitted, _ = burst(stack)
    print(f"\nreservations on: {admitted} of 100 concurrent requests admitted (room for 10)")
    assert 1 <= admitted <= 11


def test_without_reservations_overshoot_is_bounded_only_by_what_is_in_flight() -> None:
    from tests.conftest import start_stack, stop_stack

    s = start_stack(ext_proc={"reservations": False})
    try:
        admitted, _ = burst(s)
    finally:
        stop_stack(s)
    print(f"\nreservations off: {admitted} of 100 concurrent requests admitted (room for 10)")
    # Every request in flight before the first answer was charged got in: far
    # past the one-request bound that reservations give.
    assert admitted > 11
