"""Traffic through both pairs: the control planes record exactly what the
provider billed, and once a REJECT budget is crossed both pairs reject within
one second — also the pair whose own traffic did not cross it."""

from __future__ import annotations

import math
import time
import uuid

import pytest

from spendgate.v1 import budget_pb2 as pb
from tests.faults.budgets import (
    amount_nanos,
    create_policy,
    last_admitted_start,
    settle_spend,
    wait_policies_everywhere,
)
from tests.faults.topology import TwoPairs
from tests.faults.traffic import (
    Load,
    billed_nanos,
    cost_of,
    provider_bill,
    statuses,
    usd,
)
from tests.harness import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
BOUND_S = 1.0  # the promise: a crossing anywhere is enforced everywhere within this
REQUESTS_TO_CROSS = 150
THREADS_PER_PAIR = 3


def test_spend_is_the_provider_bill_and_a_crossing_blocks_both_pairs(pairs: TwoPairs) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    c = cost_of(1000, 100)
    total = create_policy(
        pairs,
        amount_nanos=10**12,
        action=pb.ACTION_ALERT,
        scope=pb.SCOPE_WORKSPACE,
        target=workspace,
    )
    limit = create_policy(
        pairs, amount_nanos=REQUESTS_TO_CROSS * c, scope=pb.SCOPE_WORKSPACE, target=workspace
    )
    wait_policies_everywhere(pairs)

    load = Load(pairs.base_urls, workspace)
    for pair in (0, 1):
        load.add(pair, f"user-{pair}", threads=THREADS_PER_PAIR, pause_s=0.005)

    def rejecting_everywhere() -> bool:
        recent = load.snapshot()[-4 * THREADS_PER_PAIR :]
        return {r.pair for r in recent if r.status == 429} == {0, 1} and all(
            r.status == 429 for r in recent
        )

    try:
        wait_until(rejecting_everywhere, timeout=60, interval=0.05, message="429s on both pairs")
        time.sleep(BOUND_S)  # keep sending: nothing may be admitted any more
    finally:
        results = load.stop()

    assert statuses(results).keys() <= {200, 429}, statuses(results)
    admitted = sorted((r for r in results if r.ok), key=lambda r: r.end)
    assert len(admitted) >= REQUESTS_TO_CROSS
    # The crossing: the answer that brought the billed total to the limit
    # (every request costs c). Its client-side end is no earlier than the
    # moment ext_proc charged it, so the lags below are never overstated.
    crossing = admitted[math.ceil(amount_nanos(limit) / c) - 1].end
    lags = [last_admitted_start(results, pair) - crossing for pair in (0, 1)]

    billed = provider_bill(pairs.provider)
    expected = billed_nanos(billed)
    assert len(billed) == len(admitted)
    recorded = {p.id: settle_spend(pairs, p.id, expected) for p in (total, limit)}
    print(
        f"\n[two pairs] {len(results)} requests {statuses(results)}; "
        f"admitted per pair {[sum(r.ok for r in admitted if r.pair == i) for i in (0, 1)]}; "
        f"provider billed {usd(expected)} for {len(billed)}; recorded "
        f"{usd(recorded[total.id])} (ALERT) and {usd(recorded[limit.id])} (REJECT); "
        f"limit {usd(amount_nanos(limit))} = {REQUESTS_TO_CROSS} requests, overshoot "
        f"{len(admitted) - REQUESTS_TO_CROSS} requests; last admission after the crossing: "
        f"pair 0 {lags[0] * 1000:+.0f} ms, pair 1 {lags[1] * 1000:+.0f} ms"
    )
    assert recorded == {total.id: expected, limit.id: expected}
    for pair, lag in enumerate(lags):
        assert lag <= BOUND_S, f"pair {pair} admitted a request {lag:.3f} s after the crossing"
