"""A spend adjustment made through replica A reaches a data plane watching
replica B (PostgreSQL LISTEN/NOTIFY), with its adjustment_seq, also when it
lowers the total."""

from __future__ import annotations

import time

import pytest

from spendgate.v1 import budget_pb2 as pb
from tests.replicas.test_replicas import (
    ADMIN,
    RECONNECT_S,
    Replica,
    Watch,
    create_policy,
    has_policy,
    report,
    two,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.postgres


def test_adjustment_on_a_pushes_the_lowered_total_on_b(
    two: tuple[Replica, Replica, Watch],  # noqa: F811
) -> None:
    a, _, watch = two
    policy = create_policy(a, "adjusted")
    watch.wait_for(has_policy("adjusted"), RECONNECT_S, time.monotonic())
    report(a, policy.id, 3_000_000_000)
    made = a.budgets.CreateSpendAdjustment(
        pb.CreateSpendAdjustmentRequest(
            adjustment=pb.SpendAdjustment(
                policy_id=policy.id, amount_usd="-2.5", reason="provider double-reported"
            )
        ),
        metadata=ADMIN,
        timeout=10,
    )
    assert made.spent_after_usd == "0.50"
    update = watch.wait_for(
        lambda u: any(s.policy_id == policy.id and s.adjustment_seq == 1 for s in u.spend),
        RECONNECT_S,
        time.monotonic(),
    )
    (spend,) = [s for s in update.spend if s.policy_id == policy.id]
    assert (spend.spent_nanos, spend.request_count, spend.exceeded) == (500_000_000, 1, False)
    # Usage after it is pushed with the same seq, so B's data planes add it up.
    report(a, policy.id, 1_000_000_000)
    update = watch.wait_for(
        lambda u: any(s.policy_id == policy.id and s.spent_nanos == 1_500_000_000 for s in u.spend),
        RECONNECT_S,
        time.monotonic(),
    )
    assert [s.adjustment_seq for s in update.spend if s.policy_id == policy.id] == [1]
