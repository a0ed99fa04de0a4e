"""spendgate.v1 Webhook messages <-> stored rows, with validation.

Every violation is collected before failing, each named as in the .proto.
Secrets never leave through here: messages only say whether one is set, and
URLs come back with their credential-like parts masked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import orjson

from control_plane.errors import InvalidArgument
from control_plane.keyring import Keyring, SecretUnreadable, is_encrypted
from control_plane.names import marker_violations
from control_plane.store.models import DeliveryAttemptRow, WebhookEventRow, WebhookRow
from control_plane.store.webhook_repo import DeliveryView
from control_plane.webhooks import events, sealed
from control_plane.webhooks.formats import (
    GENERIC,
    PAGERDUTY,
    PAGERDUTY_URL,
    SEVERITIES,
    SLACK,
    Receiver,
)
from control_plane.webhooks.signing import SecretInvalid, secret_key
from control_plane.webhooks.ssrf import UrlBlocked, UrlPolicy
from spendgate.domain import limits
from spendgate.domain.policies import Action, FieldViolation, Scope, text_violations
from spendgate.domain.webhook_urls import masked_url
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.visible import first_unsafe
from spendgate.wire import ACTIONS_PB, SCOPES_PB, timestamp

FORMATS: dict[int, str] = {
    wpb.WEBHOOK_FORMAT_GENERIC: GENERIC,
    wpb.WEBHOOK_FORMAT_SLACK: SLACK,
    wpb.WEBHOOK_FORMAT_PAGERDUTY: PAGERDUTY,
}
FORMATS_PB = {v: k for k, v in FORMATS.items()}
SEVERITY: dict[int, str] = {
    wpb.PAGER_DUTY_SEVERITY_CRITICAL: "critical",
    wpb.PAGER_DUTY_SEVERITY_ERROR: "error",
    wpb.PAGER_DUTY_SEVERITY_WARNING: "warning",
    wpb.PAGER_DUTY_SEVERITY_INFO: "info",
}
SEVERITY_PB = {v: k for k, v in SEVERITY.items()}
STATES_PB = {
    "pending": wpb.DELIVERY_STATE_PENDING,
    "delivered": wpb.DELIVERY_STATE_DELIVERED,
    "failed": wpb.DELIVERY_STATE_FAILED,
}
STATES = {v: k for k, v in STATES_PB.items()}
MAX_NAME, MAX_DESCRIPTION, MAX_URL, MAX_KEY = (
    limits.MAX_NAME_CHARS,
    limits.MAX_DESCRIPTION_CHARS,
    limits.MAX_URL_CHARS,
    200,
)
_ROUTING_KEY = re.compile(r"^[A-Za-z0-9_\-.:]{1,200}$")
assert set(SEVERITY.values()) == set(SEVERITIES)


@dataclass(frozen=True, slots=True)
class WebhookValues:
    """The writable fields of a webhook, validated and normalised."""

    name: str
    description: str
    url: str
    format: str
    events: tuple[str, ...]
    secret: str
    routing_key: str
    severity: str
    resolve_on_reset: bool
    enabled: bool
    apply_marker: str = ""


def webhook_values(
    msg: wpb.Webhook, *, url_policy: UrlPolicy, secret: str, routing_key: str
) -> WebhookValues:
    """Validate ``msg``; ``secret`` and ``routing_key`` are the values to store
    (from the message, or kept from the stored webhook on update)."""
    violations: list[FieldViolation] = []
    name = msg.name.strip()
    violations += text_violations("name", name, MAX_NAME, required=True)
    violations += text_violations("description", msg.description, MAX_DESCRIPTION, multiline=True)
    violations += marker_violations("apply_marker", msg.apply_marker)
    fmt = FORMATS.get(msg.format)
    if fmt is None:
        violations.append(FieldViolation("format", "is required: GENERIC, SLACK or PAGERDUTY"))
    url = msg.url.strip() or (PAGERDUTY_URL if fmt == PAGERDUTY else "")
    if not url:
        violations.append(FieldViolation("url", "is required"))
    elif len(url) > MAX_URL:
        violations.append(FieldViolation("url", f"must be at most {MAX_URL} characters"))
    elif first_unsafe(url) is not None:
        violations.append(FieldViolation("url", "must not contain control characters"))
    else:
        try:
            url_policy.target(url)
        except UrlBlocked as e:
            violations.append(FieldViolation("url", str(e)))
    chosen: list[str] = []
    for i, kind in enumerate(msg.events):
        if kind not in events.SUBSCRIBABLE:
            violations.append(
                FieldViolation(f"events[{i}]", f"must be one of {', '.join(events.SUBSCRIBABLE)}")
            )
        elif kind not in chosen:
            chosen.append(kind)
    # Format-dependent checks only when the format is known.
    if secret:
        if fmt not in (GENERIC, None):
            violations.append(FieldViolation("secret", "only GENERIC webhooks are signed"))
        else:
            try:
                secret_key(secret)
            except SecretInvalid as e:
                violations.append(FieldViolation("secret", str(e)))
    if fmt == PAGERDUTY and not routing_key:
        violations.append(FieldViolation("routing_key", "is required for PAGERDUTY webhooks"))
    elif routing_key and fmt not in (PAGERDUTY, None):
        violations.append(FieldViolation("routing_key", "is only for PAGERDUTY webhooks"))
    elif routing_key and not _ROUTING_KEY.match(routing_key):
        violations.append(
            FieldViolation("routing_key", "must be 1 to 200 letters, digits or - _ . :")
        )
    severity = "error"
    if msg.pagerduty_severity:
        if msg.pagerduty_severity not in SEVERITY:
            violations.append(FieldViolation("pagerduty_severity", "is not a known severity"))
        else:
            severity = SEVERITY[msg.pagerduty_severity]
    if violations:
        raise InvalidArgument(violations)
    assert fmt is not None
    return WebhookValues(
        name=name,
        description=msg.description,
        url=url,
        format=fmt,
        events=tuple(k for k in events.SUBSCRIBABLE if k in chosen) or events.DEFAULT_EVENTS,
        secret=secret,
        routing_key=routing_key,
        severity=severity,
        resolve_on_reset=msg.resolve_on_reset if msg.HasField("resolve_on_reset") else True,
        enabled=msg.enabled if msg.HasField("enabled") else True,
        apply_marker=msg.apply_marker,
    )


def apply_values(row: WebhookRow, v: WebhookValues, keyring: Keyring | None) -> None:
    """Write ``v`` into ``row`` (whose id is set), sealing the secret columns."""
    row.name = v.name
    row.description = v.description
    row.url = sealed.seal(keyring, "url", row.id, v.url)
    row.url_masked = masked_url(v.url)
    row.format = v.format
    row.events = ",".join(v.events)
    row.secret = sealed.seal(keyring, "secret", row.id, v.secret)
    row.routing_key = sealed.seal(keyring, "routing_key", row.id, v.routing_key)
    row.severity = v.severity
    row.resolve_on_reset = v.resolve_on_reset
    row.enabled = v.enabled
    row.apply_marker = v.apply_marker


def etag(row: WebhookRow) -> str:
    return f"v{row.version}"


def receiver(row: WebhookRow, keyring: Keyring | None) -> Receiver:
    """What sending needs, secrets opened; SecretUnreadable names the column."""
    opened = {}
    for column in sealed.COLUMNS:
        try:
            opened[column] = sealed.unseal(keyring, column, row.id, getattr(row, column))
        except SecretUnreadable as e:
            raise SecretUnreadable(f"webhook {column} {e}") from None
    return Receiver(
        row.format, opened["url"], opened["secret"], opened["routing_key"], row.severity
    )


def shown_url(row: WebhookRow) -> str:
    """The URL as the API shows it. A row an earlier release's replica wrote
    during an upgrade has no ``url_masked`` and its URL in clear."""
    if row.url_masked or is_encrypted(row.url):
        return row.url_masked
    return masked_url(row.url)


def webhook_message(row: WebhookRow) -> wpb.Webhook:
    return wpb.Webhook(
        id=row.id,
        name=row.name,
        description=row.description,
        url=shown_url(row),
        format=FORMATS_PB[row.format],  # type: ignore[arg-type]
        events=row.events.split(","),
        has_secret=bool(row.secret),
        has_routing_key=bool(row.routing_key),
        pagerduty_severity=SEVERITY_PB[row.severity],  # type: ignore[arg-type]
        resolve_on_reset=row.resolve_on_reset,
        enabled=row.enabled,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        created_by=row.created_by,
        updated_by=row.updated_by,
        etag=etag(row),
        apply_marker=row.apply_marker,
    )


def event_message(e: WebhookEventRow) -> wpb.BudgetEvent:
    d = orjson.loads(e.data)
    if e.kind == events.ANOMALY:
        return wpb.BudgetEvent(
            id=e.id,
            type=e.kind,
            window_start=timestamp(e.window_end),
            window_end=timestamp(e.window_end),
            create_time=timestamp(e.create_time),
            anomaly=wpb.UsageAnomalyEvent(
                reason=d.get("reason", ""),
                data_plane_id=d.get("data_plane_id", ""),
                model=d.get("model", ""),
                provider=d.get("provider", ""),
                route=d.get("route", ""),
                request_id=d.get("request_id", ""),
                charged_usd=d.get("charged_usd", ""),
                reported_cost_usd=d.get("reported_cost_usd", ""),
                input_tokens=d.get("input_tokens", ""),
                output_tokens=d.get("output_tokens", ""),
                max_cost_usd=d.get("max_cost_usd", ""),
                policy_ids=d.get("policy_ids", []),
            ),
        )
    msg = wpb.BudgetEvent(
        id=e.id,
        type=e.kind,
        policy_id=e.policy_id,
        policy_name=d.get("policy_name", ""),
        scope=SCOPES_PB[Scope(d["scope"].upper())],
        target=d.get("target", ""),
        member=e.member,
        action=ACTIONS_PB[Action(d["action"].upper())],
        # (A window_reset event's key uses 1 for the forecast's incident.)
        threshold_percent=e.threshold if e.kind == events.THRESHOLD_CROSSED else 0,
        amount_usd=d.get("amount_usd", ""),
        spent_usd=d.get("spent_usd", ""),
        window_start=timestamp(e.window_start),
        window_end=timestamp(e.window_end),
        create_time=timestamp(e.create_time),
    )
    if e.kind == events.FORECAST and "exhausted_at" in d:
        msg.forecast_exhaust_time.FromDatetime(datetime.fromisoformat(d["exhausted_at"]))
    return msg


def _attempt_message(a: DeliveryAttemptRow) -> wpb.DeliveryAttempt:
    return wpb.DeliveryAttempt(
        number=a.number,
        start_time=timestamp(a.start_time),
        duration_ms=a.duration_ms,
        status_code=a.status_code,
        error=a.error,
        response_excerpt=a.response_excerpt,
    )


def delivery_message(v: DeliveryView) -> wpb.WebhookDelivery:
    d = v.delivery
    msg = wpb.WebhookDelivery(
        id=d.id,
        webhook_id=d.webhook_id,
        event=event_message(v.event),
        state=STATES_PB[d.state],
        attempt_count=d.attempts,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        create_time=timestamp(d.create_time),
        attempts=[_attempt_message(a) for a in v.attempts],
    )
    if d.state == "pending":
        msg.next_attempt_time.CopyFrom(timestamp(d.next_attempt_at))
    if d.last_attempt_at is not None:
        msg.last_attempt_time.CopyFrom(timestamp(d.last_attempt_at))
    if d.delivered_at is not None:
        msg.delivered_time.CopyFrom(timestamp(d.delivered_at))
    return msg
