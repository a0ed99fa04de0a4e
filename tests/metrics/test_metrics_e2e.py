"""Real requests through Envoy move both services' /metrics by exactly what
happened: requests admitted and rejected, tokens and dollars the fake
provider billed, spend as ListSpend reports it, events and webhooks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from spendgate.domain.pricing import NANOS_PER_USD, PriceBook, cost_nanos
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack
from tests.harness import wait_until
from tests.metrics.conftest import MetricsStack
from tests.metrics.scrape import Scrape

pytestmark = pytest.mark.e2e
PRICES = PriceBook.bundled()
# A gpt-4o-mini answer with these knobs costs 1000 x $0.15/M + 500 x $0.60/M = $0.00045.
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello metrics"}]}
GPT4O_MINI = {"provider": "openai", "api": "openai_chat", "model": "gpt-4o-mini"}


@pytest.fixture(autouse=True)
def clean(metrics_stack: MetricsStack) -> Iterator[None]:
    stack = metrics_stack.stack
    stack.provider.log.clear()
    yield
    resp = stack.budgets.ListBudgetPolicies(
        pb.ListBudgetPoliciesRequest(page_size=1000), metadata=stack.admin
    )
    for p in resp.policies:
        stack.budgets.DeleteBudgetPolicy(
            pb.DeleteBudgetPolicyRequest(id=p.id), metadata=stack.admin
        )
    wait_until(lambda: len(stack.ext.state.index) == 0, message="policies gone from ext_proc")


def create(stack: Stack, **fields: object) -> pb.BudgetPolicy:
    policy = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name=f"metrics-{uuid.uuid4().hex[:6]}",
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                **fields,  # type: ignore[arg-type]
            )
        ),
        metadata=stack.admin,
    )
    wait_until(
        lambda: policy.id in stack.ext.state.index.policies, message="policy reaches ext_proc"
    )
    return policy


def chat(stack: Stack, user: str, body: dict[str, object] = CHAT) -> int:
    resp = httpx.post(
        stack.envoy.base_url + "/v1/chat/completions",
        json=body,
        headers={"authorization": "Bearer sk-test", "x-spendgate-user": user, **BIG},
        timeout=30,
    )
    return resp.status_code


def spend_entries(stack: Stack, policy_id: str) -> list[pb.SpendEntry]:
    resp = stack.budgets.ListSpend(pb.ListSpendRequest(policy_id=policy_id), metadata=stack.admin)
    return list(resp.entries)


def billed_nanos(stack: Stack) -> int:
    total = 0
    for b in stack.provider.log.billed:
        price = PRICES.lookup(b.model)
        assert price is not None
        total += cost_nanos(b.usage, price)
    return total


def delta(after: Scrape, before: Scrape, sample: str, **labels: str) -> float:
    return after.value(sample, **labels) - before.value(sample, **labels)


def test_counters_move_by_exactly_the_traffic_sent(metrics_stack: MetricsStack) -> None:
    stack, receiver = metrics_stack.stack, metrics_stack.receiver
    ep0, cp0 = metrics_stack.ext_proc(), metrics_stack.control_plane()
    sent_hooks = len(receiver.received())
    user = f"alice-{uuid.uuid4().hex[:6]}"
    policy = create(
        stack,
        amount_usd="0.0018",  # four answers of $0.00045
        action=pb.ACTION_REJECT,
        scope=pb.SCOPE_USER,
        target=user,
        alert_thresholds=[50],
    )
    assert [chat(stack, user) for _ in range(4)] == [200] * 4
    wait_until(
        lambda: (
            [Decimal(e.spent_usd) for e in spend_entries(stack, policy.id)] == [Decimal("0.0018")]
        ),
        message="the control plane has all four",
    )
    assert chat(stack, user) == 429

    def ext_proc_done() -> Scrape | None:
        s = metrics_stack.ext_proc()  # a request is counted as admitted when it ends
        return s if delta(s, ep0, "spendgate_ext_proc_requests_admitted_total") == 4 else None

    ep1 = wait_until(ext_proc_done, message="4 admitted requests counted")
    receiver.wait_for(sent_hooks + 2)  # threshold_crossed 50 %, then exceeded

    def control_plane_done() -> Scrape | None:
        s = metrics_stack.control_plane()
        done = s.value("spendgate_webhook_attempts_total", outcome="delivered")
        return (
            s
            if done - cp0.value("spendgate_webhook_attempts_total", outcome="delivered") == 2
            else None
        )

    cp1 = wait_until(control_plane_done, message="2 webhook attempts counted")

    # ext_proc: requests, tokens and dollars.
    assert delta(ep1, ep0, "spendgate_ext_proc_requests_admitted_total") == 4
    rejected = {"policy_id": policy.id, "reason": "budget_exceeded"}
    assert delta(ep1, ep0, "spendgate_ext_proc_requests_rejected_total", **rejected) == 1
    assert [
        labels
        for labels in ep1.labels_of("spendgate_ext_proc_requests_rejected_total")
        if labels.get("policy_id") == policy.id
    ] == [rejected]
    billed = stack.provider.log.billed
    assert len(billed) == 4  # the 429 never reached the provider
    tokens = "spendgate_ext_proc_tokens_total"
    input_tokens = sum(b.usage.input_tokens or 0 for b in billed)
    output_tokens = sum(b.usage.output_tokens or 0 for b in billed)
    assert (input_tokens, output_tokens) == (4000, 2000)
    assert delta(ep1, ep0, tokens, **GPT4O_MINI, direction="input") == input_tokens
    assert delta(ep1, ep0, tokens, **GPT4O_MINI, direction="output") == output_tokens
    usd = delta(ep1, ep0, "spendgate_ext_proc_cost_usd_total", **GPT4O_MINI)
    assert billed_nanos(stack) == 1_800_000  # $0.0018
    assert usd == pytest.approx(billed_nanos(stack) / NANOS_PER_USD, abs=1e-12)
    assert delta(ep1, ep0, "spendgate_ext_proc_metered_responses_total", **GPT4O_MINI) == 4
    assert delta(ep1, ep0, "spendgate_ext_proc_responses_total", result="metered") == 4
    for result in ("unmetered", "provider_error"):
        assert delta(ep1, ep0, "spendgate_ext_proc_responses_total", result=result) == 0
    assert delta(ep1, ep0, "spendgate_ext_proc_internal_errors_total") == 0
    # Every request's headers were decided on; the rejected one got no further.
    latency = "spendgate_ext_proc_decision_duration_seconds_count"
    assert delta(ep1, ep0, latency, phase="request_headers") == 5
    assert delta(ep1, ep0, latency, phase="request_body") == 4
    assert ep1.value("spendgate_ext_proc_control_plane_connected") == 1
    assert ep1.value("spendgate_ext_proc_sync_lag_seconds") == 0
    assert ep1.value("spendgate_ext_proc_policies") == 1
    assert ep1.value("spendgate_ext_proc_requests_in_flight") == 0
    assert ep1.value("spendgate_ext_proc_reserved_usd") == 0

    # Control plane: the gauges say what ListSpend says.
    [entry] = spend_entries(stack, policy.id)
    p = {"policy_id": policy.id}
    assert cp1.value("spendgate_policy_spend_usd", **p) == float(Decimal(entry.spent_usd))
    assert cp1.value("spendgate_policy_limit_usd", **p) == float(Decimal(entry.limit_usd))
    assert cp1.value("spendgate_policy_remaining_ratio", **p) == 0
    assert cp1.value("spendgate_policy_window_requests", **p) == entry.request_count == 4
    assert cp1.value("spendgate_policy_members_exceeded", **p) == 1
    window_end = cp1.value("spendgate_policy_window_end_timestamp_seconds", **p)
    assert window_end == entry.window_end.seconds
    info = {**p, "name": policy.name, "scope": "USER", "action": "REJECT", "enabled": "true"}
    assert cp1.value("spendgate_policy_info", **info) == 1
    events = "spendgate_budget_events_total"
    assert delta(cp1, cp0, events, type="budget_policy.threshold_crossed") == 1
    assert delta(cp1, cp0, events, type="budget_policy.exceeded") == 1
    assert delta(cp1, cp0, "spendgate_webhook_deliveries", state="delivered") == 2
    assert cp1.value("spendgate_webhook_deliveries", state="pending") == 0
    for outcome in ("retry", "failed"):
        assert delta(cp1, cp0, "spendgate_webhook_attempts_total", outcome=outcome) == 0
    assert delta(cp1, cp0, "spendgate_webhook_attempt_duration_seconds_count") == 2
    applied = delta(cp1, cp0, "spendgate_usage_batches_total", result="applied")
    assert applied >= 1  # how usage is batched depends on timing (and holds)
    assert delta(cp1, cp0, "spendgate_usage_batches_total", result="duplicate") == 0
    # One policy, so one record (its window) per batch that carried usage.
    assert 1 <= delta(cp1, cp0, "spendgate_usage_records_total") <= applied
    store = "spendgate_store_operation_duration_seconds_count"
    assert delta(cp1, cp0, store, operation="apply_usage") >= applied
    assert cp1.value("spendgate_data_planes_connected") == 1
    assert cp1.value("spendgate_database_up") == 1


def test_wildcard_policy_gauges_show_the_member_closest_to_its_limit(
    metrics_stack: MetricsStack,
) -> None:
    stack = metrics_stack.stack
    tag = uuid.uuid4().hex[:6]
    policy = create(
        stack,
        amount_usd="0.0018",
        action=pb.ACTION_ALERT,
        scope=pb.SCOPE_USER,
        target="*",
    )
    for user, requests in ((f"ann-{tag}", 2), (f"bob-{tag}", 1)):
        assert [chat(stack, user) for _ in range(requests)] == [200] * requests

    def settled() -> list[pb.SpendEntry] | None:
        entries = spend_entries(stack, policy.id)
        return entries if sum(e.request_count for e in entries) == 3 else None

    entries = wait_until(settled, message="three requests at the control plane")
    largest = max(Decimal(e.spent_usd) for e in entries)
    assert largest == Decimal("0.0009")
    cp = metrics_stack.control_plane()
    p = {"policy_id": policy.id}
    assert cp.value("spendgate_policy_spend_usd", **p) == float(largest)
    assert cp.value("spendgate_policy_remaining_ratio", **p) == 0.5
    assert cp.value("spendgate_policy_window_requests", **p) == 3
    assert cp.value("spendgate_policy_members_exceeded", **p) == 0
    # Members are never labels.
    for family in cp.families.values():
        for sample in family.samples:
            assert tag not in "".join(sample.labels.values()), sample


def test_a_model_without_a_price_is_labelled_unpriced(metrics_stack: MetricsStack) -> None:
    stack = metrics_stack.stack
    before = metrics_stack.ext_proc()
    model = f"house-model-{uuid.uuid4().hex[:6]}"
    assert chat(stack, "carol", {**CHAT, "model": model}) == 200

    def counted() -> Scrape | None:
        s = metrics_stack.ext_proc()
        moved = delta(s, before, "spendgate_ext_proc_responses_unpriced_total") == 1
        return (
            s if moved and delta(s, before, "spendgate_ext_proc_requests_admitted_total") else None
        )

    after = wait_until(counted, message="the unpriced response counted")
    unpriced = {"provider": "openai", "api": "openai_chat", "model": "unpriced"}
    tokens = "spendgate_ext_proc_tokens_total"
    assert delta(after, before, tokens, **unpriced, direction="input") == 1000
    assert delta(after, before, tokens, **unpriced, direction="output") == 500
    # Charged at the (deliberately high) default price: $15 / $75 per million.
    usd = delta(after, before, "spendgate_ext_proc_cost_usd_total", **unpriced)
    assert usd == pytest.approx(0.0525, abs=1e-12)
    assert all(model not in str(labels) for labels in after.labels_of(tokens))
