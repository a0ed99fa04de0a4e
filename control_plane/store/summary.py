"""Aggregate reads for the control plane's metrics: a few rows per policy,
however many members a wildcard policy has."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from control_plane.store.models import DeliveryRow, PolicyRow, WindowSpendRow


@dataclass(frozen=True, slots=True)
class WindowSummary:
    """Spend of one policy's window that contains the instant asked about,
    over all its members (one member, "", unless the policy is a wildcard)."""

    policy_id: str
    window_start: int
    window_end: int
    max_spent_nanos: int  # of the member closest to (or furthest past) the limit
    request_count: int
    members: int
    members_exceeded: int


def window_summaries(session: Session, *, active_at: int) -> list[WindowSummary]:
    """One row per (policy, window) containing ``active_at`` (Unix seconds).

    A policy whose window was changed may have rows of an old window that
    still contains the instant: callers pick the policy's current window.
    """
    w = WindowSpendRow
    exceeded = case((w.spent_nanos >= PolicyRow.amount_nanos, 1), else_=0)
    q = (
        select(
            w.policy_id,
            w.window_start,
            func.max(w.window_end),
            func.max(w.spent_nanos),
            func.sum(w.request_count),
            func.count(),
            func.sum(exceeded),
        )
        .join(PolicyRow, PolicyRow.id == w.policy_id)
        .where(w.window_start <= active_at, w.window_end > active_at)
        .group_by(w.policy_id, w.window_start)
    )
    return [
        WindowSummary(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]))
        for r in session.execute(q)
    ]


def delivery_counts(session: Session) -> dict[str, int]:
    """Webhook deliveries kept in the store, per state (pending, delivered, failed)."""
    q = select(DeliveryRow.state, func.count()).group_by(DeliveryRow.state)
    return {str(state): int(n) for state, n in session.execute(q)}
