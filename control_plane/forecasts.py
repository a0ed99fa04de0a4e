"""Exhaustion forecasts of stored windows: which windows' forecast crossed
their policy's forecast_alert after a usage batch, and the forecast
ListSpend shows.

The estimator is spendgate.domain.forecast (pure). Its state lives in the
window_spend row and is updated by the upsert that adds the spend
(repo.add_spend), so a usage batch costs no statement more for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from control_plane import convert
from control_plane.store import repo
from control_plane.store.models import PolicyRow, WindowSpendRow
from control_plane.store.repo import SpendTotal, WindowKey
from spendgate.domain import forecast
from spendgate.domain.forecast import Forecast


def due(
    totals: Iterable[SpendTotal],
    costs: Mapping[WindowKey, int],
    policies: Mapping[str, PolicyRow],
    now: datetime,
    horizon_s: float,
) -> list[tuple[PolicyRow, SpendTotal, Forecast]]:
    """The windows this batch added spend to (``costs``, by window) whose
    forecast now crosses their policy's forecast_alert."""
    out: list[tuple[PolicyRow, SpendTotal, Forecast]] = []
    now_ms = int(now.timestamp() * 1000)
    for t in totals:
        row = policies[t.policy_id]
        rule = convert.forecast_alert(row)
        if not rule.enabled or not row.enabled or t.rate is None:
            continue
        if costs.get((t.policy_id, t.member, t.window_start), 0) <= 0:
            continue
        f = forecast.project(
            t.rate,
            spent_nanos=t.spent_nanos,
            amount_nanos=row.amount_nanos,
            now_ms=now_ms,
            horizon_s=forecast.horizon_for(horizon_s, t.window_end - t.window_start),
        )
        if f is not None and forecast.alert_due(f, rule, window_end=t.window_end):
            out.append((row, t, f))
    return out


def forecast_of(
    r: WindowSpendRow, amount_nanos: int, now: datetime, horizon_s: float
) -> Forecast | None:
    """A stored window's forecast at ``now`` (what ListSpend shows)."""
    return forecast.project(
        repo.rate_of(r),
        spent_nanos=r.spent_nanos,
        amount_nanos=amount_nanos,
        now_ms=int(now.timestamp() * 1000),
        horizon_s=forecast.horizon_for(horizon_s, r.window_end - r.window_start),
    )
