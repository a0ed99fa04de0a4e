"""Shadow policies (issue 15, item 1) through the real Envoy with the official
OpenAI SDK, on SQLite and PostgreSQL.

A SHADOW REJECT policy over its limit admits everything and counts exactly
the requests its enforced twin (same amount, same traffic, another user)
refuses; the control plane sums the count, raises one
``budget_policy.would_reject`` event per window and member, and ``status``
shows it; ``policy update --enforce`` promotes it with its spend kept, and the
next request is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest
from prometheus_client import generate_latest

from ext_proc.metrics import registry_for
from spendgate.cli.main import main
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.v1 import webhooks_pb2_grpc
from tests.conftest import Stack, start_stack, stop_stack
from tests.e2e.budgets import create_policy
from tests.harness import ADMIN_TOKEN, READ_TOKEN, grpc_channel, wait_until

pytestmark = pytest.mark.e2e
# A gpt-4o-mini answer with these fake-provider knobs costs exactly $0.00045.
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}
COST = Decimal("0.00045")


@pytest.fixture
def stack(db_url: str) -> Iterator[Stack]:
    s = start_stack(db_url)
    yield s
    stop_stack(s)


def client(stack: Stack, user: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": user, **BIG},
        max_retries=0,
    )


def chat(c: openai.OpenAI) -> None:
    c.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello spendgate"}]
    )


def get(stack: Stack, policy_id: str) -> pb.BudgetPolicy:
    return stack.budgets.GetBudgetPolicy(
        pb.GetBudgetPolicyRequest(id=policy_id), metadata=stack.admin
    )


def entry(stack: Stack, policy_id: str) -> pb.SpendEntry | None:
    resp = stack.budgets.ListSpend(pb.ListSpendRequest(policy_id=policy_id), metadata=stack.admin)
    return resp.entries[0] if resp.entries else None


def cli(capsys: pytest.CaptureFixture[str], *args: str, token: str = ADMIN_TOKEN) -> str:
    capsys.readouterr()
    assert main([*args, "--token", token]) == 0
    return capsys.readouterr().out


def test_shadow_admits_counts_what_its_enforced_twin_refuses_and_promotes(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    server = f"127.0.0.1:{stack.cp.port}"
    enforced = create_policy(
        stack, name="enforced twin", amount_usd="0.0018", scope=pb.SCOPE_USER, target="alice"
    )
    # Created with the CLI, as an operator would.
    out = cli(
        capsys,
        "policy", "create", "--server", server, "--name", "shadow twin", "--amount", "0.0018",
        "--action", "reject", "--scope", "user", "--target", "bob", "--shadow", "--json",
    )  # fmt: skip
    shadow_id = next(
        line.split('"')[3] for line in out.splitlines() if line.strip().startswith('"id"')
    )
    wait_until(lambda: shadow_id in stack.ext.state.index.policies, message="shadow policy")
    assert stack.ext.state.index.policies[shadow_id].shadow

    alice, bob = client(stack, "alice"), client(stack, "bob")
    refused = 0
    for _ in range(7):  # 4 x $0.00045 reach the $0.0018 limit; 3 more follow
        chat(bob)  # the shadow twin never refuses
        try:
            chat(alice)
        except openai.RateLimitError:
            refused += 1
    assert refused == 3
    assert len(stack.provider.log.billed) == 11  # bob's 7 and alice's 4

    # Metered exactly like the enforced twin would be: all 7 of bob's requests.
    wait_until(
        lambda: (e := entry(stack, shadow_id)) is not None and e.request_count == 7,
        message="bob's usage applied",
    )
    e = entry(stack, shadow_id)
    assert e is not None and Decimal(e.spent_usd) == COST * 7 and e.exceeded
    # The count is exactly the enforced twin's refusals, on every plane.
    assert stack.ext.ctx.stats.shadow_rejections == {shadow_id: 3}
    assert stack.ext.ctx.stats.rejections == {(enforced.id, "budget_exceeded"): 3}
    wait_until(lambda: get(stack, shadow_id).would_reject_count == 3, message="count reported")
    assert e.would_reject_count == 3
    p = get(stack, shadow_id)
    assert p.enforcement == pb.ENFORCEMENT_SHADOW and p.HasField("shadow_since")
    assert not get(stack, enforced.id).HasField("shadow_since")
    metrics = generate_latest(
        registry_for(stack.ext.ctx.stats, stack.ext.state, stack.ext.sync_status)
    ).decode()
    assert f'spendgate_shadow_rejections_total{{policy_id="{shadow_id}"}} 3.0' in metrics

    # One would_reject event for the window and member, not one per request.
    webhooks = webhooks_pb2_grpc.WebhookServiceStub(grpc_channel(stack.cp.port))
    events = webhooks.ListEvents(
        wpb.ListEventsRequest(type="budget_policy.would_reject"), metadata=stack.admin
    ).events
    assert [(ev.policy_id, ev.member) for ev in events] == [(shadow_id, "")]

    # status says what it would have done.
    status = cli(capsys, "status", "--server", server, token=READ_TOKEN)
    assert "action reject (shadow)" in status
    assert "shadow: would have rejected 3 requests since" in status
    assert f"promote with: spendgate policy update {shadow_id} --enforce" in status

    # Promotion keeps the window's spend: the next request is refused at once.
    cli(capsys, "policy", "update", shadow_id, "--server", server, "--enforce")
    wait_until(
        lambda: stack.ext.state.index.policies[shadow_id].enforces, message="promotion reaches"
    )
    with pytest.raises(openai.RateLimitError) as exc:
        chat(bob)
    assert exc.value.response.headers["x-spendgate-policy"] == shadow_id
    e = entry(stack, shadow_id)
    assert e is not None and Decimal(e.spent_usd) == COST * 7
    promoted = get(stack, shadow_id)
    assert promoted.enforcement == pb.ENFORCEMENT_UNSPECIFIED  # enforced
    assert promoted.would_reject_count == 3  # what it did while in shadow
    status = cli(capsys, "status", "--server", server, token=READ_TOKEN)
    assert "enforced now; while in shadow it would have rejected 3 requests since" in status
    alice.close()
    bob.close()


def test_shadow_policy_holds_nothing_and_never_refuses_an_unnamed_caller(stack: Stack) -> None:
    """A shadow ``*`` policy does not refuse a request that names no user
    (missing_identity is for policies that block), and reserves nothing."""
    each = create_policy(stack, name="each user", amount_usd="5", scope=pb.SCOPE_USER,
                         target="*", enforcement=pb.ENFORCEMENT_SHADOW)  # fmt: skip
    anonymous = openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1", api_key="sk-test", max_retries=0
    )
    chat(anonymous)
    chat(client(stack, "carol"))
    assert stack.ext.state.reserved == {}
    wait_until(
        lambda: (e := entry(stack, each.id)) is not None and e.member == "carol",
        message="carol charged",
    )
    assert stack.ext.ctx.stats.shadow_rejections == {}
    anonymous.close()


def test_shadow_on_an_alert_policy_is_refused_with_the_field_named(stack: Stack) -> None:
    import grpc

    with pytest.raises(grpc.RpcError) as exc:
        create_policy(stack, name="x", amount_usd="1", scope=pb.SCOPE_GLOBAL,
                      action=pb.ACTION_ALERT, enforcement=pb.ENFORCEMENT_SHADOW)  # fmt: skip
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "enforcement: SHADOW applies only to action REJECT" in (exc.value.details() or "")
    with pytest.raises(grpc.RpcError) as exc:
        create_policy(stack, name="x", amount_usd="1", scope=pb.SCOPE_GLOBAL, enforcement=7)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "enforcement: must be ENFORCED or SHADOW (got 7)" in (exc.value.details() or "")
