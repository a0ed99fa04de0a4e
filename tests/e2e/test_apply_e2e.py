"""Policies as code through the whole stack: examples/budgets.yaml applied
with `spendgate apply` to a fresh stack reaches ext_proc, and a policy and a
price override added to the file are enforced on the next requests through
the real Envoy (the OpenAI SDK gets its RateLimitError)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from spendgate.cli.main import main
from spendgate.v1 import budget_pb2 as pb
from tests.cli.test_apply import ENV, EXAMPLE
from tests.conftest import Stack, start_stack, stop_stack
from tests.harness import ADMIN_TOKEN, wait_until

pytestmark = pytest.mark.e2e
# With these fake-provider knobs a gpt-4o-mini answer costs $0.00045 at the
# catalog price, $0.0009 at the price the file sets.
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}


@pytest.fixture
def fresh() -> Iterator[Stack]:
    s = start_stack()
    yield s
    stop_stack(s)


def apply(stack: Stack, capsys: pytest.CaptureFixture[str], path: Path) -> str:
    capsys.readouterr()
    argv = ["apply", "-f", str(path), "--server", f"127.0.0.1:{stack.cp.port}"]
    code = main([*argv, "--token", ADMIN_TOKEN])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_applied_budgets_are_enforced_through_envoy(
    fresh: Stack,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    out = apply(fresh, capsys, EXAMPLE)
    assert "applied: 15 created, 0 updated, 0 unchanged, 0 deleted" in out
    listed = fresh.budgets.ListBudgetPolicies(pb.ListBudgetPoliciesRequest(), metadata=fresh.admin)
    assert len(listed.policies) == 10
    wait_until(
        lambda: {p.id for p in listed.policies} <= set(fresh.ext.state.policy_set.msgs),
        message="every applied policy reaches ext_proc",
    )
    wait_until(lambda: len(fresh.ext.state.overrides.msgs) == 3, message="prices in ext_proc")

    data = yaml.safe_load(EXAMPLE.read_text())
    data["policies"].append(
        {
            "name": "per-user-cap",
            "amount": "0.0009",
            "action": "reject",
            "scope": "user",
            "target": "*",
        }
    )
    data["price_overrides"].append({"model": "gpt-4o-mini", "input": "0.30", "output": "1.20"})
    edited = tmp_path / "budgets.yaml"
    edited.write_text(yaml.safe_dump(data, sort_keys=False))
    out = apply(fresh, capsys, edited)
    assert "applied: 2 created, 0 updated, 15 unchanged, 0 deleted" in out
    wait_until(lambda: len(fresh.ext.state.overrides.msgs) == 4, message="new price in ext_proc")
    wait_until(lambda: len(fresh.ext.state.policy_set.msgs) == 11, message="new policy")

    client = openai.OpenAI(
        base_url=fresh.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": "carol", **BIG},
        max_retries=0,
    )
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    client.chat.completions.create(**ask)  # $0.0009 at the applied price: the line
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(**ask)
    assert "per-user-cap" in str(e.value)
