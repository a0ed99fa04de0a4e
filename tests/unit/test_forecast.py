"""The exhaustion forecast's rate estimator (spendgate/domain/forecast.py),
driven with synthetic loads on an injected timeline (milliseconds)."""

from __future__ import annotations

import math
import sqlite3
from typing import Any

import pytest

from control_plane.store.db import ensure_exp
from spendgate.domain.forecast import (
    MAX_FORECAST_S,
    AlertRule,
    Forecast,
    Rate,
    alert_due,
    confident,
    horizon_for,
    observe,
    project,
)

USD = 1_000_000_000
HOUR = 3600
T0_MS = 1_741_564_800_000  # a window start (2025-03-10 00:00 UTC)
DAY_END = T0_MS // 1000 + 86400


@pytest.mark.parametrize(
    ("period_s", "usd_per_hour", "budget_usd"),
    [
        pytest.param(1, 3.0, 20, id="report-every-second"),
        pytest.param(10, 3.0, 20, id="report-every-10s"),
        pytest.param(60, 0.5, 5, id="report-every-minute-slow"),
        pytest.param(300, 12.0, 100, id="report-every-5min-fast"),
    ],
)
def test_steady_load_forecast_within_10_percent_of_the_true_exhaustion(
    period_s: int, usd_per_hour: float, budget_usd: int
) -> None:
    """From the moment there is evidence enough until the budget is gone,
    every forecast is within 10 % of the true time left."""
    per_period = int(usd_per_hour * USD * period_s / HOUR)
    amount = budget_usd * USD
    r: Rate | None = None
    spent = 0
    checked = 0
    t = T0_MS
    while spent + per_period < amount:
        t += period_s * 1000
        r = observe(r, per_period, t, HOUR)
        spent += per_period
        f = project(r, spent_nanos=spent, amount_nanos=amount, now_ms=t, horizon_s=HOUR)
        if not confident(r, HOUR):
            assert f is None
            continue
        assert f is not None
        true_left_s = (amount - spent) / (per_period / period_s)
        assert abs(f.exhausted_in_s - true_left_s) <= 0.10 * true_left_s + 1, (t - T0_MS) / 1000
        checked += 1
    assert checked > 5


def test_forecast_follows_a_change_of_pace_within_a_few_horizons() -> None:
    amount = 1000 * USD
    r: Rate | None = None
    spent = 0
    t = T0_MS
    for minute in range(1, 8 * 60):
        per_minute = USD // 10 if minute < 120 else USD // 2  # $6/h, then $30/h
        t = T0_MS + minute * 60_000
        r = observe(r, per_minute, t, HOUR)
        spent += per_minute
    f = project(r, spent_nanos=spent, amount_nanos=amount, now_ms=t, horizon_s=HOUR)
    assert f is not None
    assert f.rate_nanos_per_s * HOUR == pytest.approx(30 * USD, rel=0.05)


@pytest.mark.parametrize("reports", [1, 2, 5, 30])
def test_a_single_burst_then_silence_never_fires(reports: int) -> None:
    """Half the budget in a few seconds (over ``reports`` reports), then
    nothing: at no instant of the rest of the day is the alert due."""
    amount = 10 * USD
    rule = AlertRule(within_s=2 * HOUR, before_window_end=True)
    r: Rate | None = None
    spent = 0
    t = T0_MS + 9 * HOUR * 1000
    for _ in range(reports):
        t += 100
        r = observe(r, amount // 2 // reports, t, HOUR)
        spent += amount // 2 // reports
    assert r is not None
    for step in range(0, 15 * 3600, 30):
        now = t + step * 1000
        f = project(r, spent_nanos=spent, amount_nanos=amount, now_ms=now, horizon_s=HOUR)
        assert f is None
        assert not alert_due(f, rule, window_end=DAY_END)


def test_silence_after_a_steady_load_makes_the_exhaustion_recede() -> None:
    amount = 100 * USD
    r: Rate | None = None
    spent = 0
    t = T0_MS
    for _ in range(60):  # an hour at $6/h
        t += 60_000
        r = observe(r, USD // 10, t, HOUR)
        spent += USD // 10
    assert r is not None
    seen = []
    for minutes in range(0, 6 * 60, 15):
        f = project(
            r, spent_nanos=spent, amount_nanos=amount, now_ms=t + minutes * 60_000, horizon_s=HOUR
        )
        seen.append(None if f is None else f.exhausted_at)
    at = [s for s in seen if s is not None]
    assert at == sorted(at) and len(set(at)) == len(at)  # strictly later and later
    assert seen[-1] is None or seen[-1] > seen[0] + 10 * HOUR


def test_no_forecast_when_spent_or_far_beyond_reach() -> None:
    r: Rate | None = None
    t = T0_MS
    for _ in range(30):
        t += 60_000
        r = observe(r, 1, t, HOUR)  # one nano-dollar a minute
    assert r is not None and confident(r, HOUR)
    assert project(r, spent_nanos=30, amount_nanos=30, now_ms=t, horizon_s=HOUR) is None
    far = project(r, spent_nanos=30, amount_nanos=10**18, now_ms=t, horizon_s=HOUR)
    assert far is None  # beyond MAX_FORECAST_S
    near = project(r, spent_nanos=30, amount_nanos=90, now_ms=t, horizon_s=HOUR)
    assert near is not None and 0 < near.exhausted_in_s < MAX_FORECAST_S


def test_a_clock_going_backwards_does_not_grow_the_rate() -> None:
    r = observe(None, USD, T0_MS, HOUR)
    r = observe(r, USD, T0_MS + 60_000, HOUR)
    back = observe(r, USD, T0_MS + 30_000, HOUR)
    assert back.at_ms == r.at_ms
    assert back.decayed_nanos == pytest.approx(r.decayed_nanos + USD)


@pytest.mark.parametrize(
    ("rule", "in_s", "expected"),
    [
        pytest.param(AlertRule(within_s=2 * HOUR), 2 * HOUR, True, id="within-at-the-edge"),
        pytest.param(AlertRule(within_s=2 * HOUR), 2 * HOUR + 1, False, id="within-beyond"),
        pytest.param(AlertRule(before_window_end=True), 100, True, id="before-end"),
        pytest.param(AlertRule(before_window_end=True), 86400, False, id="after-end"),
        pytest.param(AlertRule(), 1, False, id="no-rule"),
    ],
)
def test_alert_due(rule: AlertRule, in_s: int, expected: bool) -> None:
    now = T0_MS // 1000
    f = Forecast(1.0, now + in_s, in_s)
    assert alert_due(f, rule, window_end=DAY_END) is expected


def test_horizon_shrinks_for_short_windows() -> None:
    assert horizon_for(3600, 86400) == 3600
    assert horizon_for(3600, 60) == 15
    assert horizon_for(3600, 1) == 1.0


class _NoMathSqlite:
    """A SQLite connection as one built without math functions answers."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:")
        self.created: list[str] = []

    def execute(self, sql: str) -> sqlite3.Cursor:
        if "exp(" in sql and not self.created:
            raise sqlite3.OperationalError("no such function: exp")
        return self.conn.execute(sql)

    def create_function(self, name: str, n: int, fn: Any, *, deterministic: bool) -> None:
        self.created.append(name)
        self.conn.create_function(name, n, fn, deterministic=deterministic)


def test_sqlite_without_math_functions_gets_exp() -> None:
    fake = _NoMathSqlite()
    ensure_exp(fake)
    assert fake.created == ["exp"]
    assert fake.execute("SELECT exp(1), exp(NULL), exp(1e6)").fetchone() == (
        pytest.approx(math.e),
        None,
        math.inf,
    )
    with sqlite3.connect(":memory:") as built_in:
        ensure_exp(built_in)  # has it (or gets it): either way it works
        assert built_in.execute("SELECT exp(0)").fetchone() == (1.0,)
