"""A policy update made through control plane A under traffic applies to the
next requests on both pairs within one second: pair 0 hears it from A
directly, pair 1 from B after A's NOTIFY."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from spendgate.v1 import budget_pb2 as pb
from tests.faults.budgets import (
    create_policy,
    last_admitted_start,
    update_policy,
    wait_policies_everywhere,
)
from tests.faults.topology import TwoPairs
from tests.faults.traffic import Load, cost_of, statuses
from tests.harness import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
BOUND_S = 1.0  # the promise: a change made anywhere reaches every data plane within this
C = cost_of(1000, 100)


def lower_the_amount(pairs: TwoPairs, user: str) -> Callable[[], pb.BudgetPolicy]:
    """A REJECT budget far from spent, then lowered below what is spent."""
    policy = create_policy(pairs, amount_nanos=10**6 * C, target=user)
    return lambda: update_policy(pairs, policy.id, ["amount_usd"], amount_usd="0.000001")


def alert_to_reject(pairs: TwoPairs, user: str) -> Callable[[], pb.BudgetPolicy]:
    """An ALERT budget already exceeded (it never blocks), then made REJECT."""
    policy = create_policy(pairs, amount_nanos=C, action=pb.ACTION_ALERT, target=user)
    return lambda: update_policy(pairs, policy.id, ["action"], action=pb.ACTION_REJECT)


@pytest.mark.parametrize("change", [lower_the_amount, alert_to_reject])
def test_policy_update_under_traffic_applies_on_both_pairs_within_a_second(
    pairs: TwoPairs, change: Callable[[TwoPairs, str], Callable[[], pb.BudgetPolicy]]
) -> None:
    user = f"user-{uuid.uuid4().hex[:8]}"
    apply_change = change(pairs, user)
    wait_policies_everywhere(pairs)
    load = Load(pairs.base_urls, f"ws-{user}")
    for pair in (0, 1):
        load.add(pair, user, threads=2, pause_s=0.01)
    try:
        # Both pairs admit, and the budget has some spend on the books.
        wait_until(
            lambda: {r.pair for r in load.snapshot() if r.ok} == {0, 1},
            message="traffic admitted on both pairs",
        )
        time.sleep(1.0)
        before = len(load.snapshot())
        apply_change()
        changed = time.monotonic()  # the admin has the answer: the change is committed
        time.sleep(2 * BOUND_S)
    finally:
        results = load.stop()

    lags = [last_admitted_start(results, pair) - changed for pair in (0, 1)]
    after = [r for r in results if r.start > changed + BOUND_S]
    print(
        f"\n[{change.__name__.replace('_', ' ')} on A] {before} requests before the change, "
        f"{len(results) - before} after {statuses(results[before:])}; last admission after "
        f"the change: pair 0 (via A) {lags[0] * 1000:+.0f} ms, pair 1 (via B) "
        f"{lags[1] * 1000:+.0f} ms"
    )
    assert statuses(results).keys() <= {200, 429}
    assert {r.pair for r in after} == {0, 1}, "traffic stopped on a pair: nothing measured"
    for pair, lag in enumerate(lags):
        assert lag <= BOUND_S, f"pair {pair} admitted a request {lag:.3f} s after the update"
