"""End to end: the official SDK through a real Envoy and ext_proc crosses an
ALERT policy's 50 % and 100 % thresholds; a local receiver gets the events,
signed and in order, while traffic keeps flowing."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest
from standardwebhooks import Webhook as StandardWebhook

from control_plane.webhooks.signing import new_secret
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.v1 import webhooks_pb2_grpc
from tests.conftest import Stack, stop_stack
from tests.harness import grpc_channel, wait_until
from tests.webhooks.conftest import start_stack_with_webhooks
from tests.webhooks.receiver import Receiver

pytestmark = pytest.mark.e2e
# With these fake-provider knobs a gpt-4o-mini response costs exactly $0.00045.
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = start_stack_with_webhooks()
    yield s
    stop_stack(s)


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    """Closed after the test: a client left to the garbage collector leaves
    its keep-alive socket open until some later test happens to collect it."""
    with openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1", api_key="sk-test", default_headers=BIG, max_retries=0
    ) as client:
        yield client


def test_threshold_and_exceeded_events_arrive_in_order_while_traffic_flows(
    stack: Stack, receiver: Receiver, client: openai.OpenAI
) -> None:
    secret = new_secret()
    webhooks = webhooks_pb2_grpc.WebhookServiceStub(grpc_channel(stack.cp.port))
    webhooks.CreateWebhook(
        wpb.CreateWebhookRequest(
            webhook=wpb.Webhook(
                name="ops", format=wpb.WEBHOOK_FORMAT_GENERIC, url=receiver.url, secret=secret
            )
        ),
        metadata=stack.admin,
        timeout=10,
    )
    policy = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name="team alert",
                amount_usd="0.0009",  # two requests
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                action=pb.ACTION_ALERT,
                scope=pb.SCOPE_GLOBAL,
                alert_thresholds=[50, 100],
            )
        ),
        metadata=stack.admin,
        timeout=10,
    )
    wait_until(lambda: policy.id in stack.ext.state.index.policies, message="policy in ext_proc")
    for _ in range(4):  # $0.00045 each: 50 % after one, 100 % after two, then beyond
        reply = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
        assert reply.status_code == 200  # ALERT: traffic keeps flowing
    got = receiver.wait_for(3)
    bodies = [StandardWebhook(secret).verify(r.body, r.headers) for r in got]
    assert [(b["action"], b["data"].get("threshold_percent")) for b in bodies] == [
        ("threshold_crossed", 50),
        ("threshold_crossed", 100),
        ("exceeded", None),
    ]
    # Each event carries the spend of the window when it was recorded: at
    # least its level, never less than the one before.
    spent = [Decimal(b["data"]["spent_usd"]) for b in bodies]
    assert spent == sorted(spent)
    assert spent[0] >= Decimal("0.00045") and spent[1] >= Decimal("0.0009") <= spent[2]
    assert {b["data"]["policy_id"] for b in bodies} == {policy.id}
    assert {b["data"]["action"] for b in bodies} == {"alert"}
    # Nothing more arrives: each crossing once.
    for _ in range(2):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
    stack.loop.run(stack.cp.dispatcher.run_until_idle())
    assert len(receiver.received()) == 3
