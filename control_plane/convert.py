"""spendgate.v1 messages <-> stored rows <-> domain values, with validation.

Validation collects every violation before failing, so an admin sees all
wrong fields at once, each named as in the .proto ("window.count").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from control_plane.errors import InvalidArgument
from control_plane.names import marker_violations
from control_plane.store import repo
from control_plane.store.models import PolicyRow
from spendgate.domain import limits
from spendgate.domain.forecast import AlertRule
from spendgate.domain.policies import (
    Action,
    FieldViolation,
    Policy,
    PolicyInvalid,
    Scope,
    normalize_target,
    validate_policy,
)
from spendgate.domain.pricing import format_usd, parse_usd
from spendgate.domain.windows import InvalidWindow, WindowSpec, WindowUnit
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import (
    ACTIONS,
    ACTIONS_PB,
    SCOPES,
    SCOPES_PB,
    UNITS,
    UNITS_PB,
    WEEKDAYS_PB,
    timestamp,
)


@dataclass(frozen=True, slots=True)
class PolicyValues:
    """The writable fields of a policy, validated and normalised."""

    name: str
    description: str
    amount_nanos: int
    window: WindowSpec
    action: Action
    scope: Scope
    target: str
    alert_thresholds: tuple[int, ...]
    enabled: bool
    forecast_alert: AlertRule
    apply_marker: str = ""
    shadow: bool = False
    expose_to_clients: bool = False


# Enforcement on the wire -> "is SHADOW" (UNSPECIFIED is ENFORCED).
SHADOW_BY_ENFORCEMENT: dict[int, bool] = {
    pb.ENFORCEMENT_UNSPECIFIED: False,
    pb.ENFORCEMENT_ENFORCED: False,
    pb.ENFORCEMENT_SHADOW: True,
}


def policy_values(msg: pb.BudgetPolicy, *, default_week_start: int) -> PolicyValues:
    """Validate a BudgetPolicy message; raise InvalidArgument naming each bad field."""
    violations: list[FieldViolation] = []
    amount: int | None = None
    if not msg.amount_usd:
        violations.append(FieldViolation("amount_usd", 'is required (US dollars, e.g. "25.00")'))
    elif len(msg.amount_usd) > 64:  # no amount is that long; keep the answer short
        violations.append(FieldViolation("amount_usd", "is not a decimal dollar amount"))
    else:
        try:
            amount = parse_usd(msg.amount_usd)
        except ValueError:
            violations.append(
                FieldViolation("amount_usd", f"{msg.amount_usd!r} is not a decimal dollar amount")
            )
    violations += validate_policy(
        name=msg.name,
        amount_nanos=amount,
        alert_thresholds=msg.alert_thresholds,
        description=msg.description,
    )
    violations += marker_violations("apply_marker", msg.apply_marker)
    unit = UNITS.get(msg.window.unit)
    if unit is None:
        violations.append(
            FieldViolation("window.unit", "is required: MINUTES, HOURS, DAYS, WEEKS or MONTHS")
        )
    window_errors: list[FieldViolation] = []
    # The wire enum is 1 (Monday) .. 7 (Sunday), 0 meaning the server's default.
    week_start = default_week_start
    if not 0 <= msg.window.week_start <= 7:
        window_errors.append(
            FieldViolation(
                "window.week_start",
                "must be 0 (the server's week_start) or 1 (MONDAY) .. 7 (SUNDAY), "
                f"got {msg.window.week_start}",
            )
        )
    elif msg.window.week_start:
        week_start = msg.window.week_start - 1
    window: WindowSpec | None = None
    timezone = msg.timezone or "UTC"
    if len(timezone) > limits.MAX_TIMEZONE_CHARS:
        window_errors.append(
            FieldViolation(
                "timezone",
                f"must be an IANA name of at most {limits.MAX_TIMEZONE_CHARS} characters "
                f"(got {len(timezone)})",
            )
        )
        timezone = "UTC"
    # Check the zone and the count/week start separately so both are reported.
    checks: tuple[dict[str, Any], ...] = (
        {"timezone": timezone},
        {"count": msg.window.count, "week_start": week_start},
    )
    for kwargs in checks:
        try:
            WindowSpec(unit=unit or WindowUnit.DAYS, **kwargs)
        except InvalidWindow as e:
            name = {"count": "window.count", "week_start": "window.week_start"}.get(
                e.field, e.field
            )
            window_errors.append(FieldViolation(name, e.message))
    if window_errors:
        violations += [v for i, v in enumerate(window_errors) if v not in window_errors[:i]]
    else:
        window = WindowSpec(
            unit=unit or WindowUnit.DAYS,
            count=msg.window.count,
            timezone=timezone,
            week_start=week_start,
        )
    forecast = forecast_rule(msg, violations)
    action = ACTIONS.get(msg.action)
    if action is None:
        violations.append(FieldViolation("action", "is required: ALERT or REJECT"))
    scope = SCOPES.get(msg.scope)
    target = ""
    if scope is None:
        violations.append(
            FieldViolation("scope", "is required: " + ", ".join(s.value for s in Scope))
        )
    else:
        try:
            target = normalize_target(scope, msg.target)
        except PolicyInvalid as e:
            violations += e.violations
    shadow = SHADOW_BY_ENFORCEMENT.get(msg.enforcement)
    if shadow is None:
        violations.append(
            FieldViolation(
                "enforcement", f"must be ENFORCED or SHADOW (got {int(msg.enforcement)})"
            )
        )
    elif shadow and action is Action.ALERT:
        # An ALERT policy never blocks: there is nothing to shadow.
        violations.append(
            FieldViolation(
                "enforcement",
                "SHADOW applies only to action REJECT (an ALERT policy never blocks)",
            )
        )
    if violations:
        raise InvalidArgument(violations)
    assert window is not None and action is not None and scope is not None
    return PolicyValues(
        name=msg.name.strip(),
        description=msg.description,
        amount_nanos=amount or 0,
        window=window,
        action=action,
        scope=scope,
        target=target,
        alert_thresholds=tuple(sorted(msg.alert_thresholds)),
        enabled=msg.enabled if msg.HasField("enabled") else True,
        apply_marker=msg.apply_marker,
        shadow=bool(shadow),
        expose_to_clients=msg.expose_to_clients,
        forecast_alert=forecast,
    )


def forecast_rule(msg: pb.BudgetPolicy, violations: list[FieldViolation]) -> AlertRule:
    """The policy's forecast_alert (no rule when unset); bad values are
    appended to ``violations``."""
    if not msg.HasField("forecast_alert"):
        return AlertRule()
    f = msg.forecast_alert
    within = f.within
    if within.nanos or within.seconds < 0 or within.seconds > limits.MAX_FORECAST_WITHIN_S:
        shown = within.seconds + within.nanos / 1e9
        violations.append(
            FieldViolation(
                "forecast_alert.within",
                f"must be whole seconds from 1 to {limits.MAX_FORECAST_WITHIN_S} "
                f"({limits.MAX_FORECAST_WITHIN_S // 86400} days), or 0 for no such rule; "
                f"got {shown:g} s",
            )
        )
        return AlertRule()
    return AlertRule(within_s=within.seconds, before_window_end=f.before_window_end)


def apply_values(row: PolicyRow, v: PolicyValues, now: datetime) -> None:
    """Write validated values to ``row``; ``now`` marks when it became SHADOW
    (the first time: its would-reject count is of every shadow period)."""
    row.name = v.name
    row.description = v.description
    row.amount_nanos = v.amount_nanos
    row.window_unit = v.window.unit.value
    row.window_count = v.window.count
    row.week_start = v.window.week_start
    row.timezone = v.window.timezone
    row.action = v.action.value
    row.scope = v.scope.value
    row.target = v.target
    row.alert_thresholds = ",".join(str(t) for t in v.alert_thresholds)
    row.enabled = v.enabled
    row.apply_marker = v.apply_marker
    row.enforcement = "SHADOW" if v.shadow else "ENFORCED"
    if v.shadow and row.shadow_since is None:
        row.shadow_since = now
    row.expose_to_clients = v.expose_to_clients
    row.forecast_within_s = v.forecast_alert.within_s
    row.forecast_before_end = v.forecast_alert.before_window_end


def window_spec(row: PolicyRow) -> WindowSpec:
    return WindowSpec(
        unit=WindowUnit(row.window_unit),
        count=row.window_count,
        timezone=row.timezone,
        week_start=row.week_start,
    )


def forecast_alert(row: PolicyRow) -> AlertRule:
    return AlertRule(
        within_s=row.forecast_within_s or 0, before_window_end=bool(row.forecast_before_end)
    )


def thresholds(row: PolicyRow) -> tuple[int, ...]:
    return tuple(int(t) for t in row.alert_thresholds.split(",") if t)


def domain_policy(row: PolicyRow) -> Policy:
    return Policy(
        id=row.id,
        name=row.name,
        amount_nanos=row.amount_nanos,
        window=window_spec(row),
        action=Action(row.action),
        scope=Scope(row.scope),
        target=row.target,
        alert_thresholds=thresholds(row),
        enabled=row.enabled,
        shadow=row.enforcement == "SHADOW",
        expose_to_clients=row.expose_to_clients,
    )


def etag(row: PolicyRow) -> str:
    return f"v{row.version}"


def policy_message(row: PolicyRow, would_reject: int = 0) -> pb.BudgetPolicy:
    """``would_reject``: the policy's would-reject count (repo.would_reject_counts)."""
    msg = pb.BudgetPolicy(
        id=row.id,
        name=row.name,
        description=row.description,
        amount_usd=format_usd(row.amount_nanos).removeprefix("$"),
        window=pb.BudgetWindow(
            unit=UNITS_PB[WindowUnit(row.window_unit)],
            count=row.window_count,
            week_start=WEEKDAYS_PB[row.week_start],
        ),
        timezone=row.timezone,
        action=ACTIONS_PB[Action(row.action)],
        scope=SCOPES_PB[Scope(row.scope)],
        target=row.target,
        alert_thresholds=thresholds(row),
        enabled=row.enabled,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        created_by=row.created_by,
        updated_by=row.updated_by,
        etag=etag(row),
        apply_marker=row.apply_marker,
        # Enforced policies leave it unset (UNSPECIFIED is ENFORCED), so
        # their messages are byte for byte those of earlier releases.
        enforcement=pb.ENFORCEMENT_SHADOW if row.enforcement == "SHADOW" else None,
        expose_to_clients=row.expose_to_clients,
        would_reject_count=would_reject,
    )
    if row.shadow_since is not None:
        msg.shadow_since.CopyFrom(timestamp(row.shadow_since))
    rule = forecast_alert(row)
    if rule.enabled:
        msg.forecast_alert.before_window_end = rule.before_window_end
        if rule.within_s:
            msg.forecast_alert.within.seconds = rule.within_s
    return msg


def window_spend_message(
    *,
    policy_id: str,
    member: str,
    window_start: int,
    window_end: int,
    spent_nanos: int,
    limit_nanos: int,
    request_count: int,
    holds: Sequence[repo.Hold] = (),
    adjustment_seq: int = 0,
) -> dp.WindowSpend:
    return dp.WindowSpend(
        policy_id=policy_id,
        member=member,
        window_start=timestamp(window_start),
        window_end=timestamp(window_end),
        spent_nanos=spent_nanos,
        limit_nanos=limit_nanos,
        exceeded=spent_nanos >= limit_nanos,
        request_count=request_count,
        adjustment_seq=adjustment_seq,
        holds=[
            dp.DataPlaneHold(
                data_plane_id=h.data_plane_id,
                held_nanos=h.held_nanos,
                seq=h.seq,
                expire_time=timestamp(h.expires_at),
                requests=h.requests,
            )
            for h in holds
        ],
    )


def scope_message(scope: Scope) -> pb.Scope:
    return SCOPES_PB[scope]


def action_message(action: Action) -> pb.Action:
    return ACTIONS_PB[action]
