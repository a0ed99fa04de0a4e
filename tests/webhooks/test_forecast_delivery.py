"""budget_policy.forecast deliveries to real local receivers, driven with a
FakeClock (SQLite and PostgreSQL): the Slack message, and PagerDuty's
warning in an incident of its own, beside the page of the budget spent, each
resolved when the window resets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from control_plane.webhooks.events import rate_per_hour
from spendgate.domain.forecast import Forecast, Rate, duration_text, observe, project
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import webhooks_pb2 as wpb
from tests.webhooks.conftest import USD, Rig
from tests.webhooks.receiver import Receiver

FORECAST = "budget_policy.forecast"
EXCEEDED = "budget_policy.exceeded"
KEY = "R0123456789abcdef0123456789abcde"
HORIZON_S = 900.0  # an hourly window's: a quarter of it


def gone(f: Forecast) -> datetime:
    return datetime.fromtimestamp(f.exhausted_at, UTC)


def z(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def steady_until_forecast(
    rig: Rig, within_s: int = 3600
) -> tuple[pb.BudgetPolicy, datetime, Forecast]:
    """A $30/hour REJECT policy spent $1 a minute from the hour's first
    minute: the 5th report has evidence enough (a quarter of the 15-minute
    horizon an hourly window gets) and $25 left at $60/h."""
    start = rig.clock().replace(minute=0, second=0, microsecond=0)
    msg = pb.BudgetPolicy(
        name="agents",
        amount_usd="30",
        window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_HOURS, count=1),
        action=pb.ACTION_REJECT,
        scope=pb.SCOPE_USER,
        target="*",
        forecast_alert=pb.ForecastAlert(),
    )
    msg.forecast_alert.within.seconds = within_s
    policy = await rig.cp.create_policy(msg, "admin")
    rate: Rate | None = None
    for minute in range(1, 6):
        rig.clock.set(start + timedelta(minutes=minute))
        await rig.spend(policy.id, USD, member="bot-7")
        rate = observe(rate, USD, int(rig.clock().timestamp() * 1000), HORIZON_S)
    f = project(
        rate,
        spent_nanos=5 * USD,
        amount_nanos=30 * USD,
        now_ms=int(rig.clock().timestamp() * 1000),
        horizon_s=HORIZON_S,
    )
    assert f is not None and abs(f.exhausted_in_s - 1500) < 0.1 * 1500
    return policy, start, f


async def test_pagerduty_forecast_is_a_warning_of_its_own_resolved_at_reset(
    rig: Rig, receiver: Receiver
) -> None:
    await rig.webhook(
        receiver.url,
        format=wpb.WEBHOOK_FORMAT_PAGERDUTY,
        routing_key=KEY,
        pagerduty_severity=wpb.PAGER_DUTY_SEVERITY_CRITICAL,
        events=[FORECAST, EXCEEDED],
    )
    policy, start, f = await steady_until_forecast(rig)
    assert await rig.dispatcher.run_until_idle() == 1
    await rig.spend(policy.id, 30 * USD, member="bot-7")  # now spent: the page
    assert await rig.dispatcher.run_until_idle() == 1
    warning, page = (r.json() for r in receiver.received())
    window = f"spendgate/{policy.id}/{z(start)}/bot-7"
    assert (warning["dedup_key"], warning["event_action"]) == (f"{window}/forecast", "trigger")
    assert warning["payload"]["severity"] == "warning"
    assert warning["payload"]["class"] == FORECAST
    rate = rate_per_hour(f.rate_nanos_per_s)
    assert warning["payload"]["summary"] == (
        f"Budget runs out in {duration_text(f.exhausted_in_s)} at this pace: agents "
        f"(user bot-7): $5.00 of $30.00 (16.6%), action reject, window ends "
        f"{z(start + timedelta(hours=1))}; ${rate}/h, gone at {z(gone(f))}"
    )
    details = warning["payload"]["custom_details"]
    assert (details["exhausted_in_s"], details["rate_usd_per_hour"]) == (f.exhausted_in_s, rate)
    assert (page["dedup_key"], page["payload"]["severity"]) == (window, "critical")
    assert page["payload"]["class"] == EXCEEDED

    # Both incidents are resolved when the window ends.
    end = start + timedelta(hours=1)
    rig.clock.set(end - timedelta(seconds=1))
    assert await rig.dispatcher.run_until_idle() == 0
    rig.clock.set(end)
    assert await rig.dispatcher.run_until_idle() == 2
    resolves = [r.json() for r in receiver.received()[2:]]
    assert sorted((r["event_action"], r["dedup_key"]) for r in resolves) == [
        ("resolve", window),
        ("resolve", f"{window}/forecast"),
    ]


async def test_slack_forecast_message(rig: Rig, receiver: Receiver) -> None:
    await rig.webhook(receiver.url, format=wpb.WEBHOOK_FORMAT_SLACK, events=[FORECAST])
    _, _, f = await steady_until_forecast(rig)
    assert await rig.dispatcher.run_until_idle() == 1
    (got,) = receiver.received()
    body = got.json()
    left = duration_text(f.exhausted_in_s)
    at = gone(f)
    assert body["text"] == (
        f":hourglass_flowing_sand: Budget runs out in {left} at this pace: agents — "
        f"user bot-7 spent $5.00 of $30.00 (16.6%); at this pace "
        f"(${rate_per_hour(f.rate_nanos_per_s)}/h, gone <!date^{int(at.timestamp())}"
        f"^{{date_short_pretty}} {{time}}|{at.strftime('%Y-%m-%d %H:%M')} UTC>)"
    )
    header = body["blocks"][0]["text"]["text"]
    assert header == f":hourglass_flowing_sand: Budget runs out in {left} at this pace: agents"
    assert "Traffic keeps flowing." in body["blocks"][1]["text"]["text"]


async def test_no_event_when_the_rule_is_not_crossed(rig: Rig, receiver: Receiver) -> None:
    await rig.webhook(receiver.url, format=wpb.WEBHOOK_FORMAT_GENERIC, events=[FORECAST])
    await steady_until_forecast(rig, within_s=60)  # 25 minutes left: not within a minute
    assert await rig.dispatcher.run_until_idle() == 0
    assert receiver.received() == []
