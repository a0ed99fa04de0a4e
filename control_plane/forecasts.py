"""Exhaustion forecasts in the store: each window's spend rate, updated in
the transaction that adds its spend (ControlPlane.apply_usage), and the
windows whose forecast crossed their policy's forecast_alert.

The estimator is spendgate.domain.forecast (pure); this module reads and
writes its state (table window_rates). Cost per usage batch: one SELECT and
one multi-row upsert per CHUNK windows that gained spend, whatever the
number of records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from sqlalchemy import delete, select, tuple_
from sqlalchemy.orm import Session

from control_plane import convert
from control_plane.store import repo
from control_plane.store.models import PolicyRow, WindowRateRow
from control_plane.store.repo import SpendTotal, WindowKey
from spendgate.domain import forecast
from spendgate.domain.forecast import Forecast, Rate

CHUNK = 1000
DEFAULT_HORIZON_S = 3600.0


def rates_by_window(session: Session, keys: Sequence[WindowKey]) -> dict[WindowKey, Rate]:
    r = WindowRateRow
    out: dict[WindowKey, Rate] = {}
    for i in range(0, len(keys), CHUNK):
        q = select(r).where(tuple_(r.policy_id, r.member, r.window_start).in_(keys[i : i + CHUNK]))
        for row in session.scalars(q):
            out[(row.policy_id, row.member, row.window_start)] = Rate(
                row.decayed_nanos, row.at_ms, row.since_ms, row.last_ms, row.samples
            )
    return out


def _store(session: Session, rates: Mapping[WindowKey, tuple[int, Rate]]) -> None:
    """Upsert each window's state (``rates``: key -> (window end, state)), in key order."""
    ins = repo.dialect_insert(session, WindowRateRow)
    stmt = ins.on_conflict_do_update(
        index_elements=["policy_id", "member", "window_start"],
        set_={
            c: ins.excluded[c] for c in ("decayed_nanos", "at_ms", "since_ms", "last_ms", "samples")
        },
    )
    params = [
        {
            "policy_id": k[0],
            "member": k[1],
            "window_start": k[2],
            "window_end": end,
            "decayed_nanos": r.decayed_nanos,
            "at_ms": r.at_ms,
            "since_ms": r.since_ms,
            "last_ms": r.last_ms,
            "samples": r.samples,
        }
        for k, (end, r) in sorted(rates.items())
    ]
    for i in range(0, len(params), CHUNK):
        session.execute(stmt, params[i : i + CHUNK])


def horizon(configured_s: float, total: SpendTotal) -> float:
    return forecast.horizon_for(configured_s, total.window_end - total.window_start)


def observe(
    session: Session,
    totals: Iterable[SpendTotal],
    costs: Mapping[WindowKey, int],
    policies: Mapping[str, PolicyRow],
    now: datetime,
    horizon_s: float,
) -> list[tuple[PolicyRow, SpendTotal, Forecast]]:
    """Add this batch's spend (``costs``, by window) to each window's rate;
    return the windows whose forecast is now due for an event."""
    gained = [
        t
        for t in totals
        if costs.get((t.policy_id, t.member, t.window_start), 0) > 0
        and policies[t.policy_id].enabled
    ]
    if not gained:
        return []
    keys = [(t.policy_id, t.member, t.window_start) for t in gained]
    before = rates_by_window(session, keys)
    now_ms = int(now.timestamp() * 1000)
    after: dict[WindowKey, tuple[int, Rate]] = {}
    due: list[tuple[PolicyRow, SpendTotal, Forecast]] = []
    for key, t in zip(keys, gained, strict=True):
        tau = horizon(horizon_s, t)
        r = forecast.observe(before.get(key), costs[key], now_ms, tau)
        after[key] = (t.window_end, r)
        row = policies[t.policy_id]
        rule = convert.forecast_alert(row)
        if not rule.enabled:
            continue
        f = forecast.project(
            r,
            spent_nanos=t.spent_nanos,
            amount_nanos=row.amount_nanos,
            now_ms=now_ms,
            horizon_s=tau,
        )
        if forecast.alert_due(f, rule, window_end=t.window_end):
            assert f is not None
            due.append((row, t, f))
    _store(session, after)
    return due


def forecast_of(
    r: Rate | None,
    *,
    window_start: int,
    window_end: int,
    spent_nanos: int,
    amount_nanos: int,
    now: datetime,
    horizon_s: float,
) -> Forecast | None:
    """The forecast of a window at ``now`` (what ListSpend shows)."""
    tau = forecast.horizon_for(horizon_s, window_end - window_start)
    return forecast.project(
        r,
        spent_nanos=spent_nanos,
        amount_nanos=amount_nanos,
        now_ms=int(now.timestamp() * 1000),
        horizon_s=tau,
    )


def forget_ended(session: Session, now: int) -> int:
    """Delete the rates of windows that ended before ``now`` (Unix seconds)."""
    r = WindowRateRow
    return len(session.scalars(delete(r).where(r.window_end <= now).returning(r.window_end)).all())
