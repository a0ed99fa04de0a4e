"""PostgreSQL crashes and comes back under traffic (a private cluster: the
shared server is never restarted). The control planes keep answering, usage
waits in the data planes and arrives afterwards exactly once, and every
budget event exists exactly once — also those whose crossing was applied
by a batch retried across the outage."""

from __future__ import annotations

import itertools
import time
import uuid

import pytest

from spendgate.v1 import budget_pb2 as pb
from tests.faults.budgets import (
    create_policy,
    expected_events,
    recorded_events,
    settle_spend,
    wait_policies_everywhere,
)
from tests.faults.pgcluster import PrivateCluster
from tests.faults.topology import TwoPairs
from tests.faults.traffic import (
    Load,
    billed_nanos,
    cost_of,
    provider_bill,
    statuses,
    usd,
)

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
OUTAGE_S = 5.0
THRESHOLDS = (50, 80)
# "events" user: 3 requests before the outage (30 % of its budget), 6 during
# (90 %: both thresholds crossed while the database is down), 3 after (120 %:
# exceeded). One request at a time, alternating pairs.
EVENTS_PHASES = (3, 6, 3)
EVENTS_LIMIT_REQUESTS = 10


def test_postgres_crash_loses_no_usage_and_duplicates_no_event(
    private_pg: PrivateCluster, pairs_on_private_pg: TwoPairs
) -> None:
    pairs = pairs_on_private_pg
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    c = cost_of(1000, 100)
    total = create_policy(
        pairs,
        amount_nanos=10**12,
        action=pb.ACTION_ALERT,
        scope=pb.SCOPE_WORKSPACE,
        target=workspace,
    )
    # Exceeded by the background traffic within its first second: every later
    # batch finds its events already there.
    early = create_policy(
        pairs,
        amount_nanos=40 * c,
        action=pb.ACTION_ALERT,
        scope=pb.SCOPE_WORKSPACE,
        target=workspace,
        thresholds=THRESHOLDS,
    )
    events = create_policy(
        pairs,
        amount_nanos=EVENTS_LIMIT_REQUESTS * c,
        action=pb.ACTION_ALERT,
        target="events",
        thresholds=THRESHOLDS,
    )
    wait_policies_everywhere(pairs)

    counter = itertools.count(1)
    load = Load(pairs.base_urls, workspace, counter)
    for pair in (0, 1):
        load.add(pair, "background", threads=2, pause_s=0.02)
    sequential = Load(pairs.base_urls, workspace, counter)
    clients = [sequential.client(0), sequential.client(1)]
    turn = itertools.cycle(clients)

    def events_requests(n: int) -> None:
        for _ in range(n):
            assert next(turn).send("events").status == 200

    try:
        events_requests(EVENTS_PHASES[0])
        time.sleep(2.0)
        private_pg.stop("immediate")
        down = time.monotonic()
        events_requests(EVENTS_PHASES[1])
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
        up_at = time.monotonic()
        private_pg.start()
        events_requests(EVENTS_PHASES[2])
        time.sleep(2.0)
    finally:
        results = load.stop()
        for client in clients:
            client.close()
    results += sequential.results

    in_outage = [r for r in results if down <= r.start < up_at]
    assert statuses(results).keys() == {200}, statuses(results)
    billed = provider_bill(pairs.provider)
    expected = billed_nanos(billed)
    started = time.monotonic()
    recorded = settle_spend(pairs, total.id, expected)
    caught_up = time.monotonic() - started
    counts = {
        name: sum(recorded_events(pairs, p.id).values())
        for name, p in (("total", total), ("early", early), ("events", events))
    }
    print(
        f"\n[PostgreSQL down {OUTAGE_S:.0f} s (pg_ctl stop -m immediate)] {len(results)} "
        f"requests {statuses(results)}, {len(in_outage)} during the outage; provider billed "
        f"{usd(expected)} for {len(billed)}; recorded {usd(recorded)} (lost "
        f"{usd(expected - recorded)}) {caught_up:.1f} s after the traffic stopped; "
        f"events per policy: {counts}"
    )
    assert recorded == expected
    assert pairs.spent_nanos(events.id) == sum(EVENTS_PHASES) * c
    for policy in (total, early, events):
        got = recorded_events(pairs, policy.id)
        assert got == expected_events(pairs, policy, THRESHOLDS if policy is not total else ())
        assert set(got.values()) <= {1}, f"duplicate events for {policy.name}: {got}"
    assert sorted((k, t) for k, t, _, _ in recorded_events(pairs, events.id)) == [
        ("budget_policy.exceeded", 0),
        ("budget_policy.threshold_crossed", 50),
        ("budget_policy.threshold_crossed", 80),
    ]
