"""Replicas and threads writing one store: no update lost, no batch twice.

Every test runs on SQLite and on PostgreSQL (``db_url``); the control plane
is driven directly, with a FakeClock, never by sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from control_plane.api.budgets import mask_merger
from control_plane.hub import StateHub
from control_plane.service import ControlPlane
from control_plane.store.db import create_db_engine, migrate
from control_plane.store.models import AppliedBatchRow
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from tests.harness import FakeClock
from tests.store.builders import (
    DAY_END,
    DAY_START,
    HOUR_END,
    HOUR_START,
    USD,
    all_spend,
    batch,
    entry,
    inc,
    policy,
    spend_rows,
    ts,
)

# ---- concurrency ------------------------------------------------------------------


def _run_in_threads(*jobs: tuple[ControlPlane, list[dp.ReportUsageRequest]]) -> list[list[bool]]:
    """Each job on its own thread and event loop, all released at once;
    returns the duplicate flag of every batch, per job."""
    barrier = threading.Barrier(len(jobs))
    results: list[list[bool]] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def worker(i: int, cp: ControlPlane, batches: list[dp.ReportUsageRequest]) -> None:
        async def go() -> list[bool]:
            rs = await asyncio.gather(*(cp.apply_usage(b) for b in batches))
            return [r.duplicate for r in rs]

        try:
            barrier.wait(10)
            results[i] = asyncio.run(go())
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=worker, args=(i, cp, batches), name=f"replica-{i}")
        for i, (cp, batches) in enumerate(jobs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    return results


@pytest.fixture
def replicas(db_url: str, engine: Engine, clock: FakeClock) -> Iterator[list[ControlPlane]]:
    """Two control planes with their own engines on the same database."""
    cps = [ControlPlane(create_db_engine(db_url), StateHub(), clock=clock) for _ in range(2)]
    yield cps
    for c in cps:
        c.close()


async def test_concurrent_replicas_lose_no_update(
    replicas: list[ControlPlane], engine: Engine
) -> None:
    a, b = replicas
    p = await a.create_policy(policy(amount="1000"), "a")
    n = 200
    jobs = [
        (
            cp,
            [
                batch(f"r{r}-{i}", inc(p.id, r * 1_000_000 + i + 1), dp_id=f"dp-{r}")
                for i in range(n)
            ],
        )
        for r, cp in enumerate(replicas)
    ]
    dup = await asyncio.to_thread(_run_in_threads, *jobs)
    assert dup == [[False] * n, [False] * n]
    expected = sum(r * 1_000_000 + i + 1 for r in range(2) for i in range(n))
    assert spend_rows(engine) == [(p.id, "", ts(HOUR_START), ts(HOUR_END), expected, 2 * n)]
    assert (await b.list_spend(p.id, "", 0, ""))[0][0].request_count == 2 * n


async def test_same_batch_from_two_replicas_counts_once(
    replicas: list[ControlPlane], engine: Engine
) -> None:
    p = await replicas[0].create_policy(policy(amount="1000"), "a")
    n = 100
    batches = [batch(f"shared-{i}", inc(p.id, i + 1)) for i in range(n)]
    dup = await asyncio.to_thread(_run_in_threads, *[(cp, batches) for cp in replicas])
    # For every batch exactly one replica applied it.
    assert [x != y for x, y in zip(dup[0], dup[1], strict=True)] == [True] * n
    assert spend_rows(engine) == [(p.id, "", ts(HOUR_START), ts(HOUR_END), sum(range(1, n + 1)), n)]
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(AppliedBatchRow)) == n


async def test_list_spend_follows_a_changed_window(cp: ControlPlane) -> None:
    """After a policy's window changes, the old window's row (which may still
    contain now) is not reported as the policy's current spend."""
    p = await cp.create_policy(policy("hourly", amount="10"), "a")
    await cp.apply_usage(batch("b1", inc(p.id, 9 * USD)))
    daily = await cp.update_policy(
        p.id,
        mask_merger(
            pb.BudgetPolicy(window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1)),
            FieldMask(paths=["window"]),
        ),
        "",
        "a",
    )
    assert await all_spend(cp) == [
        entry(daily, spent="0.00", remaining="10.00", start=DAY_START, end=DAY_END)
    ]
    await cp.apply_usage(batch("b2", inc(p.id, 1 * USD)))
    assert await all_spend(cp) == [
        entry(daily, spent="1.00", remaining="9.00", requests=1, start=DAY_START, end=DAY_END)
    ]


async def test_old_batch_ids_are_forgotten_and_recent_ones_kept(db_url: str) -> None:

    from control_plane.hub import StateHub
    from control_plane.service import ControlPlane
    from control_plane.store.db import create_db_engine
    from spendgate.v1 import dataplane_pb2 as dp
    from tests.harness import FakeClock

    engine = create_db_engine(db_url)
    migrate(engine)
    clock = FakeClock()
    cp = ControlPlane(engine, StateHub(), clock=clock)
    try:
        await cp.apply_usage(dp.ReportUsageRequest(batch_id="old", data_plane_id="dp"))
        clock.advance(timedelta(days=8))
        await cp.apply_usage(dp.ReportUsageRequest(batch_id="new", data_plane_id="dp"))
        assert await cp.forget_old_batches(timedelta(days=7)) == 1
        again = await cp.apply_usage(dp.ReportUsageRequest(batch_id="new", data_plane_id="dp"))
        assert again.duplicate
    finally:
        cp.close()
