"""Spend adjustments in the control plane's store (control_plane/adjustments.py).

Every test runs on SQLite and on PostgreSQL (``db_url``); the control plane
is driven directly, with a FakeClock, never by sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from control_plane.errors import InvalidArgument, NotFound
from control_plane.hub import StateHub
from control_plane.service import ControlPlane
from control_plane.store.models import SpendAdjustmentRow, WebhookEventRow, WindowSpendRow
from control_plane.webhooks.events import EXCEEDED, THRESHOLD_CROSSED
from spendgate.domain.policies import hash_api_key
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.harness import FakeClock
from tests.store.builders import (
    HOUR_END,
    HOUR_START,
    T0,
    USD,
    all_spend,
    batch,
    fields,
    inc,
    policy,
    spend_rows,
    ts,
)


def adj(policy_id: str, amount: str, reason: str = "provider double-reported", member: str = ""):
    return pb.SpendAdjustment(policy_id=policy_id, amount_usd=amount, reason=reason, member=member)


def events(engine: Engine) -> list[tuple[str, str, int]]:
    with Session(engine) as s:
        return [
            (r.kind, r.member, r.threshold)
            for r in s.scalars(select(WebhookEventRow).order_by(WebhookEventRow.create_time))
        ]


async def test_negative_adjustment_lowers_spend_audits_and_pushes(
    cp: ControlPlane, engine: Engine
) -> None:
    p = await cp.create_policy(policy(amount="10"), "a")
    await cp.apply_usage(batch("b1", inc(p.id, 12 * USD, requests=3)))
    async with cp.hub.subscribe() as sub:
        a = await cp.create_adjustment(adj(p.id, "-11.50", "  provider double-reported "), "admin")
        pushed = await sub.next()
    assert a.id.startswith("sa_") and len(a.id) == 29
    assert (a.policy_id, a.policy_name, a.member) == (p.id, p.name, "")
    assert (a.amount_usd, a.spent_before_usd, a.spent_after_usd) == ("-11.50", "12.00", "0.50")
    assert (a.reason, a.created_by) == ("provider double-reported", "admin")
    assert (a.window_start, a.window_end) == (timestamp(HOUR_START), timestamp(HOUR_END))
    assert a.create_time == timestamp(T0)
    # Applied to the window, which data planes receive with its adjustment_seq.
    assert spend_rows(engine) == [(p.id, "", ts(HOUR_START), ts(HOUR_END), USD // 2, 3)]
    # The hub numbers what it pushes (seq); the change itself is the spend.
    assert list(pushed.spend) == [
        dp.WindowSpend(
            policy_id=p.id,
            window_start=timestamp(HOUR_START),
            window_end=timestamp(HOUR_END),
            spent_nanos=USD // 2,
            limit_nanos=10 * USD,
            exceeded=False,
            request_count=3,
            adjustment_seq=1,
        )
    ]
    [e] = await all_spend(cp, p.id)
    assert (e.spent_usd, e.remaining_usd, e.exceeded) == ("0.50", "9.50", False)
    assert (e.adjusted_usd, e.adjustment_count) == ("-11.50", 1)
    # Later usage adds to the adjusted total, and acknowledges it with the seq.
    r = await cp.apply_usage(batch("b2", inc(p.id, USD)))
    assert [(w.spent_nanos, w.adjustment_seq) for w in r.spend] == [(USD + USD // 2, 1)]
    # A second adjustment: the seq grows, the net is kept.
    b = await cp.create_adjustment(adj(p.id, "+0.25", "under-reported"), "admin")
    assert (b.amount_usd, b.spent_before_usd, b.spent_after_usd) == ("0.25", "1.50", "1.75")
    [e] = await all_spend(cp, p.id)
    assert (e.spent_usd, e.adjusted_usd, e.adjustment_count) == ("1.75", "-11.25", 2)
    snap = await cp.snapshot()
    assert [(w.spent_nanos, w.adjustment_seq) for w in snap.spend] == [(1_750_000_000, 2)]
    listed, token = await cp.list_adjustments(p.id, "", 0, "")
    assert [x.id for x in listed] == [b.id, a.id] and token == ""
    assert listed[1] == a


async def test_adjustment_that_would_make_spend_negative_is_refused(
    cp: ControlPlane, engine: Engine
) -> None:
    p = await cp.create_policy(policy(amount="10"), "a")
    await cp.apply_usage(batch("b1", inc(p.id, 12 * USD, requests=3)))
    with pytest.raises(InvalidArgument) as e:
        await cp.create_adjustment(adj(p.id, "-12.000000001"), "admin")
    assert fields(e.value) == ["adjustment.amount_usd"]
    assert "at most -12.00 can be subtracted" in str(e.value)
    # Nothing half-written: no record, spend unchanged, no row for a new window.
    assert spend_rows(engine) == [(p.id, "", ts(HOUR_START), ts(HOUR_END), 12 * USD, 3)]
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(SpendAdjustmentRow)) == 0
    # On a window with no spend yet, any negative amount is refused, and no row is left.
    q = await cp.create_policy(policy(name="other", amount="10"), "a")
    with pytest.raises(InvalidArgument, match="negative"):
        await cp.create_adjustment(adj(q.id, "-0.01"), "admin")
    assert [r[0] for r in spend_rows(engine)] == [p.id]


async def test_positive_adjustment_raises_the_events_usage_would(
    cp: ControlPlane, engine: Engine
) -> None:
    p = await cp.create_policy(policy(amount="10", thresholds=(50, 80)), "a")
    await cp.apply_usage(batch("b1", inc(p.id, 4 * USD)))
    assert events(engine) == []
    a = await cp.create_adjustment(adj(p.id, "6", "provider under-reported"), "admin")
    assert (a.spent_after_usd, a.amount_usd) == ("10.00", "6.00")
    assert events(engine) == [
        (THRESHOLD_CROSSED, "", 50),
        (THRESHOLD_CROSSED, "", 80),
        (EXCEEDED, "", 0),
    ]
    assert cp.metrics.events[EXCEEDED] == 1 and cp.metrics.adjustments["increase"] == 1
    [e] = await all_spend(cp, p.id)
    assert e.exceeded is True
    # Once per window: lowering and raising again, or more usage, adds none.
    await cp.create_adjustment(adj(p.id, "-5"), "admin")
    await cp.create_adjustment(adj(p.id, "5"), "admin")
    await cp.apply_usage(batch("b2", inc(p.id, USD)))
    assert len(events(engine)) == 3
    assert cp.metrics.adjustments == {"increase": 2, "decrease": 1}


async def test_adjustment_bounded_by_the_maximum_spend(cp: ControlPlane, engine: Engine) -> None:
    p = await cp.create_policy(policy(amount="10"), "a")
    await cp.create_adjustment(adj(p.id, "9223372036.854775807"), "admin")
    with pytest.raises(InvalidArgument, match=r"at most 0\.00 can be added"):
        await cp.create_adjustment(adj(p.id, "0.000000001"), "admin")
    # Saturated usage stays saturated, and a saturated window can be undone in one step.
    await cp.apply_usage(batch("b1", inc(p.id, 5 * USD)))
    await cp.create_adjustment(adj(p.id, "-9223372036.854775807"), "admin")
    assert spend_rows(engine)[0][4] == 0


@pytest.mark.parametrize(
    ("amount", "reason", "bad"),
    [
        ("", "r", ["adjustment.amount_usd"]),
        ("0", "r", ["adjustment.amount_usd"]),
        ("-0.000", "r", ["adjustment.amount_usd"]),
        ("abc", "r", ["adjustment.amount_usd"]),
        ("1e3", "r", ["adjustment.amount_usd"]),
        ("NaN", "r", ["adjustment.amount_usd"]),
        ("0.0000000001", "r", ["adjustment.amount_usd"]),
        ("9223372036.854775808", "r", ["adjustment.amount_usd"]),
        ("-" + "9" * 100, "r", ["adjustment.amount_usd"]),
        ("1", "", ["adjustment.reason"]),
        ("1", "   ", ["adjustment.reason"]),
        ("1", "x" * 501, ["adjustment.reason"]),
        ("1", "two\nlines", ["adjustment.reason"]),
        ("1", "bell\x07", ["adjustment.reason"]),
        ("1", "esc \x1b[31m", ["adjustment.reason"]),
        ("1", "zero\u200bwidth", ["adjustment.reason"]),
        ("1", "nul\x00", ["adjustment.reason"]),
        ("", "", ["adjustment.amount_usd", "adjustment.reason"]),
    ],
)
async def test_invalid_fields_are_refused_naming_them(
    cp: ControlPlane, amount: str, reason: str, bad: list[str]
) -> None:
    p = await cp.create_policy(policy(amount="10"), "a")
    with pytest.raises(InvalidArgument) as e:
        await cp.create_adjustment(adj(p.id, amount, reason), "admin")
    assert fields(e.value) == bad


async def test_reason_of_500_characters_and_unicode_is_kept(cp: ControlPlane) -> None:
    p = await cp.create_policy(policy(amount="10"), "a")
    reason = "Überzählung · 二重計上 " + "x" * 481
    assert len(reason) == 500
    a = await cp.create_adjustment(adj(p.id, "1", reason), "admin")
    assert a.reason == reason


async def test_policy_and_member_checks(cp: ControlPlane) -> None:
    with pytest.raises(NotFound):
        await cp.create_adjustment(adj("bp_nope", "1"), "admin")
    with pytest.raises(InvalidArgument) as e:
        await cp.create_adjustment(adj("", "1"), "admin")
    assert fields(e.value) == ["adjustment.policy_id"]
    one = await cp.create_policy(policy(amount="10"), "a")
    with pytest.raises(InvalidArgument, match="must be empty") as e:
        await cp.create_adjustment(adj(one.id, "1", member="alice"), "admin")
    assert fields(e.value) == ["adjustment.member"]
    users = await cp.create_policy(
        policy(name="per user", amount="5", scope=pb.SCOPE_USER, target="*"), "a"
    )
    for member, why in [
        ("", "is required"),
        ("*", "not '*'"),
        ("bob\x00", "control"),
        ("\u0430lice", "scripts"),
        ("x" * 300, "longer than 256"),
    ]:
        with pytest.raises(InvalidArgument, match=why) as e:
            await cp.create_adjustment(adj(users.id, "1", member=member), "admin")
        assert fields(e.value) == ["adjustment.member"], member


async def test_members_take_the_form_the_data_plane_charges(
    cp: ControlPlane, engine: Engine
) -> None:
    users = await cp.create_policy(
        policy(name="per user", amount="5", scope=pb.SCOPE_USER, target="*"), "a"
    )
    await cp.apply_usage(batch("b1", inc(users.id, 2 * USD, member="alice")))
    a = await cp.create_adjustment(adj(users.id, "-1", member=" \uff21LICE "), "admin")
    assert (a.member, a.spent_before_usd, a.spent_after_usd) == ("alice", "2.00", "1.00")
    keys = await cp.create_policy(
        policy(name="per key", amount="5", scope=pb.SCOPE_API_KEY, target="*"), "a"
    )
    b = await cp.create_adjustment(adj(keys.id, "1", member="sk-live-123"), "admin")
    assert b.member == hash_api_key("sk-live-123")
    c = await cp.create_adjustment(adj(keys.id, "1", member=hash_api_key("sk-live-123")), "admin")
    assert c.spent_after_usd == "2.00"
    models = await cp.create_policy(
        policy(name="per model", amount="5", scope=pb.SCOPE_MODEL, target="*"), "a"
    )
    d = await cp.create_adjustment(adj(models.id, "1", member="GPT-4o"), "admin")
    assert d.member == "gpt-4o"
    tags = await cp.create_policy(
        policy(name="per team", amount="5", scope=pb.SCOPE_TAG, target="team=*"), "a"
    )
    e = await cp.create_adjustment(adj(tags.id, "1", member="Red"), "admin")
    assert e.member == "red"
    # Listing by member canonicalises it for the policy's scope.
    listed, _ = await cp.list_adjustments(users.id, "Alice", 0, "")
    assert [x.id for x in listed] == [a.id]
    listed, _ = await cp.list_adjustments(keys.id, "sk-live-123", 0, "")
    assert [x.id for x in listed] == [c.id, b.id]


async def test_adjustment_goes_to_the_current_window_and_records_outlive_the_policy(
    cp: ControlPlane, clock: FakeClock, engine: Engine
) -> None:
    p = await cp.create_policy(policy(amount="10"), "a")
    first = await cp.create_adjustment(adj(p.id, "3"), "admin")
    clock.advance(timedelta(hours=1))
    second = await cp.create_adjustment(adj(p.id, "1"), "admin")
    assert second.window_start == timestamp(HOUR_END)
    assert second.spent_before_usd == "0.00"  # spend never carries into a new window
    [e] = await all_spend(cp, p.id)
    assert (e.spent_usd, e.adjusted_usd, e.adjustment_count) == ("1.00", "1.00", 1)
    await cp.delete_policy(p.id, "", "a")
    listed, _ = await cp.list_adjustments(p.id, "", 0, "")
    assert [x.id for x in listed] == [second.id, first.id]


async def test_list_pages_newest_first(cp: ControlPlane) -> None:
    p = await cp.create_policy(policy(amount="10"), "a")
    q = await cp.create_policy(policy(name="q", amount="10"), "a")
    made = []
    for i in range(5):
        made.append((await cp.create_adjustment(adj(p.id, f"{i + 1}"), "admin")).id)
    other = await cp.create_adjustment(adj(q.id, "1"), "admin")
    seen, token = [], ""
    while True:
        page, token = await cp.list_adjustments(p.id, "", 2, token)
        seen += [a.id for a in page]
        if not token:
            break
    assert seen == made[::-1]
    everything, _ = await cp.list_adjustments("", "", 0, "")
    assert [a.id for a in everything] == [other.id, *made[::-1]]
    with pytest.raises(InvalidArgument) as e:
        await cp.list_adjustments("", "", 0, "A" * 100)
    assert fields(e.value) == ["page_token"]
    with pytest.raises(InvalidArgument):
        await cp.list_adjustments("", "", -1, "")


def test_concurrent_adjustments_and_usage_sum_exactly(engine: Engine) -> None:
    """Two control planes (as two replicas) on one database: one applies
    usage batches, the other adjustments, at the same time; nothing is lost."""
    clock = FakeClock(T0)
    a = ControlPlane(engine, StateHub(), clock=clock)
    b = ControlPlane(engine, StateHub(), clock=clock)
    try:
        pid = asyncio.run(a.create_policy(policy(amount="1000"), "a")).id
        asyncio.run(a.apply_usage(batch("seed", inc(pid, 100 * USD))))
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def usage() -> None:
            async def go() -> None:
                await asyncio.gather(
                    *(a.apply_usage(batch(f"u{i}", inc(pid, 1_000_001))) for i in range(60))
                )

            try:
                barrier.wait(10)
                asyncio.run(go())
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        def adjust() -> None:
            async def go() -> None:
                for i in range(30):
                    amount = "-0.5" if i % 2 else "0.25"
                    await b.create_adjustment(adj(pid, amount), "admin")

            try:
                barrier.wait(10)
                asyncio.run(go())
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=usage), threading.Thread(target=adjust)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        expected = 100 * USD + 60 * 1_000_001 + 15 * (USD // 4) - 15 * (USD // 2)
        with Session(engine) as s:
            row = s.scalars(select(WindowSpendRow)).one()
            records = s.scalars(select(SpendAdjustmentRow).order_by(SpendAdjustmentRow.id)).all()
        assert (row.spent_nanos, row.request_count) == (expected, 61)
        assert (row.adjusted_nanos, row.adjustment_count) == (-15 * (USD // 4), 30)
        assert sum(r.amount_nanos for r in records) == row.adjusted_nanos
        # Each record saw the spend it changed: before + amount = after.
        assert all(r.spent_before_nanos + r.amount_nanos == r.spent_after_nanos for r in records)
    finally:
        a.close()
        b.close()


async def test_a_retried_request_id_applies_once(cp: ControlPlane, engine: Engine) -> None:
    users = await cp.create_policy(
        policy(name="per user", amount="5", scope=pb.SCOPE_USER, target="*"), "a"
    )
    first = await cp.create_adjustment(adj(users.id, "2", member="Alice"), "admin", "req-1")
    assert first.request_id == "req-1"
    again = await cp.create_adjustment(adj(users.id, "2", member="alice"), "admin", "req-1")
    assert again == first
    assert spend_rows(engine)[0][4] == 2 * USD
    assert cp.metrics.adjustments["increase"] == 1
    for different in (
        adj(users.id, "3", member="alice"),
        adj(users.id, "2", member="bob"),
        adj(users.id, "2", "another reason", member="alice"),
    ):
        with pytest.raises(InvalidArgument, match=first.id) as e:
            await cp.create_adjustment(different, "admin", "req-1")
        assert fields(e.value) == ["request_id"]
    for bad in ("x" * 81, "has space", "new\nline"):
        with pytest.raises(InvalidArgument) as e:
            await cp.create_adjustment(adj(users.id, "2", member="alice"), "admin", bad)
        assert fields(e.value) == ["request_id"]
    assert spend_rows(engine)[0][4] == 2 * USD


def test_concurrent_retries_of_one_request_id_apply_once(engine: Engine) -> None:
    clock = FakeClock(T0)
    cps = [ControlPlane(engine, StateHub(), clock=clock) for _ in range(2)]
    try:
        pid = asyncio.run(cps[0].create_policy(policy(amount="10"), "a")).id
        barrier = threading.Barrier(2)
        made: list[str] = []
        errors: list[BaseException] = []

        def worker(cp: ControlPlane) -> None:
            try:
                barrier.wait(10)
                made.append(asyncio.run(cp.create_adjustment(adj(pid, "1"), "admin", "same")).id)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(c,)) for c in cps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and len(made) == 2 and made[0] == made[1]
        assert spend_rows(engine)[0][4] == USD
    finally:
        for c in cps:
            c.close()
