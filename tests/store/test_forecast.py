"""Exhaustion forecasts in the control plane: the spend rate kept per window
as usage batches are applied, the budget_policy.forecast event, ListSpend's
forecast, and forecast_alert validation.

Every test runs on SQLite and on PostgreSQL; time moves by a FakeClock.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from itertools import count

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from control_plane.api.budgets import mask_merger
from control_plane.errors import InvalidArgument
from control_plane.service import ControlPlane
from control_plane.store import repo
from control_plane.store.models import WebhookEventRow, WindowSpendRow
from spendgate.domain.forecast import Rate, observe
from spendgate.v1 import budget_pb2 as pb
from tests.harness import FakeClock
from tests.store.builders import DAY_END, T0, USD, batch, fields, inc, policy

FORECAST = "budget_policy.forecast"
HOUR = 3600
_batches = count()


def forecast_policy(
    *,
    amount: str = "10",
    within_s: int = 0,
    before_end: bool = False,
    target: str = "",
    scope: int = pb.SCOPE_GLOBAL,
) -> pb.BudgetPolicy:
    msg = policy(
        amount=amount, unit=pb.WINDOW_UNIT_DAYS, action=pb.ACTION_ALERT, scope=scope, target=target
    )
    msg.forecast_alert.before_window_end = before_end
    if within_s:
        msg.forecast_alert.within.seconds = within_s
    return msg


async def spend(
    cp: ControlPlane, clock: FakeClock, policy_id: str, nanos: int, member: str = ""
) -> None:
    await cp.apply_usage(
        batch(f"f-{next(_batches)}", inc(policy_id, nanos, at=clock(), member=member))
    )


def forecast_events(engine: Engine) -> list[tuple[str, dict]]:
    with Session(engine) as s:
        rows = s.scalars(
            select(WebhookEventRow)
            .where(WebhookEventRow.kind == FORECAST)
            .order_by(WebhookEventRow.create_time)
        ).all()
        return [(r.member, json.loads(r.data)) for r in rows]


async def test_steady_load_fires_once_when_exhaustion_comes_within_the_rule(
    cp: ControlPlane, engine: Engine, clock: FakeClock
) -> None:
    """$1/h from T0 against $10: the budget is truly gone at T0 + 10 h. The
    rule is "within 2 h": the event comes when the true time left is about
    2 h, once, and what it forecasts is within 10 % of the truth."""
    p = await cp.create_policy(forecast_policy(within_s=2 * HOUR), "a")
    step = timedelta(minutes=2)
    per_step = USD // 30  # $1/h
    spent = 0
    fired_at: datetime | None = None
    while spent + per_step < 10 * USD:
        clock.advance(step)
        await spend(cp, clock, p.id, per_step)
        spent += per_step
        if fired_at is None and forecast_events(engine):
            fired_at = clock()
    assert fired_at is not None
    ((member, data),) = forecast_events(engine)  # once per window
    true_left = (10 * USD - (fired_at - T0) / step * per_step) / per_step * step.total_seconds()
    assert abs(data["exhausted_in_s"] - true_left) <= 0.10 * true_left
    assert 0.9 * 2 * HOUR <= true_left <= 1.1 * 2 * HOUR + step.total_seconds()
    assert member == "" and data["type"] == FORECAST and data["policy_id"] == p.id
    assert data["forecast_alert"] == {"within_s": 2 * HOUR, "before_window_end": False}
    assert float(data["rate_usd_per_hour"]) == pytest.approx(1.0, rel=0.05)
    exhausted = datetime.fromisoformat(data["exhausted_at"])
    assert exhausted == fired_at.replace(microsecond=0) + timedelta(seconds=data["exhausted_in_s"])


async def test_before_window_end_fires_as_soon_as_the_evidence_is_enough(
    cp: ControlPlane, engine: Engine, clock: FakeClock
) -> None:
    """$2/h against $10 from 12:17 runs out at about 17:17, before midnight:
    the event comes with the first batch after a quarter of the horizon."""
    p = await cp.create_policy(forecast_policy(before_end=True), "a")
    for minute in range(1, 31):
        clock.set(T0 + timedelta(minutes=minute))
        await spend(cp, clock, p.id, USD // 30)  # $2/h
        if forecast_events(engine):
            break
    # The first batch is the start; the rate needs 15 minutes of evidence after it.
    assert minute == 16
    ((_, data),) = forecast_events(engine)
    assert data["forecast_alert"] == {"within_s": 0, "before_window_end": True}
    true_left = (10 * USD - 16 * (USD // 30)) / (USD // 30) * 60
    assert abs(data["exhausted_in_s"] - true_left) <= 0.10 * true_left


async def test_a_single_burst_then_silence_never_fires(
    cp: ControlPlane, engine: Engine, clock: FakeClock
) -> None:
    """Six of ten dollars in a few seconds, then nothing for the rest of the
    day: no event, and no forecast in ListSpend at any time; other policies'
    usage keeps arriving meanwhile."""
    p = await cp.create_policy(forecast_policy(within_s=24 * HOUR, before_end=True), "a")
    other = await cp.create_policy(policy("other", amount="1000"), "a")
    for _ in range(6):
        clock.advance(timedelta(seconds=1))
        await spend(cp, clock, p.id, USD)
    while clock() < DAY_END - timedelta(minutes=10):
        clock.advance(timedelta(minutes=10))
        await spend(cp, clock, other.id, 1000)
        entries, _ = await cp.list_spend(p.id, "", 10, "")
        assert not entries[0].HasField("forecast_exhaust_time")
        assert entries[0].forecast_rate_usd_per_hour == ""
    assert forecast_events(engine) == []


async def test_list_spend_forecast_recedes_in_silence(cp: ControlPlane, clock: FakeClock) -> None:
    p = await cp.create_policy(forecast_policy(amount="100"), "a")  # no rule: no events
    for _ in range(60):  # an hour at $6/h
        clock.advance(timedelta(minutes=1))
        await spend(cp, clock, p.id, USD // 10)
    (e,), _ = await cp.list_spend(p.id, "", 10, "")
    assert float(e.forecast_rate_usd_per_hour) == pytest.approx(6.0, rel=0.05)
    first = e.forecast_exhaust_time.seconds
    assert first - int(clock().timestamp()) == pytest.approx(94 / 6 * HOUR, rel=0.10)
    later = []
    for _ in range(3):
        clock.advance(timedelta(minutes=30))
        (e,), _ = await cp.list_spend(p.id, "", 10, "")
        later.append(e.forecast_exhaust_time.seconds)
    assert first < later[0] < later[1] < later[2]


async def test_each_member_of_a_wildcard_policy_has_its_own_forecast(
    cp: ControlPlane, engine: Engine, clock: FakeClock
) -> None:
    p = await cp.create_policy(
        forecast_policy(within_s=HOUR, scope=pb.SCOPE_USER, target="*", amount="1"), "a"
    )
    for _ in range(40):
        clock.advance(timedelta(minutes=1))
        await spend(cp, clock, p.id, USD // 100, member="alice")  # $0.60/h: gone within 1 h
        await spend(cp, clock, p.id, USD // 10_000, member="bob")  # $0.006/h: not
    assert [m for m, _ in forecast_events(engine)] == ["alice"]
    with Session(engine) as s:
        samples = dict(s.execute(select(WindowSpendRow.member, WindowSpendRow.rate_samples)).all())
    assert samples == {"alice": 40, "bob": 40}


async def test_a_duplicate_batch_adds_nothing_to_the_rate(
    cp: ControlPlane, engine: Engine, clock: FakeClock
) -> None:
    p = await cp.create_policy(forecast_policy(), "a")
    await cp.apply_usage(batch("dup-1", inc(p.id, USD, at=clock())))
    clock.advance(timedelta(minutes=1))
    await cp.apply_usage(batch("dup-2", inc(p.id, USD, at=clock())))
    clock.advance(timedelta(minutes=1))
    await cp.apply_usage(batch("dup-2", inc(p.id, USD, at=clock())))
    with Session(engine) as s:
        (r,) = s.scalars(select(WindowSpendRow)).all()
    assert (r.rate_samples, r.rate_first_nanos) == (2, USD)
    assert r.rate_nanos == pytest.approx(USD * math.exp(-60 / HOUR) + USD)


async def test_the_store_keeps_the_rate_exactly_as_the_domain_computes_it(
    cp: ControlPlane, engine: Engine, clock: FakeClock
) -> None:
    """The SQL in the spend upsert is spendgate.domain.forecast.observe:
    irregular reports, reports without spend (holds), a clock that goes back."""
    p = await cp.create_policy(forecast_policy(amount="1000"), "a")
    steps = [(0, 0), (17, 3 * USD), (60, 0), (61, USD // 7), (-30, 5), (900, 2 * USD), (1, 1)]
    expected: Rate | None = None
    for seconds, cost in steps:
        clock.advance(timedelta(seconds=seconds))
        await spend(cp, clock, p.id, cost)
        if cost > 0:
            now_ms = int(clock().timestamp() * 1000)
            expected = observe(expected, cost, now_ms, HOUR)
    with Session(engine) as s:
        (row,) = s.scalars(select(WindowSpendRow)).all()
        got = repo.rate_of(row)
    assert expected is not None
    assert (got.at_ms, got.since_ms, got.last_ms, got.samples, got.first_nanos) == (
        expected.at_ms,
        expected.since_ms,
        expected.last_ms,
        expected.samples,
        expected.first_nanos,
    )
    assert got.decayed_nanos == pytest.approx(expected.decayed_nanos, rel=1e-12)


# ---- forecast_alert validation and updates -----------------------------------


@pytest.mark.parametrize(
    "within",
    [
        pytest.param(Duration(seconds=-1), id="negative"),
        pytest.param(Duration(seconds=-5, nanos=-1), id="negative-nanos"),
        pytest.param(Duration(seconds=1, nanos=500_000_000), id="fractional"),
        pytest.param(Duration(seconds=366 * 86400 + 1), id="beyond-366-days"),
        pytest.param(Duration(seconds=315_576_000_000), id="huge"),
    ],
)
async def test_bad_forecast_alert_is_refused_naming_the_field(
    cp: ControlPlane, within: Duration
) -> None:
    msg = forecast_policy()
    msg.forecast_alert.within.CopyFrom(within)
    with pytest.raises(InvalidArgument) as e:
        await cp.create_policy(msg, "a")
    assert fields(e.value) == ["forecast_alert.within"]
    assert "366 days" in e.value.violations[0].description


async def test_forecast_alert_round_trips_and_updates_by_mask(cp: ControlPlane) -> None:
    absent = await cp.create_policy(forecast_policy(), "a")
    assert not absent.HasField("forecast_alert")
    p = await cp.create_policy(forecast_policy(within_s=2 * HOUR, before_end=True), "a")
    assert p.forecast_alert == pb.ForecastAlert(
        within=Duration(seconds=2 * HOUR), before_window_end=True
    )
    patch = pb.BudgetPolicy(id=p.id, forecast_alert=pb.ForecastAlert(within=Duration(seconds=60)))
    only_within = mask_merger(patch, FieldMask(paths=["forecast_alert.within"]))
    updated = await cp.update_policy(p.id, only_within, "", "a")
    assert updated.forecast_alert == pb.ForecastAlert(
        within=Duration(seconds=60), before_window_end=True
    )
    off = mask_merger(pb.BudgetPolicy(id=p.id), FieldMask(paths=["forecast_alert"]))
    cleared = await cp.update_policy(p.id, off, "", "a")
    assert not cleared.HasField("forecast_alert")
    assert cleared.amount_usd == "10.00"


async def test_a_clock_in_the_past_of_the_window_is_harmless(
    cp: ControlPlane, clock: FakeClock
) -> None:
    """A batch applied with an instant before the window's last one (a
    replica whose clock is behind) neither fails nor inflates the rate."""
    p = await cp.create_policy(forecast_policy(amount="1000"), "a")
    for _ in range(20):
        clock.advance(timedelta(minutes=1))
        await spend(cp, clock, p.id, USD)
    clock.advance(timedelta(minutes=-10))
    await spend(cp, clock, p.id, USD)
    clock.advance(timedelta(minutes=10))
    (e,), _ = await cp.list_spend(p.id, "", 10, "")
    assert float(e.forecast_rate_usd_per_hour) == pytest.approx(60.0, rel=0.10)
