"""The store and the control plane's use cases, on SQLite and on PostgreSQL.

Every test here runs twice through the ``db_url`` fixture. The control plane is
driven directly (control_plane.service.ControlPlane), with a FakeClock so
window boundaries are reached by moving the clock, never by sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.orm import Session

from control_plane.api.budgets import mask_merger
from control_plane.errors import EtagMismatch, InvalidArgument, NotFound
from control_plane.hub import StateHub
from control_plane.service import ControlPlane
from control_plane.store import repo
from control_plane.store.db import create_db_engine, migrate
from control_plane.store.models import AppliedBatchRow, Base, PolicyRow, WindowSpendRow
from spendgate.domain.policies import hash_api_key
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.harness import FakeClock

USD = 1_000_000_000
# A Monday, mid-hour, with microseconds (to check they survive the database).
T0 = datetime(2025, 3, 10, 12, 17, 30, 123456, tzinfo=UTC)
HOUR_START = datetime(2025, 3, 10, 12, tzinfo=UTC)
HOUR_END = datetime(2025, 3, 10, 13, tzinfo=UTC)
DAY_START = datetime(2025, 3, 10, tzinfo=UTC)
DAY_END = datetime(2025, 3, 11, tzinfo=UTC)


# ---- fixtures and helpers ---------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def cp(engine: Engine, clock: FakeClock) -> Iterator[ControlPlane]:
    c = ControlPlane(engine, StateHub(), clock=clock)
    yield c
    c.close()


def policy(
    name: str = "team budget",
    *,
    amount: str = "10.00",
    unit: int = pb.WINDOW_UNIT_HOURS,
    count: int = 1,
    timezone: str = "",
    scope: int = pb.SCOPE_GLOBAL,
    target: str = "",
    action: int = pb.ACTION_REJECT,
    thresholds: tuple[int, ...] = (),
) -> pb.BudgetPolicy:
    return pb.BudgetPolicy(
        name=name,
        amount_usd=amount,
        window=pb.BudgetWindow(unit=unit, count=count),
        timezone=timezone,
        action=action,
        scope=scope,
        target=target,
        alert_thresholds=thresholds,
    )


def inc(
    policy_id: str,
    cost_nanos: int,
    *,
    at: datetime = T0,
    member: str = "",
    requests: int = 1,
    estimated: int = 0,
) -> dp.SpendIncrement:
    return dp.SpendIncrement(
        policy_id=policy_id,
        member=member,
        window_start=timestamp(at),
        cost_nanos=cost_nanos,
        request_count=requests,
        estimated_count=estimated,
    )


def batch(
    batch_id: str, *increments: dp.SpendIncrement, dp_id: str = "dp-1"
) -> dp.ReportUsageRequest:
    return dp.ReportUsageRequest(data_plane_id=dp_id, batch_id=batch_id, increments=increments)


def window_spend(
    policy_id: str,
    spent: int,
    limit: int,
    requests: int,
    *,
    member: str = "",
    start: datetime = HOUR_START,
    end: datetime = HOUR_END,
) -> dp.WindowSpend:
    return dp.WindowSpend(
        policy_id=policy_id,
        member=member,
        window_start=timestamp(start),
        window_end=timestamp(end),
        spent_nanos=spent,
        limit_nanos=limit,
        exceeded=spent >= limit,
        request_count=requests,
    )


def entry(
    p: pb.BudgetPolicy,
    *,
    spent: str,
    remaining: str,
    exceeded: bool = False,
    requests: int = 0,
    member: str = "",
    start: datetime = HOUR_START,
    end: datetime = HOUR_END,
) -> pb.SpendEntry:
    return pb.SpendEntry(
        policy_id=p.id,
        policy_name=p.name,
        scope=p.scope,
        target=p.target,
        member=member,
        action=p.action,
        window_start=timestamp(start),
        window_end=timestamp(end),
        spent_usd=spent,
        limit_usd=p.amount_usd,
        remaining_usd=remaining,
        exceeded=exceeded,
        request_count=requests,
    )


def fields(e: InvalidArgument) -> list[str]:
    return [v.field for v in e.violations]


def spend_rows(engine: Engine) -> list[tuple[str, str, int, int, int, int]]:
    with Session(engine) as s:
        rows = s.scalars(
            select(WindowSpendRow).order_by(
                WindowSpendRow.policy_id, WindowSpendRow.member, WindowSpendRow.window_start
            )
        ).all()
        return [
            (
                r.policy_id,
                r.member,
                r.window_start,
                r.window_end,
                r.spent_nanos,
                r.request_count,
            )
            for r in rows
        ]


def ts(t: datetime) -> int:
    return int(t.timestamp())


async def all_spend(cp: ControlPlane, policy_id: str = "", member: str = "") -> list[pb.SpendEntry]:
    entries, token = await cp.list_spend(policy_id, member, 0, "")
    assert token == ""
    return entries


# ---- schema -----------------------------------------------------------------


def test_migrations_create_the_schema_models_describe(db_url: str) -> None:
    engine = create_db_engine(db_url)
    try:
        migrate(engine)
        migrate(engine)  # a second start-up is a no-op
        insp = inspect(engine)
        assert set(insp.get_table_names()) == {
            "alembic_version",
            "applied_batches",
            "budget_policies",
            "window_spend",
            "webhooks",
            "webhook_events",
            "webhook_deliveries",
            "webhook_delivery_attempts",
            "price_overrides",
            "window_holds",
        }
        assert insp.get_pk_constraint("window_spend")["constrained_columns"] == [
            "policy_id",
            "member",
            "window_start",
        ]
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            assert ctx.get_current_revision() == "0004"
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()


# ---- policies -----------------------------------------------------------------


async def test_create_and_get_return_the_stored_policy(cp: ControlPlane) -> None:
    msg = policy(
        "  Alice's models  ",
        amount="$12.5",
        unit=pb.WINDOW_UNIT_DAYS,
        timezone="Europe/Berlin",
        scope=pb.SCOPE_MODEL,
        target=" GPT-4o ",
        action=pb.ACTION_ALERT,
        thresholds=(100, 50, 80),
    )
    msg.description = "per-model cap"
    created = await cp.create_policy(msg, "alice")

    assert created.id.startswith("bp_") and len(created.id) == 29
    expected = pb.BudgetPolicy(
        id=created.id,
        name="Alice's models",
        description="per-model cap",
        amount_usd="12.50",
        window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1, week_start=pb.WEEKDAY_MONDAY),
        timezone="Europe/Berlin",
        action=pb.ACTION_ALERT,
        scope=pb.SCOPE_MODEL,
        target="gpt-4o",
        alert_thresholds=[50, 80, 100],
        enabled=True,
        create_time=timestamp(T0),
        update_time=timestamp(T0),
        created_by="alice",
        updated_by="alice",
        etag="v1",
    )
    assert created == expected
    assert await cp.get_policy(created.id) == expected
    with pytest.raises(NotFound):
        await cp.get_policy("bp_doesnotexist")

    off = policy("disabled")
    off.enabled = False
    stored = await cp.get_policy((await cp.create_policy(off, "alice")).id)
    assert stored.HasField("enabled") and stored.enabled is False


async def test_api_key_targets_are_stored_hashed(cp: ControlPlane, engine: Engine) -> None:
    raw = "sk-proj-very-secret-key-1234"
    created = await cp.create_policy(policy(scope=pb.SCOPE_API_KEY, target=raw), "a")
    assert created.target == hash_api_key(raw)
    with Session(engine) as s:
        assert s.scalars(select(PolicyRow.target)).all() == [hash_api_key(raw)]


async def test_list_policies_pages(cp: ControlPlane) -> None:
    created = [await cp.create_policy(policy(f"p{i}"), "admin") for i in range(7)]
    ids = sorted(p.id for p in created)
    assert len(set(ids)) == 7

    pages: list[list[str]] = []
    tokens: list[str] = []
    token = ""
    while True:
        page, token = await cp.list_policies(3, token)
        pages.append([p.id for p in page])
        tokens.append(token)
        if not token:
            break
    assert pages == [ids[0:3], ids[3:6], ids[6:7]]
    assert all(tokens[:2]) and tokens[2] == ""

    everything, token = await cp.list_policies(0, "")  # default page size 50
    assert token == ""
    assert everything == sorted(created, key=lambda p: p.id)

    # Exactly one full page: no token pointing at an empty page.
    page, token = await cp.list_policies(7, "")
    assert [p.id for p in page] == ids and token == ""

    for bad in ("not a token!!", repo.encode_page_token("a", "b"), "////"):
        with pytest.raises(InvalidArgument) as e:
            await cp.list_policies(3, bad)
        assert fields(e.value) == ["page_token"]
    with pytest.raises(InvalidArgument) as e:
        await cp.list_policies(-1, "")
    assert fields(e.value) == ["page_size"]


async def test_update_applies_the_mask_and_bumps_the_version(
    cp: ControlPlane, clock: FakeClock
) -> None:
    created = await cp.create_policy(policy("orig", thresholds=(50,)), "alice")
    clock.advance(timedelta(minutes=5))
    t1 = clock()

    # Only masked fields change; the patch's other fields are ignored.
    patch = policy("ignored", amount="20", unit=pb.WINDOW_UNIT_DAYS, thresholds=(90,))
    updated = await cp.update_policy(
        created.id,
        mask_merger(patch, FieldMask(paths=["amount_usd", "alert_thresholds"])),
        created.etag,
        "bob",
    )
    expected = pb.BudgetPolicy()
    expected.CopyFrom(created)
    expected.amount_usd = "20.00"
    expected.alert_thresholds[:] = [90]
    expected.update_time.CopyFrom(timestamp(t1))
    expected.updated_by = "bob"
    expected.etag = "v2"
    assert updated == expected
    assert await cp.get_policy(created.id) == expected

    # A sub-field path replaces just that sub-field.
    v3 = await cp.update_policy(
        created.id,
        mask_merger(
            pb.BudgetPolicy(window=pb.BudgetWindow(count=3)), FieldMask(paths=["window.count"])
        ),
        "v2",
        "bob",
    )
    assert v3.window == pb.BudgetWindow(
        unit=pb.WINDOW_UNIT_HOURS, count=3, week_start=pb.WEEKDAY_MONDAY
    )
    assert v3.etag == "v3" and v3.name == "orig"

    # A stale etag is refused and nothing changes.
    with pytest.raises(EtagMismatch):
        await cp.update_policy(
            created.id,
            mask_merger(policy(amount="99"), FieldMask(paths=["amount_usd"])),
            "v2",
            "mallory",
        )
    assert await cp.get_policy(created.id) == v3

    # The merged policy is validated: replacing "window" with one lacking a
    # count is invalid, and the stored policy is untouched.
    with pytest.raises(InvalidArgument) as e:
        await cp.update_policy(
            created.id,
            mask_merger(
                pb.BudgetPolicy(window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS)),
                FieldMask(paths=["window"]),
            ),
            "v3",
            "bob",
        )
    assert fields(e.value) == ["window.count"]
    with pytest.raises(InvalidArgument) as e:
        await cp.update_policy(
            created.id,
            mask_merger(policy(amount="-1"), FieldMask(paths=["amount_usd"])),
            "",
            "bob",
        )
    assert fields(e.value) == ["amount_usd"]
    assert await cp.get_policy(created.id) == v3

    # Empty mask: every writable field is replaced (enabled defaults to true);
    # an empty etag skips the check.
    full = policy(
        "renamed",
        amount="7",
        unit=pb.WINDOW_UNIT_MINUTES,
        count=15,
        scope=pb.SCOPE_USER,
        target="*",
        action=pb.ACTION_ALERT,
    )
    v4 = await cp.update_policy(created.id, mask_merger(full, FieldMask()), "", "carol")
    assert v4 == pb.BudgetPolicy(
        id=created.id,
        name="renamed",
        amount_usd="7.00",
        window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_MINUTES, count=15, week_start=pb.WEEKDAY_MONDAY),
        timezone="UTC",
        action=pb.ACTION_ALERT,
        scope=pb.SCOPE_USER,
        target="*",
        enabled=True,
        create_time=timestamp(T0),
        update_time=timestamp(t1),
        created_by="alice",
        updated_by="carol",
        etag="v4",
    )

    # Disabling through the mask.
    off = pb.BudgetPolicy(enabled=False)
    v5 = await cp.update_policy(
        created.id, mask_merger(off, FieldMask(paths=["enabled"])), "v4", "c"
    )
    assert v5.HasField("enabled") and v5.enabled is False and v5.etag == "v5"

    for path in ("id", "etag", "create_time", "bogus"):
        with pytest.raises(InvalidArgument) as e:
            mask_merger(pb.BudgetPolicy(), FieldMask(paths=[path]))
        assert fields(e.value) == ["update_mask"]

    with pytest.raises(NotFound):
        await cp.update_policy("bp_missing", mask_merger(full, FieldMask()), "", "x")


async def test_delete_removes_policy_and_its_spend(cp: ControlPlane, engine: Engine) -> None:
    keep = await cp.create_policy(policy("keep"), "a")
    gone = await cp.create_policy(policy("gone", scope=pb.SCOPE_USER, target="*"), "a")
    await cp.apply_usage(
        batch(
            "b1",
            inc(keep.id, 1 * USD),
            inc(gone.id, 2 * USD, member="u1"),
            inc(gone.id, 3 * USD, member="u2"),
            inc(gone.id, 4 * USD, member="u2", at=T0 - timedelta(hours=1)),
        )
    )
    assert len(spend_rows(engine)) == 4

    with pytest.raises(EtagMismatch):
        await cp.delete_policy(gone.id, "v7", "a")
    await cp.delete_policy(gone.id, gone.etag, "a")

    with pytest.raises(NotFound):
        await cp.get_policy(gone.id)
    with pytest.raises(NotFound):
        await cp.delete_policy(gone.id, "", "a")
    with pytest.raises(NotFound):
        await cp.list_spend(gone.id, "", 0, "")
    assert spend_rows(engine) == [
        (keep.id, "", ts(HOUR_START), ts(HOUR_END), 1 * USD, 1),
    ]
    policies, _ = await cp.list_policies(0, "")
    assert [p.id for p in policies] == [keep.id]

    # Usage a data plane still reports for the deleted policy is dropped.
    result = await cp.apply_usage(batch("b2", inc(gone.id, USD, member="u1")))
    assert (result.duplicate, list(result.spend), result.unknown_policy_increments) == (
        False,
        [],
        1,
    )
    assert len(spend_rows(engine)) == 1


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

    # Each applied batch was published once; the duplicate was not.
    assert hub_updates == [dp.StateUpdate(spend=r1.spend), dp.StateUpdate(spend=r2.spend)]
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
        (batch("b", inc(p.id, -1)), ["increments[0]"]),
        (batch("b", inc(p.id, 1), inc(p.id, 1, requests=-1)), ["increments[1]"]),
        (batch("b", inc(p.id, 1, estimated=-2)), ["increments[0]"]),
        (batch("b", inc("", 1)), ["increments[0].policy_id"]),
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
        await cp.list_spend("", "", 10, repo.encode_page_token("only-one-part"))
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
    from datetime import timedelta

    from control_plane.hub import StateHub
    from control_plane.service import ControlPlane
    from control_plane.store.db import create_db_engine, migrate
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
