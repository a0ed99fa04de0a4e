"""Spend of old windows is deleted after spend_retention_days, in bounded
chunks, and a deleted policy leaves neither spend nor holds behind
(control_plane/maintenance.py forget_old_spend, repo.delete_policy), on SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from control_plane.service import ControlPlane
from control_plane.store.models import WindowHoldRow, WindowSpendRow
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.harness import FakeClock
from tests.store.builders import HOUR_START, T0, batch, inc, policy

RETENTION = timedelta(days=400)


async def rows(cp: ControlPlane) -> list[tuple[str, str, int]]:
    def query(s: object) -> list[tuple[str, str, int]]:
        w = WindowSpendRow
        found = s.execute(  # type: ignore[attr-defined]
            select(w.policy_id, w.member, w.window_start).order_by(w.window_start, w.member)
        )
        return [tuple(r) for r in found]

    return await cp.run(query)


async def test_windows_ended_before_the_cutoff_go_in_chunks(
    cp: ControlPlane, clock: FakeClock
) -> None:
    users = await cp.create_policy(policy("users", scope=pb.SCOPE_USER, target="*"), "a")
    team = await cp.create_policy(policy("team"), "a")
    old = [f"user-{i}" for i in range(5)]
    await cp.apply_usage(batch("old", inc(team.id, 1), *[inc(users.id, 1, member=m) for m in old]))
    # 399 days later: a window that ended then is kept; 401 days after the old
    # windows they go, the younger one and the current one stay.
    clock.advance(timedelta(days=399))
    await cp.apply_usage(batch("kept", inc(team.id, 2, at=T0 + timedelta(days=399))))
    assert await cp.forget_old_spend(RETENTION, chunk=2) == 0
    clock.advance(timedelta(days=2))
    await cp.apply_usage(batch("now", inc(team.id, 3, at=T0 + timedelta(days=401))))
    assert await cp.forget_old_spend(RETENTION, chunk=2) == 6  # chunks of 2, 2, 2
    start = int(HOUR_START.timestamp())
    assert await rows(cp) == [
        (team.id, "", start + 399 * 86400),
        (team.id, "", start + 401 * 86400),
    ]
    assert await cp.forget_old_spend(RETENTION, chunk=2) == 0


async def test_a_deleted_policy_leaves_no_spend_and_no_holds(cp: ControlPlane) -> None:
    gone = await cp.create_policy(policy("gone"), "a")
    kept = await cp.create_policy(policy("kept"), "a")
    holds = [
        dp.WindowHold(policy_id=p.id, window_start=timestamp(HOUR_START), held_nanos=5)
        for p in (gone, kept)
    ]
    await cp.apply_usage(
        dp.ReportUsageRequest(
            data_plane_id="dp-1",
            batch_id="b1",
            increments=[inc(gone.id, 1), inc(kept.id, 1)],
            holds=holds,
            holds_seq=1,
        )
    )

    def held(s: object) -> list[str]:
        return list(
            s.scalars(  # type: ignore[attr-defined]
                select(WindowHoldRow.policy_id).order_by(WindowHoldRow.policy_id)
            )
        )

    assert await cp.run(held) == sorted([gone.id, kept.id])
    await cp.delete_policy(gone.id, "", "a")
    assert await cp.run(held) == [kept.id]
    assert [r[0] for r in await rows(cp)] == [kept.id]
    count = await cp.run(lambda s: s.scalar(select(func.count()).select_from(WindowSpendRow)))
    assert count == 1
