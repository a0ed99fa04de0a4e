"""Spend corrections end to end: the OpenAI SDK through the real Envoy, a
member blocked by a REJECT budget, `spendgate spend adjust` from the CLI, and
ext_proc enforcing the corrected total at once (re-admitted by a negative
adjustment, blocked by a positive one); `spend` and `status` show it."""

from __future__ import annotations

import json
import re
import uuid
from decimal import Decimal

import openai
import pytest

from spendgate.cli.main import main
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack
from tests.harness import ADMIN_TOKEN, READ_TOKEN, wait_until

pytestmark = pytest.mark.e2e
# With these fake-provider knobs a gpt-4o-mini answer costs exactly $0.00045.
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}


def cli(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str, token: str = "") -> str:
    capsys.readouterr()
    code = main([*args, "--server", f"127.0.0.1:{stack.cp.port}", "--token", token or ADMIN_TOKEN])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def chat(client: openai.OpenAI) -> object:
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello spendgate"}]
    )


def spend(stack: Stack, policy_id: str) -> pb.SpendEntry:
    [entry] = stack.budgets.ListSpend(
        pb.ListSpendRequest(policy_id=policy_id), metadata=stack.admin
    ).entries
    return entry


def test_adjustments_readmit_and_block_through_envoy(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    user = f"Bob-{uuid.uuid4().hex[:6]}"
    member = user.lower()  # the canonical member ext_proc charges
    policy = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name="per-user",
                amount_usd="0.0009",  # two answers
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                action=pb.ACTION_REJECT,
                scope=pb.SCOPE_USER,
                target="*",
            )
        ),
        metadata=stack.admin,
    )
    wait_until(lambda: policy.id in stack.ext.state.index.policies, message="policy in ext_proc")
    client = openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": user, **BIG},
        max_retries=0,
    )
    chat(client)
    chat(client)
    with pytest.raises(openai.RateLimitError):
        chat(client)
    wait_until(
        lambda: spend(stack, policy.id).spent_usd == "0.0009", message="usage reaches the store"
    )

    def ext_proc_total() -> tuple[int, int]:
        state = stack.ext.state
        keys = [k for k in state.remote if k[0] == policy.id and k[1] == member]
        if len(keys) != 1:
            return (-1, -1)
        return state.remote[keys[0]][0], state.remote_seq.get(keys[0], 0)

    # The provider double-reported one answer: take it back from the CLI.
    out = cli(
        stack,
        capsys,
        "spend",
        "adjust",
        policy.id,
        "--member",
        user,
        "--amount",
        "-0.00045",
        "--reason",
        "provider double-reported",
    )
    assert f"member {member} by -$0.00045: spent $0.0009 -> $0.00045" in out
    assert re.search(r"recorded as sa_\w{26} by admin: provider double-reported", out)
    wait_until(lambda: ext_proc_total() == (450_000, 1), message="lowered total in ext_proc")
    chat(client)  # re-admitted: $0.00045 of $0.0009 spent
    with pytest.raises(openai.RateLimitError):
        chat(client)  # that answer reached the limit again
    wait_until(
        lambda: spend(stack, policy.id).spent_usd == "0.0009", message="usage after adjustment"
    )

    # A positive adjustment blocks without any traffic.
    cli(
        stack,
        capsys,
        "spend",
        "adjust",
        policy.id,
        "--member",
        member,
        "--amount=-0.0009",
        "--reason",
        "credit for the incident",
    )
    wait_until(lambda: ext_proc_total() == (0, 2), message="zero in ext_proc")
    chat(client)
    wait_until(lambda: spend(stack, policy.id).spent_usd == "0.00045", message="usage")
    cli(
        stack,
        capsys,
        "spend",
        "adjust",
        policy.id,
        "--member",
        member,
        "--amount",
        "0.001",
        "--reason",
        "under-reported batch",
    )
    wait_until(lambda: ext_proc_total() == (1_450_000, 3), message="raised total in ext_proc")
    with pytest.raises(openai.RateLimitError) as exc:
        chat(client)
    assert "$0.00145 spent" in exc.value.body["message"]  # type: ignore[index]

    # The store: spend is exactly the provider's answers plus the adjustments.
    e = spend(stack, policy.id)
    assert (e.spent_usd, e.adjusted_usd, e.adjustment_count) == ("0.00145", "-0.00035", 3)
    assert e.request_count == 4 and e.exceeded
    assert Decimal("0.00045") * 4 + Decimal("-0.00035") == Decimal(e.spent_usd)

    # `spendgate spend` and `spendgate status` (read-only token) show the correction.
    out = cli(stack, capsys, "spend", "--policy", policy.id, token=READ_TOKEN)
    row = next(line for line in out.splitlines() if member in line)
    assert "$0.00145" in row and "-$0.00035 (3)" in row and "EXCEEDED (rejecting)" in row
    out = cli(stack, capsys, "status", token=READ_TOKEN)
    assert f"{member}  EXCEEDED" in out
    assert "spent $0.00145 of $0.0009, remaining $0.00, adjusted -$0.00035 (3 adjustments)" in out
    shown = json.loads(cli(stack, capsys, "status", "--json", token=READ_TOKEN))
    [p] = [p for p in shown["policies"] if p["id"] == policy.id]
    assert [(s["member"], s["adjusted_usd"], s["adjustment_count"]) for s in p["spend"]] == [
        (member, "-0.00035", 3)
    ]
    out = cli(stack, capsys, "spend", "adjustments", "--policy", policy.id, token=READ_TOKEN)
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TIME", "(UTC)", "ID", "POLICY"]
    assert [line.split()[5] for line in lines[1:]] == ["+$0.001", "-$0.0009", "-$0.00045"]
    assert "under-reported batch" in lines[1] and "provider double-reported" in lines[3]

    # Refusals are one clear line: spend may not go below zero, reads may not write.
    capsys.readouterr()
    args = ["spend", "adjust", policy.id, "--member", member, "--amount", "-1", "--reason", "x"]
    assert main([*args, "--server", f"127.0.0.1:{stack.cp.port}", "--token", ADMIN_TOKEN]) == 1
    assert (
        "adjustment.amount_usd: would make the window's spend negative" in capsys.readouterr().err
    )
    assert main([*args, "--server", f"127.0.0.1:{stack.cp.port}", "--token", READ_TOKEN]) == 1
    assert "not allowed" in capsys.readouterr().err
    stack.budgets.DeleteBudgetPolicy(
        pb.DeleteBudgetPolicyRequest(id=policy.id), metadata=stack.admin
    )
