"""Overshoot across data planes: a REJECT budget with room for 10 requests,
100 requests released at once through two Envoy + ext_proc pairs on two
control plane replicas.

With reservations (the default) every request near the line is admitted by
the control plane against both data planes' holds: at most the request that
crosses the line gets in beyond the budget. Without them each pair admits what
its own view allows, and far more get through. Both numbers are printed.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from spendgate.v1 import budget_pb2 as pb
from tests.faults.budgets import create_policy, settle_spend, wait_policies_everywhere
from tests.faults.topology import TwoPairs, remove_workdir, start_two_pairs
from tests.faults.traffic import (
    billed_nanos,
    burst,
    cost_of,
    fixed_tokens,
    provider_bill,
    statuses,
    usd,
)

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
# Output dominates the cost and max_tokens equals it, so a reservation's
# estimate is about the real cost: "room for 10" means 10 requests.
PROMPT, COMPLETION = 20, 1000
ROOM = 10
BURST = 100


def run_burst(pairs: TwoPairs) -> tuple[int, int, int, int]:
    """(admitted, rejected, recorded spend, limit) of one burst."""
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    c = cost_of(PROMPT, COMPLETION)
    policy = create_policy(pairs, amount_nanos=ROOM * c, scope=pb.SCOPE_WORKSPACE, target=workspace)
    wait_policies_everywhere(pairs)
    results = burst(
        pairs.base_urls, workspace, "burst-user", BURST, tokens=fixed_tokens(PROMPT, COMPLETION)
    )
    counts = statuses(results)
    assert set(counts) <= {200, 429}, counts
    admitted = counts.get(200, 0)
    billed = billed_nanos(provider_bill(pairs.provider))
    assert billed == admitted * c
    recorded = settle_spend(pairs, policy.id, billed)
    assert recorded == billed  # every admitted request charged, nothing twice
    return admitted, counts.get(429, 0), recorded, ROOM * c


def test_reservations_hold_the_line_across_two_pairs(pg_url: str) -> None:
    outcomes: dict[str, tuple[int, int, int, int]] = {}
    for name, args in (("on", {}), ("off", {"reservations": False})):
        settings: dict[str, Any] = dict(args)
        with start_two_pairs(pg_url, ext_proc_args=settings) as pairs:
            outcomes[name] = run_burst(pairs)
        remove_workdir(pairs.workdir)
    c = cost_of(PROMPT, COMPLETION)
    for name, (admitted, rejected, recorded, limit) in outcomes.items():
        print(
            f"\n[reservations {name}] {BURST} concurrent requests over two pairs, room for "
            f"{ROOM}: {admitted} admitted, {rejected} rejected; spend {usd(recorded)} of "
            f"{usd(limit)} ({(recorded - limit) / c:+.1f} requests past the budget)"
        )
    admitted_on, _, recorded_on, limit = outcomes["on"]
    # The line holds: beyond the budget at most the request that crossed it.
    assert recorded_on <= limit + c
    assert 1 <= admitted_on <= ROOM + 1
    # Without reservations the same burst goes well past it (the bound is only
    # what is in flight); this also proves the first assertion could fail.
    assert outcomes["off"][0] > ROOM + 1
