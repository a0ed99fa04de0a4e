"""No usage record stops usage delivery (issue 12, item 2), through the real
Envoy with the official OpenAI SDK, on SQLite and PostgreSQL.

* A provider answer reporting 99,999,999,999,999,999 completion tokens used
  to overflow int64 ``cost_nanos`` inside the flush task and stop all usage
  delivery: now it is charged saturated, raises a ``usage.anomaly`` event, and
  a normal request afterwards is delivered with its exact cost.
* A 5 MB model name under a MODEL ``*`` policy made a batch over gRPC's 4 MB
  limit that was retried forever: model names are now bounded at the door
  (tests/e2e/test_limits_data_path.py); a record too large to send that is
  already in a journal is quarantined (tests/durability/test_poison_journal.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest

from spendgate.cli.main import main
from spendgate.domain.pricing import MAX_COST_NANOS, NANOS_PER_USD, PriceBook, cost_nanos
from spendgate.domain.usage import Usage
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.v1 import webhooks_pb2_grpc
from tests.conftest import Stack, start_stack, stop_stack
from tests.harness import READ_TOKEN, grpc_channel, wait_until

pytestmark = pytest.mark.e2e
PRICES = PriceBook.bundled()
DAY = pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1)


@pytest.fixture
def stack(db_url: str) -> Iterator[Stack]:
    s = start_stack(db_url)
    yield s
    stop_stack(s)


def client(stack: Stack, user: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": user, **headers},
        max_retries=0,
    )


def chat(c: openai.OpenAI, model: str = "gpt-4o") -> None:
    c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    c.close()


def create(stack: Stack, **fields: object) -> pb.BudgetPolicy:
    p = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(policy=pb.BudgetPolicy(window=DAY, **fields)),  # type: ignore[arg-type]
        metadata=stack.admin,
    )
    wait_until(lambda: p.id in stack.ext.state.index.policies, message="policy reaches ext_proc")
    return p


def spent(stack: Stack, policy_id: str, member: str) -> Decimal | None:
    resp = stack.budgets.ListSpend(
        pb.ListSpendRequest(policy_id=policy_id, member=member), metadata=stack.admin
    )
    entry = next((e for e in resp.entries if e.member == member), None)
    return None if entry is None else Decimal(entry.spent_usd)


def billed(stack: Stack, model: str, usage: Usage) -> Decimal:
    price = PRICES.lookup(model)
    assert price is not None
    return Decimal(cost_nanos(usage, price)) / NANOS_PER_USD


def status_lines(stack: Stack, capsys: pytest.CaptureFixture[str]) -> list[str]:
    server = f"127.0.0.1:{stack.cp.port}"
    assert main(["status", "--server", server, "--token", READ_TOKEN]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Log lines of the in-process services share stdout: the view starts here.
    return lines[next(i for i, line in enumerate(lines) if line.startswith("spendgate status")) :]


def test_absurd_token_counts_are_charged_saturated_and_usage_keeps_flowing(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    users = create(
        stack,
        name="each user",
        amount_usd="10",
        action=pb.ACTION_ALERT,
        scope=pb.SCOPE_USER,
        target="*",
    )
    chat(client(stack, "mallory", **{"x-fake-completion-tokens": "99999999999999999"}))
    # 200 million output tokens of gpt-4o: $2,000, above the default $1,000 maximum.
    chat(client(stack, "trudy", **{"x-fake-completion-tokens": "200000000"}))
    chat(client(stack, "alice"))
    normal = stack.provider.log.billed[-1]
    assert normal.usage.output_tokens == 16

    max_usd = Decimal(MAX_COST_NANOS) / NANOS_PER_USD
    wait_until(lambda: spent(stack, users.id, "mallory") == max_usd, message="saturated charge")
    trudy = stack.provider.log.billed[1]
    wait_until(
        lambda: spent(stack, users.id, "trudy") == billed(stack, "gpt-4o", trudy.usage),
        message="the $2,000 answer is charged in full",
    )
    wait_until(
        lambda: spent(stack, users.id, "alice") == billed(stack, "gpt-4o", normal.usage),
        message="the normal request afterwards is delivered, exact",
    )
    assert stack.ext.sync.backlog is False

    webhooks = webhooks_pb2_grpc.WebhookServiceStub(grpc_channel(stack.cp.port))
    listed = webhooks.ListEvents(wpb.ListEventsRequest(type="usage.anomaly"), metadata=stack.admin)
    reasons = sorted(e.anomaly.reason for e in listed.events)
    assert reasons == ["cost_above_maximum", "cost_saturated"]
    saturated = next(e for e in listed.events if e.anomaly.reason == "cost_saturated")
    assert saturated.type == "usage.anomaly"
    assert saturated.anomaly.output_tokens == "99999999999999999"
    assert Decimal(saturated.anomaly.charged_usd) == max_usd
    assert Decimal(saturated.anomaly.reported_cost_usd) > max_usd
    assert saturated.anomaly.policy_ids == [users.id]
    # Unfiltered, ListEvents lists them too.
    every = webhooks.ListEvents(wpb.ListEventsRequest(), metadata=stack.admin)
    assert sum(e.type == "usage.anomaly" for e in every.events) == 2
    assert stack.ext.ctx.stats.anomalies == {"cost_above_maximum": 1, "cost_saturated": 1}

    # spendgate status says so at the top, before the policies.
    lines = status_lines(stack, capsys)
    assert lines[1] == "! usage anomalies (latest 2)"
    assert "output tokens), charged $9223372036.854775807; cost saturated" in lines[3]
    assert "(99999999999999999 output tokens)" in lines[3]
    assert lines[4] == "1 policy: 1 EXCEEDED"
