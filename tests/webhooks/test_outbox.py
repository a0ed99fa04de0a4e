"""The outbox: events and deliveries are written by the transaction that
applies the spend, exactly once, also with concurrent replicas. SQLite and
PostgreSQL; the PostgreSQL runs are the ones that prove the concurrency."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from control_plane.hub import StateHub
from control_plane.service import ControlPlane
from control_plane.store import webhook_repo
from control_plane.store.db import create_db_engine
from control_plane.store.models import DeliveryRow, WebhookEventRow, WindowSpendRow
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.harness import FakeClock
from tests.webhooks.conftest import USD, Rig

EXCEEDED = "budget_policy.exceeded"
THRESHOLD = "budget_policy.threshold_crossed"


def event_rows(engine: Engine) -> list[tuple[str, str, int]]:
    with Session(engine) as s:
        return [
            (e.kind, e.member, e.threshold)
            for e in s.scalars(select(WebhookEventRow).order_by(WebhookEventRow.id))
        ]


def count(engine: Engine, table: type[object]) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def usage(
    batch_id: str, policy_id: str, nanos: int, clock: FakeClock, member: str = ""
) -> dp.ReportUsageRequest:
    return dp.ReportUsageRequest(
        data_plane_id="dp",
        batch_id=batch_id,
        increments=[
            dp.SpendIncrement(
                policy_id=policy_id,
                member=member,
                window_start=timestamp(clock()),
                cost_nanos=nanos,
                request_count=1,
            )
        ],
    )


async def test_events_and_deliveries_are_written_once(rig: Rig) -> None:
    hook = await rig.webhook("http://127.0.0.1:9/hook")
    policy = await rig.policy("10", thresholds=(50,), scope=pb.SCOPE_USER, target="*")
    await rig.spend(policy.id, 6 * USD, member="alice")
    await rig.spend(policy.id, 6 * USD, member="bob")
    await rig.spend(policy.id, 6 * USD, member="alice")
    # A retried batch (same id) counts nothing and creates nothing.
    replay = usage("same", policy.id, 100 * USD, rig.clock, member="carol")
    await rig.cp.apply_usage(replay)
    await rig.cp.apply_usage(replay)
    assert event_rows(rig.engine) == [
        (THRESHOLD, "alice", 50),
        (THRESHOLD, "bob", 50),
        (EXCEEDED, "alice", 0),
        (THRESHOLD, "carol", 50),
        (EXCEEDED, "carol", 0),
    ]
    with Session(rig.engine) as s:
        rows = s.scalars(select(DeliveryRow).order_by(DeliveryRow.id)).all()
        assert {(r.webhook_id, r.state, r.attempts) for r in rows} == {(hook.id, "pending", 0)}
        assert len(rows) == 5
    # A restarted control plane (nothing cached) does not create them again.
    fresh = ControlPlane(rig.engine, StateHub(), clock=rig.clock)
    try:
        await fresh.apply_usage(usage("after-restart", policy.id, USD, rig.clock, "alice"))
    finally:
        fresh.close()  # disposes the pool; the engine reconnects on next use
    assert len(event_rows(rig.engine)) == 5
    assert count(rig.engine, DeliveryRow) == 5


async def test_a_failed_transaction_leaves_neither_spend_nor_events(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.webhook("http://127.0.0.1:9/hook")
    policy = await rig.policy("1")

    def broken(*args: object, **kwargs: object) -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(webhook_repo, "add_deliveries", broken)
    with pytest.raises(RuntimeError):
        await rig.cp.apply_usage(usage("b1", policy.id, 2 * USD, rig.clock))
    assert count(rig.engine, WindowSpendRow) == 0
    assert event_rows(rig.engine) == []
    monkeypatch.undo()
    # The data plane retries the batch: now spend, event and delivery all land.
    await rig.cp.apply_usage(usage("b1", policy.id, 2 * USD, rig.clock))
    assert event_rows(rig.engine) == [(EXCEEDED, "", 0)]
    assert count(rig.engine, DeliveryRow) == 1


@pytest.fixture
def replicas(rig: Rig, db_url: str) -> Iterator[list[ControlPlane]]:
    cps = [ControlPlane(create_db_engine(db_url), StateHub(), clock=rig.clock) for _ in range(2)]
    yield cps
    for c in cps:
        c.close()


def run_concurrently(jobs: list[tuple[ControlPlane, list[dp.ReportUsageRequest]]]) -> None:
    """Each replica on its own thread and event loop, released together."""
    barrier = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def worker(cp: ControlPlane, batches: list[dp.ReportUsageRequest]) -> None:
        async def go() -> None:
            await asyncio.gather(*(cp.apply_usage(b) for b in batches))

        try:
            barrier.wait(10)
            asyncio.run(go())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []


async def test_replicas_crossing_at_once_create_each_event_once(
    rig: Rig, replicas: list[ControlPlane]
) -> None:
    hooks = [await rig.webhook(f"http://127.0.0.1:9/{i}", name=f"h{i}") for i in range(2)]
    policy = await rig.policy("1", thresholds=(25, 50, 75))
    n = 60  # each batch is $0.05: $6 in all, every level crossed mid-way
    jobs = [
        (cp, [usage(f"r{r}-{i}", policy.id, USD // 20, rig.clock) for i in range(n)])
        for r, cp in enumerate(replicas)
    ]
    await asyncio.to_thread(run_concurrently, jobs)
    assert sorted(event_rows(rig.engine)) == [
        (EXCEEDED, "", 0),
        (THRESHOLD, "", 25),
        (THRESHOLD, "", 50),
        (THRESHOLD, "", 75),
    ]
    with Session(rig.engine) as s:
        pairs = s.execute(select(DeliveryRow.webhook_id, DeliveryRow.event_id)).all()
    assert len(pairs) == 8 and len(set(pairs)) == 8
    assert {w for w, _ in pairs} == {h.id for h in hooks}
