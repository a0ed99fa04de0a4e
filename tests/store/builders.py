"""Builders and readers shared by the store tests (tests/store/)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from control_plane.errors import InvalidArgument
from control_plane.service import ControlPlane
from control_plane.store.models import WindowSpendRow
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp

USD = 1_000_000_000
# A Monday, mid-hour, with microseconds (to check they survive the database).
T0 = datetime(2025, 3, 10, 12, 17, 30, 123456, tzinfo=UTC)
HOUR_START = datetime(2025, 3, 10, 12, tzinfo=UTC)
HOUR_END = datetime(2025, 3, 10, 13, tzinfo=UTC)
DAY_START = datetime(2025, 3, 10, tzinfo=UTC)
DAY_END = datetime(2025, 3, 11, tzinfo=UTC)


_names = itertools.count(1)


def policy(
    name: str = "",
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
    # Names are unique per control plane: each default one is new.
    return pb.BudgetPolicy(
        name=name or f"team budget {next(_names)}",
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
        held_usd="0.00",
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
