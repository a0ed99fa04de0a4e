"""Budget policies for the end-to-end tests: create one and wait until
ext_proc enforces it, remove them all after a test, read what was spent."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack
from tests.harness import wait_until


def create_policy(stack: Stack, **fields: Any) -> pb.BudgetPolicy:
    """A policy (a REJECT budget per day unless ``fields`` say otherwise),
    returned once ext_proc has it."""
    fields.setdefault("window", pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1))
    fields.setdefault("action", pb.ACTION_REJECT)
    fields.setdefault("name", f"e2e-{uuid.uuid4().hex[:6]}")
    policy = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(policy=pb.BudgetPolicy(**fields)), metadata=stack.admin
    )
    wait_until(
        lambda: policy.id in stack.ext.state.index.policies, message="policy reaches ext_proc"
    )
    return policy


def delete_policies(stack: Stack) -> None:
    """Remove every policy (and wait until ext_proc has none); forget what
    the fake provider saw."""
    resp = stack.budgets.ListBudgetPolicies(
        pb.ListBudgetPoliciesRequest(page_size=1000), metadata=stack.admin
    )
    for p in resp.policies:
        stack.budgets.DeleteBudgetPolicy(
            pb.DeleteBudgetPolicyRequest(id=p.id), metadata=stack.admin
        )
    wait_until(lambda: len(stack.ext.state.index) == 0, message="policies gone from ext_proc")
    stack.provider.log.clear()


def spent(stack: Stack, policy_id: str) -> Decimal:
    """What the control plane recorded for a (not `*`) policy's current window."""
    resp = stack.budgets.ListSpend(pb.ListSpendRequest(policy_id=policy_id), metadata=stack.admin)
    return Decimal(resp.entries[0].spent_usd) if resp.entries else Decimal(0)
