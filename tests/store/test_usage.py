"""Usage batches and window spend in the control plane's store.

Every test runs on SQLite and on PostgreSQL (``db_url``); the control plane
is driven directly, with a FakeClock, never by sleeping.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from control_plane.errors import InvalidArgument, NotFound
from control_plane.service import ControlPlane
from control_plane.store.models import AppliedBatchRow, WindowSpendRow
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
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
    fields,
    inc,
    policy,
    spend_rows,
    ts,
    window_spend,
)

# ---- usage ----------------------------------------------------------------------


async def test_apply_usage_totals_and_idempotency(cp: ControlPlane, engine: Engine) -> None:
    p = await cp.create_policy(policy(amount="10"), "a")
    hub_updates: list[dp.StateUpdate] = []

    async with cp.hub.subscribe() as sub:
        r1 = await cp.apply_usage(
            batch("batch-1", inc(p.id, 1_500_000_000), inc(p.id, 2 * USD, requests=3, estimated=1))
        )
        assert r1.duplicate is False and r1.unknown_policy_increments == 0
        assert r1.spend == [window_spend(p.id, 3_500_000_000, 10 * USD, 4)]

        r2 = await cp.apply_usage(batch("batch-2", inc(p.id, 250_000_000)))
        assert r2.spend == [window_spend(p.id, 3_750_000_000, 10 * USD, 5)]

        # A retry of batch-1 is acknowledged, not counted; it reports the totals now.
        again = await cp.apply_usage(
            batch("batch-1", inc(p.id, 1_500_000_000), inc(p.id, 2 * USD, requests=3, estimated=1))
        )
        assert again.duplicate is True
        assert again.spend == [window_spend(p.id, 3_750_000_000, 10 * USD, 5)]

        while not sub.queue.empty():
            hub_updates.append(await sub.next())

    # Each applied batch was published once, numbered after the policy's
    # creation (seq 1) and marked with its id; the duplicate was not.
    assert hub_updates == [
        dp.StateUpdate(
            spend=r1.spend, seq=2, applied=dp.AppliedBatch(data_plane_id="dp-1", batch_id="batch-1")
        ),
        dp.StateUpdate(
            spend=r2.spend, seq=3, applied=dp.AppliedBatch(data_plane_id="dp-1", batch_id="batch-2")
        ),
    ]
    assert spend_rows(engine) == [(p.id, "", ts(HOUR_START), ts(HOUR_END), 3_750_000_000, 5)]
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(AppliedBatchRow)) == 2
        est = s.scalar(select(WindowSpendRow.estimated_count))
    assert est == 1

    # Reaching the limit exactly means exceeded.
    r3 = await cp.apply_usage(batch("batch-3", inc(p.id, 6_250_000_000)))
    assert r3.spend == [window_spend(p.id, 10 * USD, 10 * USD, 6)]
    assert r3.spend[0].exceeded is True


async def test_apply_usage_rejects_bad_batches_without_writing(
    cp: ControlPlane, engine: Engine
) -> None:
    p = await cp.create_policy(policy(), "a")
    cases = [
        (batch("", inc(p.id, 1)), ["batch_id"]),
        (batch("x" * 81, inc(p.id, 1)), ["batch_id"]),
    ]
    for req, expected in cases:
        with pytest.raises(InvalidArgument) as e:
            await cp.apply_usage(req)
        assert fields(e.value) == expected
    assert spend_rows(engine) == []

    # The refused batch id was not claimed: the corrected batch applies.
    ok = await cp.apply_usage(batch("b", inc(p.id, 5)))
    assert ok.duplicate is False
    assert ok.spend == [window_spend(p.id, 5, 10 * USD, 1)]


async def test_apply_usage_unknown_policies_members_and_rebucketing(
    cp: ControlPlane, engine: Engine
) -> None:
    glob = await cp.create_policy(policy("global", amount="100"), "a")
    users = await cp.create_policy(
        policy("each user", amount="5", unit=pb.WINDOW_UNIT_DAYS, scope=pb.SCOPE_USER, target="*"),
        "a",
    )
    # New York is on EDT (UTC-4) on 2025-03-10: days run 04:00Z..04:00Z.
    ny = await cp.create_policy(
        policy("ny", amount="1", unit=pb.WINDOW_UNIT_DAYS, timezone="America/New_York"), "a"
    )
    tags = await cp.create_policy(
        policy("teams", amount="3", scope=pb.SCOPE_TAG, target="team=*"), "a"
    )

    result = await cp.apply_usage(
        batch(
            "b1",
            inc("bp_unknown", 9 * USD),
            # Non-wildcard policy: the member a (buggy) data plane sent is dropped.
            inc(glob.id, 1 * USD, member="alice"),
            # Mid-window starts land in the window containing them.
            inc(glob.id, 2 * USD, at=datetime(2025, 3, 10, 12, 59, 59, tzinfo=UTC)),
            # ... and an earlier window stays separate.
            inc(glob.id, 4 * USD, at=datetime(2025, 3, 10, 11, 30, tzinfo=UTC)),
            inc(users.id, 1 * USD, member="alice", at=datetime(2025, 3, 10, 23, tzinfo=UTC)),
            inc(users.id, 2 * USD, member="bob"),
            inc(users.id, 3 * USD, member="alice"),
            inc(ny.id, 500_000_000, at=datetime(2025, 3, 10, 3, 59, tzinfo=UTC)),
            inc(ny.id, 700_000_000, at=datetime(2025, 3, 10, 4, 0, tzinfo=UTC)),
            inc(tags.id, 1 * USD, member="infra"),
            inc("bp_unknown_too", 1),
        )
    )
    assert result.duplicate is False
    assert result.unknown_policy_increments == 2
    ny_prev = (datetime(2025, 3, 9, 5, tzinfo=UTC), datetime(2025, 3, 10, 4, tzinfo=UTC))
    ny_cur = (datetime(2025, 3, 10, 4, tzinfo=UTC), datetime(2025, 3, 11, 4, tzinfo=UTC))
    expected = [
        window_spend(
            glob.id, 4 * USD, 100 * USD, 1, start=HOUR_START - timedelta(hours=1), end=HOUR_START
        ),
        window_spend(glob.id, 3 * USD, 100 * USD, 2),
        window_spend(ny.id, 500_000_000, USD, 1, start=ny_prev[0], end=ny_prev[1]),
        window_spend(ny.id, 700_000_000, USD, 1, start=ny_cur[0], end=ny_cur[1]),
        window_spend(tags.id, 1 * USD, 3 * USD, 1, member="infra"),
        window_spend(users.id, 4 * USD, 5 * USD, 2, member="alice", start=DAY_START, end=DAY_END),
        window_spend(users.id, 2 * USD, 5 * USD, 1, member="bob", start=DAY_START, end=DAY_END),
    ]

    def key(w: dp.WindowSpend) -> tuple[str, str, int]:
        return (w.policy_id, w.member, w.window_start.seconds)

    assert sorted(result.spend, key=key) == sorted(expected, key=key)
    assert len(spend_rows(engine)) == 7


async def test_list_spend_entries_filters_and_pages(cp: ControlPlane) -> None:
    glob = await cp.create_policy(policy("global", amount="10"), "a")
    model = await cp.create_policy(
        policy("model", amount="1", scope=pb.SCOPE_MODEL, target="gpt-4o", action=pb.ACTION_ALERT),
        "a",
    )
    users = await cp.create_policy(
        policy("users", amount="5", unit=pb.WINDOW_UNIT_DAYS, scope=pb.SCOPE_USER, target="*"),
        "a",
    )
    idle_users = await cp.create_policy(
        policy("idle", amount="5", scope=pb.SCOPE_USER, target="*"), "a"
    )

    # Nothing spent yet: one zero entry per non-wildcard policy, none for wildcards.
    zero_g = entry(glob, spent="0.00", remaining="10.00")
    zero_m = entry(model, spent="0.00", remaining="1.00")
    assert await all_spend(cp) == sorted([zero_g, zero_m], key=lambda e: e.policy_id)

    await cp.apply_usage(
        batch(
            "b1",
            inc(glob.id, 2_250_000_000, requests=3),
            inc(model.id, 1 * USD),  # exactly the limit
            inc(users.id, 1 * USD, member="alice"),
            inc(users.id, 6 * USD, member="bob", requests=2),
        )
    )
    g = entry(glob, spent="2.25", remaining="7.75", requests=3)
    m = entry(model, spent="1.00", remaining="0.00", exceeded=True, requests=1)
    alice = entry(
        users,
        spent="1.00",
        remaining="4.00",
        requests=1,
        member="alice",
        start=DAY_START,
        end=DAY_END,
    )
    bob = entry(
        users,
        spent="6.00",
        remaining="0.00",
        exceeded=True,
        requests=2,
        member="bob",
        start=DAY_START,
        end=DAY_END,
    )
    everything = sorted([g, m, alice, bob], key=lambda e: (e.policy_id, e.member))
    assert await all_spend(cp) == everything

    assert await all_spend(cp, users.id) == [alice, bob]
    assert await all_spend(cp, users.id, "bob") == [bob]
    assert await all_spend(cp, "", "alice") == [alice]
    assert await all_spend(cp, glob.id) == [g]
    assert await all_spend(cp, idle_users.id) == []
    assert await all_spend(cp, glob.id, "alice") == []

    for size in (1, 2, 3):
        pages: list[list[pb.SpendEntry]] = []
        token = ""
        while True:
            page, token = await cp.list_spend("", "", size, token)
            pages.append(list(page))
            if not token:
                break
        assert [e for p in pages for e in p] == everything
        assert all(len(p) == size for p in pages[:-1]) and 0 < len(pages[-1]) <= size
    page, token = await cp.list_spend(users.id, "", 1, "")
    assert (page, bool(token)) == ([alice], True)
    page, token = await cp.list_spend(users.id, "", 1, token)
    assert (page, token) == ([bob], "")

    with pytest.raises(InvalidArgument) as e:
        await cp.list_spend("", "", 10, "garbage!")
    assert fields(e.value) == ["page_token"]
    with pytest.raises(InvalidArgument) as e:
        await cp.list_spend("", "", 10, (await cp.page_tokens()).encode("spend", "only-one-part"))
    assert fields(e.value) == ["page_token"]
    with pytest.raises(NotFound):
        await cp.list_spend("bp_nope", "", 0, "")


async def test_ended_windows_drop_out_and_new_ones_start_at_zero(
    cp: ControlPlane, clock: FakeClock, engine: Engine
) -> None:
    hourly = await cp.create_policy(policy("hourly", amount="10"), "a")
    users = await cp.create_policy(
        policy("users", amount="5", scope=pb.SCOPE_USER, target="*"), "a"
    )
    await cp.apply_usage(
        batch("b1", inc(hourly.id, 9 * USD), inc(users.id, 5 * USD, member="carol"))
    )
    assert await all_spend(cp) == sorted(
        [
            entry(hourly, spent="9.00", remaining="1.00", requests=1),
            entry(users, spent="5.00", remaining="0.00", exceeded=True, requests=1, member="carol"),
        ],
        key=lambda e: e.policy_id,
    )
    snap = await cp.snapshot()
    assert len(snap.spend) == 2

    # One microsecond before the end the window is still current...
    clock.set(HOUR_END - timedelta(microseconds=1))
    assert len(await all_spend(cp)) == 2
    # ... and at its end it is over.
    clock.set(HOUR_END)
    next_start, next_end = HOUR_END, HOUR_END + timedelta(hours=1)
    assert await all_spend(cp) == [
        entry(hourly, spent="0.00", remaining="10.00", start=next_start, end=next_end)
    ]
    snap = await cp.snapshot()
    assert list(snap.spend) == []
    assert snap.full_snapshot is True
    assert [p.id for p in snap.policies.policies] == sorted([hourly.id, users.id])
    assert snap.server_time == timestamp(HOUR_END)

    # Spend in the new window starts from zero; the old row is history.
    r = await cp.apply_usage(
        batch(
            "b2",
            inc(hourly.id, 2 * USD, at=HOUR_END),
            inc(users.id, USD, member="carol", at=HOUR_END),
        )
    )
    assert sorted(r.spend, key=lambda w: w.policy_id) == sorted(
        [
            window_spend(hourly.id, 2 * USD, 10 * USD, 1, start=next_start, end=next_end),
            window_spend(users.id, USD, 5 * USD, 1, member="carol", start=next_start, end=next_end),
        ],
        key=lambda w: w.policy_id,
    )
    assert await all_spend(cp, hourly.id) == [
        entry(hourly, spent="2.00", remaining="8.00", requests=1, start=next_start, end=next_end)
    ]
    assert await all_spend(cp, users.id) == [
        entry(
            users,
            spent="1.00",
            remaining="4.00",
            requests=1,
            member="carol",
            start=next_start,
            end=next_end,
        )
    ]
    assert len(spend_rows(engine)) == 4
