"""Budget events: which crossings a window has reached, and their payload.

Pure: no database, no HTTP. ``crossings`` is level-triggered (every level the
spend is at or above), so a batch that jumps over several thresholds yields
each of them, and a level missed earlier (a threshold added, a limit lowered)
is still reported; the store's unique key makes each one happen once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Context, Decimal
from typing import Any

from spendgate.domain.policies import Policy
from spendgate.domain.pricing import format_usd

EXCEEDED = "budget_policy.exceeded"
THRESHOLD_CROSSED = "budget_policy.threshold_crossed"
# The budget will be gone, at the recent spend rate, sooner than the
# policy's forecast_alert says (once per policy, member and window).
FORECAST = "budget_policy.forecast"
# A window_reset event's "incident" for the forecast's PagerDuty incident
# (event key threshold 1; the budget's own incident has none, threshold 0).
FORECAST_INCIDENT = "forecast"
# Not subscribable: scheduled at the end of a window that had a crossing, so
# PagerDuty webhooks can resolve their incident.
WINDOW_RESET = "budget_policy.window_reset"
# A response whose cost was above a data plane's max_cost_per_response_usd,
# or beyond the largest representable cost (charged saturated).
ANOMALY = "usage.anomaly"
# A SHADOW policy would have refused a request: once per window and member
# (the first report of a would-reject in it).
WOULD_REJECT = "budget_policy.would_reject"
SUBSCRIBABLE = (EXCEEDED, THRESHOLD_CROSSED, ANOMALY, WOULD_REJECT, FORECAST)
# What a webhook created without a list of events receives.
DEFAULT_EVENTS = (EXCEEDED, THRESHOLD_CROSSED)
TEST = "webhook.test"
# Anomaly events have no policy or window: the event key's member is the
# anomaly's id (unique per data plane report), its window the moment it occurred.
MAX_ANOMALY_ID = 80


@dataclass(frozen=True, slots=True, order=True)
class Crossing:
    """A level of a window's spend. Sorts in the order events are emitted:
    by percentage, and at equal percentage the threshold before "exceeded"."""

    percent: int
    rank: int  # 0 threshold_crossed, 1 exceeded
    kind: str

    @property
    def threshold(self) -> int:
        """The threshold percentage, or 0 for "exceeded" (part of the event key)."""
        return self.percent if self.kind == THRESHOLD_CROSSED else 0


def crossings(amount_nanos: int, thresholds: tuple[int, ...], spent_nanos: int) -> list[Crossing]:
    """Every level ``spent_nanos`` has reached, in emission order.

    Exceeded is ``spent >= amount``, the rule ext_proc rejects by.
    """
    levels = [Crossing(t, 0, THRESHOLD_CROSSED) for t in set(thresholds)]
    levels.append(Crossing(100, 1, EXCEEDED))
    return sorted(c for c in levels if spent_nanos * 100 >= amount_nanos * c.percent)


def iso(t: int | datetime) -> str:
    """RFC 3339 in UTC with a Z, to the second for Unix seconds."""
    if isinstance(t, int):
        t = datetime.fromtimestamp(t, UTC)
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def percent_used(spent_nanos: int, amount_nanos: int) -> str:
    """Spend as a percentage of the amount, rounded down to 0.1 ("99.9", not "100.0")."""
    if amount_nanos <= 0:
        return "0.0"
    value = Decimal(spent_nanos) * 100 / Decimal(amount_nanos)
    return str(value.quantize(Decimal("0.1"), rounding=ROUND_DOWN))


def usd(nanos: int) -> str:
    return format_usd(nanos).removeprefix("$")


def event_data(
    *,
    event_id: str,
    kind: str,
    policy: Policy,
    member: str,
    threshold: int,
    spent_nanos: int,
    window_start: int,
    window_end: int,
    would_reject: int = 0,
) -> dict[str, Any]:
    """The ``data`` of an event's payload, as stored with the event
    (``would_reject``: the window's would-reject count, for WOULD_REJECT)."""
    data: dict[str, Any] = {
        "event_id": event_id,
        "type": kind,
        "policy_id": policy.id,
        "policy_name": policy.name,
        "scope": policy.scope.value.lower(),
        "target": policy.target,
        "member": member,
        "action": policy.action.value.lower(),
        "amount_usd": usd(policy.amount_nanos),
        "spent_usd": usd(spent_nanos),
        "percent_used": percent_used(spent_nanos, policy.amount_nanos),
        "window_start": iso(window_start),
        "window_end": iso(window_end),
        "timezone": policy.window.timezone,
    }
    if kind == THRESHOLD_CROSSED:
        data["threshold_percent"] = threshold
    if policy.shadow:  # (absent for enforced policies: payloads as before)
        data["enforcement"] = "shadow"
    if kind == WOULD_REJECT:
        data["would_reject_count"] = would_reject
    return data


def forecast_data(
    *,
    exhausted_at: int,
    exhausted_in_s: int,
    rate_nanos_per_s: float,
    within_s: int,
    before_window_end: bool,
) -> dict[str, Any]:
    """What a FORECAST event's ``data`` has besides event_data: the
    forecast and the rule it crossed."""
    return {
        "exhausted_at": iso(exhausted_at),
        "exhausted_in_s": exhausted_in_s,
        "rate_usd_per_hour": rate_per_hour(rate_nanos_per_s),
        "forecast_alert": {"within_s": within_s, "before_window_end": before_window_end},
    }


def rate_per_hour(rate_nanos_per_s: float) -> str:
    """A rate in nano-dollars per second as US dollars per hour, 6 places."""
    per_hour = Decimal(repr(rate_nanos_per_s)) * 3600 / 10**9
    return str(per_hour.quantize(Decimal("0.000001"), context=Context(prec=80)))


def anomaly_data(
    *,
    event_id: str,
    data_plane_id: str,
    anomaly_id: str,
    reason: str,
    occurred: int,
    model: str,
    provider: str,
    route: str,
    request_id: str,
    charged_nanos: int,
    reported_cost_usd: str,
    input_tokens: str,
    output_tokens: str,
    max_cost_usd: str,
    policy_ids: list[str],
) -> dict[str, Any]:
    """The ``data`` of a usage.anomaly event's payload, as stored with the event."""
    return {
        "event_id": event_id,
        "type": ANOMALY,
        "anomaly_id": anomaly_id,
        "reason": reason,
        "occurred_at": iso(occurred),
        "data_plane_id": data_plane_id,
        "model": model,
        "provider": provider,
        "route": route,
        "request_id": request_id,
        "charged_usd": usd(charged_nanos),
        "reported_cost_usd": reported_cost_usd,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "max_cost_usd": max_cost_usd,
        "policy_ids": policy_ids,
    }
