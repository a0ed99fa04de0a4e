"""The schema and policy use cases of the control plane's store.

Every test runs on SQLite and on PostgreSQL (``db_url``); the control plane
is driven directly, with a FakeClock, never by sleeping.
"""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import Engine, inspect, select
from sqlalchemy.orm import Session

from control_plane.api.budgets import mask_merger
from control_plane.errors import EtagMismatch, InvalidArgument, NotFound
from control_plane.service import ControlPlane
from control_plane.store.db import create_db_engine, migrate
from control_plane.store.models import Base, PolicyRow
from spendgate.domain.policies import hash_api_key
from spendgate.v1 import budget_pb2 as pb
from spendgate.wire import timestamp
from tests.harness import FakeClock
from tests.store.builders import (
    HOUR_END,
    HOUR_START,
    T0,
    USD,
    batch,
    fields,
    inc,
    policy,
    spend_rows,
    ts,
)

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
            "quarantined_usage",
            "spend_adjustments",
            "server_keys",
            "usage_rollups",
            "rollup_tags",
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
            assert ctx.get_current_revision() == "0018"
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

    tokens = await cp.page_tokens()
    forged = base64.urlsafe_b64encode(b"policies\x1f" + ids[2].encode()).decode()
    for bad in (
        "not a token!!",
        tokens.encode("policies", "a", "b"),  # signed, but not this list's shape
        tokens.encode("webhooks", ids[2]),  # another list's token
        forged,  # the unsigned form
        forged + "." + "A" * 22,  # a made-up signature
        "A" * 100_000,
        "////",
    ):
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
