"""Spent versus held, as the control plane tells it (ListSpend, metrics) and
decides with it (Reserve with per-window amounts). SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine

from control_plane.errors import InvalidArgument
from control_plane.hub import StateHub
from control_plane.metrics import read_metrics
from control_plane.service import ControlPlane
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.harness import FakeClock
from tests.store.test_holds import DAY_START, T0, USD, daily, hold, usage


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def cp(engine: Engine, clock: FakeClock) -> Iterator[ControlPlane]:
    c = ControlPlane(engine, StateHub(), clock=clock, hold_ttl_s=30)
    yield c
    c.close()


def holds(policy_id: str, nanos: int, requests: int) -> list[dp.WindowHold]:
    h = hold(policy_id, nanos)
    h.requests = requests
    return [h]


async def spend_entry(cp: ControlPlane, policy_id: str) -> pb.SpendEntry:
    (entry,), _ = await cp.list_spend(policy_id, "", 0, "")
    return entry


async def test_spend_tells_spent_from_held_and_a_dead_data_planes_hold_lapses(
    cp: ControlPlane, clock: FakeClock
) -> None:
    pid = await daily(cp, amount="10.00")
    await cp.apply_usage(usage(pid, "b1", 2 * USD, "a", holds=holds(pid, USD, 3), holds_seq=1))
    clock.advance(timedelta(seconds=20))
    await cp.apply_usage(
        dp.ReportUsageRequest(data_plane_id="b", holds=holds(pid, USD // 2, 1), holds_seq=1)
    )
    e = await spend_entry(cp, pid)
    assert (e.spent_usd, e.held_usd, e.held_requests, e.remaining_usd) == (
        "2.00",
        "1.50",
        4,
        "8.00",
    )
    reading = await cp.run(lambda s: read_metrics(s, clock()))
    [p] = reading.policies
    assert (p.spent_nanos, p.held_nanos, p.held_requests) == (2 * USD, 3 * USD // 2, 4)
    # a stops reporting: 30 s after its report its hold no longer counts,
    # with no other change (no report, no cleanup run).
    clock.advance(timedelta(seconds=10))
    e = await spend_entry(cp, pid)
    assert (e.spent_usd, e.held_usd, e.held_requests) == ("2.00", "0.50", 1)
    reading = await cp.run(lambda s: read_metrics(s, clock()))
    assert (reading.policies[0].held_nanos, reading.policies[0].held_requests) == (USD // 2, 1)


async def test_each_window_is_decided_with_the_requests_own_hold_on_it(cp: ControlPlane) -> None:
    """A request holds its estimate capped per window at the policy's amount:
    the small window is judged by its cap, the large one by the estimate."""
    small = await daily(cp, amount="1.00")
    large = await daily(cp, amount="100.00")

    def item(small_nanos: int, large_nanos: int) -> dp.ReserveItem:
        return dp.ReserveItem(
            windows=[
                dp.WindowHold(policy_id=pid, window_start=timestamp(DAY_START), held_nanos=nanos)
                for pid, nanos in ((small, small_nanos), (large, large_nanos))
            ],
            amount_nanos=max(small_nanos, large_nanos),
        )

    # Three requests estimated at $50 each: each holds $1 on the small window.
    req = dp.ReserveRequest(
        data_plane_id="a",
        holds=holds(small, 3 * USD, 3) + holds(large, 150 * USD, 3),
        holds_seq=1,
        items=[item(USD, 50 * USD)] * 3,
    )
    resp = await cp.reserve(req)
    # The first crosses the small window's line (and completes); the others wait.
    assert [v.admitted for v in resp.verdicts] == [True, False, False]
    e_small, e_large = await spend_entry(cp, small), await spend_entry(cp, large)
    assert (e_small.held_usd, e_small.held_requests) == ("1.00", 1)
    assert (e_large.held_usd, e_large.held_requests) == ("50.00", 1)


async def test_a_negative_request_count_is_refused_naming_the_field(cp: ControlPlane) -> None:
    pid = await daily(cp)
    with pytest.raises(InvalidArgument) as exc:
        await cp.apply_usage(
            dp.ReportUsageRequest(data_plane_id="a", holds=holds(pid, 5, -1), holds_seq=1)
        )
    assert [v.field for v in exc.value.violations] == ["holds[0].requests"]
