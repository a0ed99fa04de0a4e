"""The outbox: budget events and their deliveries, written in the same
transaction as the spend that caused them (control_plane/usage.py).

If that transaction commits, the events and one pending delivery per
subscribed, enabled webhook are durable; if it rolls back, none exist. The
event's unique key (policy, member, window, kind, threshold) makes each
crossing happen once, also when replicas apply usage at the same moment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from control_plane import convert
from control_plane.store import webhook_repo
from control_plane.store.models import PolicyRow, WebhookRow
from control_plane.store.repo import SpendTotal
from control_plane.store.webhook_repo import EventKey
from control_plane.webhooks import events
from control_plane.webhooks.formats import PAGERDUTY
from spendgate.domain.forecast import Forecast
from spendgate.domain.policies import Policy
from spendgate.v1 import dataplane_pb2 as dp

MAX_KNOWN = 200_000


class KnownEvents:
    """Event keys known to exist (per process), so a window above a level
    does not probe the database for that event on every usage batch.

    Only keys of committed transactions are added. Not thread-safe: use it
    from the event loop.
    """

    def __init__(self) -> None:
        self._keys: dict[EventKey, int] = {}  # key -> window end (Unix seconds)

    def __contains__(self, key: EventKey) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, seen: Iterable[tuple[EventKey, int]], now: datetime) -> None:
        self._keys.update(seen)
        if len(self._keys) > MAX_KNOWN:
            at = int(now.timestamp())
            self._keys = {k: end for k, end in self._keys.items() if end > at}
            if len(self._keys) > MAX_KNOWN:  # still too many open windows: start over
                self._keys.clear()


@dataclass(frozen=True, slots=True)
class Recorded:
    """An event this transaction created, for its log line after commit."""

    event_id: str
    kind: str
    policy_id: str
    member: str
    threshold: int
    spent_usd: str
    amount_usd: str
    deliveries: int


@dataclass(frozen=True, slots=True)
class RecordedAnomaly:
    """A usage.anomaly event this transaction created, for its log line."""

    event_id: str
    reason: str
    model: str
    request_id: str
    charged_usd: str
    reported_cost_usd: str
    deliveries: int


@dataclass(slots=True)
class OutboxResult:
    seen: list[tuple[EventKey, int]] = field(default_factory=list)
    events: int = 0
    deliveries: int = 0
    recorded: list[Recorded] = field(default_factory=list)
    anomalies: list[RecordedAnomaly] = field(default_factory=list)


def record_anomalies(
    session: Session,
    data_plane_id: str,
    anomalies: Iterable[dp.UsageAnomaly],
    now: datetime,
    result: OutboxResult,
) -> None:
    """A usage.anomaly event per anomaly a data plane reported (keyed by its
    id, so a batch applied once creates each once), and its deliveries."""
    webhooks: list[WebhookRow] | None = None
    for a in anomalies:
        occurred = a.occur_time.seconds or int(now.timestamp())
        key = EventKey("", a.id, 0, events.ANOMALY, 0)
        event_id = webhook_repo.new_id("evt_")
        data = events.anomaly_data(
            event_id=event_id,
            data_plane_id=data_plane_id[:200],
            anomaly_id=a.id,
            reason=a.reason[:40],
            occurred=occurred,
            model=a.model[:256],
            provider=a.provider[:64],
            route=a.route[:256],
            request_id=a.request_id[:128],
            charged_nanos=max(a.charged_nanos, 0),
            reported_cost_usd=a.reported_cost_usd[:64],
            input_tokens=a.input_tokens[:64],
            output_tokens=a.output_tokens[:64],
            max_cost_usd=a.max_cost_usd[:64],
            policy_ids=[p[:40] for p in a.policy_ids[:100]],
        )
        if not webhook_repo.insert_event(
            session, key, event_id=event_id, window_end=occurred, data=data, now=now
        ):
            continue
        result.events += 1
        if webhooks is None:
            webhooks = list(webhook_repo.enabled_webhooks(session))
        targets = [w.id for w in webhooks if events.ANOMALY in w.events.split(",")]
        added = webhook_repo.add_deliveries(session, event_id, targets, due=now, now=now)
        result.deliveries += added
        result.anomalies.append(
            RecordedAnomaly(
                event_id,
                data["reason"],
                data["model"],
                data["request_id"],
                data["charged_usd"],
                data["reported_cost_usd"],
                added,
            )
        )


def record_crossings(
    session: Session,
    windows: Iterable[tuple[PolicyRow, SpendTotal]],
    now: datetime,
    known: KnownEvents,
) -> OutboxResult:
    """Create the events the new window totals reached, and their deliveries."""
    result = OutboxResult()
    webhooks = _Webhooks(session)
    for row, total in windows:
        if not row.enabled:
            continue
        policy = convert.domain_policy(row)
        pagerduty: set[str] = set()
        levels = events.crossings(policy.amount_nanos, policy.alert_thresholds, total.spent_nanos)
        if total.would_reject > 0:
            levels.append(events.Crossing(100, 2, events.WOULD_REJECT))
        for c in levels:
            pagerduty |= _record(
                session, policy, total, c.kind, c.threshold, now, known, webhooks, result
            )
        if pagerduty:
            result.deliveries += _schedule_resolve(session, policy, total, pagerduty, now)
    return result


def record_forecasts(
    session: Session,
    due: Iterable[tuple[PolicyRow, SpendTotal, Forecast]],
    now: datetime,
    known: KnownEvents,
    result: OutboxResult,
) -> None:
    """A budget_policy.forecast event per window whose forecast crossed its
    policy's forecast_alert (once per window: the event key), and its deliveries."""
    webhooks = _Webhooks(session)
    for row, total, f in due:
        policy = convert.domain_policy(row)
        rule = convert.forecast_alert(row)
        extra = events.forecast_data(
            exhausted_at=f.exhausted_at,
            exhausted_in_s=f.exhausted_in_s,
            rate_nanos_per_s=f.rate_nanos_per_s,
            within_s=rule.within_s,
            before_window_end=rule.before_window_end,
        )
        pagerduty = _record(
            session, policy, total, events.FORECAST, 0, now, known, webhooks, result, extra
        )
        if pagerduty:
            result.deliveries += _schedule_resolve(
                session, policy, total, pagerduty, now, events.FORECAST_INCIDENT
            )


class _Webhooks:
    """The enabled webhooks, read once per transaction and only if needed."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._rows: list[WebhookRow] | None = None

    def subscribed(self, kind: str) -> list[WebhookRow]:
        if self._rows is None:
            self._rows = list(webhook_repo.enabled_webhooks(self._session))
        return [w for w in self._rows if kind in w.events.split(",")]


def _record(
    session: Session,
    policy: Policy,
    total: SpendTotal,
    kind: str,
    threshold: int,
    now: datetime,
    known: KnownEvents,
    webhooks: _Webhooks,
    result: OutboxResult,
    extra: Mapping[str, Any] | None = None,
) -> set[str]:
    """Create one budget event of a window (unless it exists) and its
    deliveries; the PagerDuty webhooks that want a resolve at the window's end."""
    key = EventKey(policy.id, total.member, total.window_start, kind, threshold)
    if key in known:
        return set()
    result.seen.append((key, total.window_end))
    event_id = webhook_repo.new_id("evt_")
    data = events.event_data(
        event_id=event_id,
        kind=kind,
        policy=policy,
        member=total.member,
        threshold=threshold,
        spent_nanos=total.spent_nanos,
        window_start=total.window_start,
        window_end=total.window_end,
        would_reject=total.would_reject,
    )
    if extra:
        data.update(extra)
    if not webhook_repo.insert_event(
        session, key, event_id=event_id, window_end=total.window_end, data=data, now=now
    ):
        return set()
    result.events += 1
    targets = webhooks.subscribed(kind)
    added = webhook_repo.add_deliveries(
        session, event_id, (w.id for w in targets), due=now, now=now
    )
    result.deliveries += added
    result.recorded.append(
        Recorded(
            event_id,
            kind,
            policy.id,
            total.member,
            threshold,
            data["spent_usd"],
            data["amount_usd"],
            added,
        )
    )
    return {w.id for w in targets if w.format == PAGERDUTY and w.resolve_on_reset}


def _schedule_resolve(
    session: Session,
    policy: Policy,
    total: SpendTotal,
    webhook_ids: set[str],
    now: datetime,
    incident: str = "",
) -> int:
    """A window_reset event (once per window and ``incident``) and, for each
    PagerDuty webhook that was just sent a trigger, a delivery due when the
    window ends. ``incident`` "forecast": the forecast's own incident (its
    warning must not hold back the page of a budget spent)."""
    threshold = 1 if incident == events.FORECAST_INCIDENT else 0
    key = EventKey(policy.id, total.member, total.window_start, events.WINDOW_RESET, threshold)
    event_id = webhook_repo.new_id("evt_")
    data = events.event_data(
        event_id=event_id,
        kind=events.WINDOW_RESET,
        policy=policy,
        member=total.member,
        threshold=0,
        spent_nanos=total.spent_nanos,
        window_start=total.window_start,
        window_end=total.window_end,
    )
    if incident:
        data["incident"] = incident
    if not webhook_repo.insert_event(
        session, key, event_id=event_id, window_end=total.window_end, data=data, now=now
    ):
        found = webhook_repo.event_id_of(session, key)
        assert found is not None
        event_id = found
    due = datetime.fromtimestamp(total.window_end, UTC)
    return webhook_repo.add_deliveries(session, event_id, sorted(webhook_ids), due=due, now=now)
