"""No usage record blocks another (issue 12): what the control plane cannot
store is quarantined with its reason while the rest of the batch applies;
sums saturate at the int64 nano-dollar maximum; usage anomalies become
``usage.anomaly`` events in the batch's transaction. SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from control_plane.service import ControlPlane
from control_plane.store.models import QuarantinedUsageRow, WebhookEventRow
from spendgate.domain.pricing import MAX_COST_NANOS
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.store.builders import T0, batch, inc, policy


def quarantined(engine: Engine) -> list[QuarantinedUsageRow]:
    with Session(engine) as s:
        return list(s.scalars(select(QuarantinedUsageRow).order_by(QuarantinedUsageRow.id)))


async def test_bad_records_are_quarantined_and_the_rest_applies(
    cp: ControlPlane, engine: Engine
) -> None:
    p = await cp.create_policy(policy(), "a")
    users = await cp.create_policy(policy("users", target="*", scope=pb.SCOPE_USER), "a")
    long_member = "m" * 5000
    result = await cp.apply_usage(
        batch(
            "b1",
            inc(p.id, 7),
            inc(users.id, 3, member=long_member),  # longer than window_spend.member
            inc(users.id, 4, member="nul\x00member"),  # PostgreSQL refuses NUL in text
            inc(p.id, -1),
            inc("", 5),
            inc(users.id, 2, member="alice"),
        )
    )
    assert result.quarantined_increments == 4
    assert sorted(
        (w.policy_id, w.member, w.spent_nanos, w.request_count) for w in result.spend
    ) == (sorted([(p.id, "", 7, 1), (users.id, "alice", 2, 1)]))
    rows = quarantined(engine)
    assert sorted(r.reason for r in rows) == ["invalid", "invalid", "invalid", "member_too_long"]
    long_row = next(r for r in rows if r.reason == "member_too_long")
    assert long_row.member == "m" * 256 and long_row.member_bytes == 5000
    assert len(long_row.member_sha256) == 64 and long_row.cost_nanos == 3
    assert long_row.batch_id == "b1" and long_row.data_plane_id == "dp-1"
    assert "5000 characters" in long_row.detail

    # A retry of the batch quarantines nothing twice.
    again = await cp.apply_usage(
        batch("b1", inc(p.id, 7), inc(users.id, 3, member=long_member), inc(p.id, -1))
    )
    assert again.duplicate and len(quarantined(engine)) == 4

    listed, token, total = await cp.list_quarantined(2, "")
    assert total == 4 and len(listed) == 2 and token
    rest, token2, _ = await cp.list_quarantined(2, token)
    assert len(rest) == 2 and token2 == ""
    assert {r.id for r in listed} | {r.id for r in rest} == {r.id for r in rows}
    assert cp.metrics.quarantined == {"invalid": 3, "member_too_long": 1}


async def test_records_a_data_plane_quarantined_are_kept(cp: ControlPlane, engine: Engine) -> None:
    p = await cp.create_policy(policy(), "a")
    req = batch("b2", inc(p.id, 5))
    req.quarantined.append(
        dp.QuarantinedRecord(
            reason="too_large",
            detail="one record of 5000064 bytes",
            policy_id=p.id,
            member="x" * 256,
            member_bytes=5_000_000,
            member_sha256="ab" * 32,
            window_start=timestamp(T0),
            cost_nanos=1234,
            request_count=1,
            batch_id="orig",
            quarantine_time=timestamp(T0),
        )
    )
    await cp.apply_usage(req)
    await cp.apply_usage(req)  # retried: recorded once
    [row] = quarantined(engine)
    assert (row.reason, row.batch_id, row.member_bytes, row.cost_nanos) == (
        "too_large",
        "orig",
        5_000_000,
        1234,
    )
    [msg], _, total = await cp.list_quarantined(0, "")
    assert total == 1 and msg.cost_usd == "0.000001234" and msg.data_plane_id == "dp-1"


async def test_spend_saturates_at_the_int64_maximum(cp: ControlPlane, engine: Engine) -> None:
    p = await cp.create_policy(policy(), "a")
    first = await cp.apply_usage(batch("s1", inc(p.id, MAX_COST_NANOS), inc(p.id, MAX_COST_NANOS)))
    assert first.spend[0].spent_nanos == MAX_COST_NANOS
    second = await cp.apply_usage(batch("s2", inc(p.id, MAX_COST_NANOS)))
    assert second.spend[0].spent_nanos == MAX_COST_NANOS
    third = await cp.apply_usage(batch("s3", inc(p.id, 5)))
    assert third.spend[0].spent_nanos == MAX_COST_NANOS
    assert third.spend[0].request_count == 4


async def test_anomalies_become_usage_anomaly_events_once(cp: ControlPlane, engine: Engine) -> None:
    p = await cp.create_policy(policy(), "a")
    req = batch("a1", inc(p.id, MAX_COST_NANOS))
    req.anomalies.append(
        dp.UsageAnomaly(
            id="an-1",
            reason="cost_saturated",
            occur_time=timestamp(T0),
            model="gpt-4o",
            provider="openai",
            request_id="req-1",
            charged_nanos=MAX_COST_NANOS,
            reported_cost_usd="1000000000000.000015",
            output_tokens="99999999999999999",
            max_cost_usd="1000",
            policy_ids=[p.id],
        )
    )
    await cp.apply_usage(req)
    await cp.apply_usage(req)
    with Session(engine) as s:
        [event] = s.scalars(
            select(WebhookEventRow).where(WebhookEventRow.kind == "usage.anomaly")
        ).all()
    assert event.member == "an-1"
    assert cp.metrics.events["usage.anomaly"] == 1
