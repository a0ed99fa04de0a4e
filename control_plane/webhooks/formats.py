"""What a delivery looks like on the wire, per webhook format. Pure.

GENERIC    {"entity", "action", "timestamp", "data"}, Standard Webhooks headers
SLACK      an incoming-webhook message: fallback ``text`` and Block Kit ``blocks``
PAGERDUTY  an Events API v2 trigger (or resolve) with a dedup key per
           policy / member / window, so all alerts of a window are one incident
           (its forecast warning one of its own)

Every format carries webhook-id (the delivery id, stable across retries) and
webhook-timestamp; webhook-signature when the webhook has a secret.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from control_plane.webhooks import events
from control_plane.webhooks.signing import signed_headers
from spendgate.domain.forecast import duration_text

GENERIC, SLACK, PAGERDUTY = "generic", "slack", "pagerduty"
FORMATS = (GENERIC, SLACK, PAGERDUTY)
SEVERITIES = ("critical", "error", "warning", "info")
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
USER_AGENT = "spendgate-webhooks/1"


@dataclass(frozen=True, slots=True)
class Receiver:
    """What rendering needs to know about a webhook (secrets included: the
    value never leaves the control plane except in the request it signs)."""

    format: str
    url: str
    secret: str = ""
    routing_key: str = ""
    severity: str = "error"

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"Receiver(format={self.format!r})"


@dataclass(frozen=True, slots=True)
class Message:
    """One event for one webhook. ``id`` is the delivery id."""

    id: str
    kind: str
    data: dict[str, Any]
    created: datetime


@dataclass(frozen=True, slots=True)
class Outgoing:
    url: str
    headers: dict[str, str]
    body: bytes

    def __repr__(self) -> str:
        return f"Outgoing(bytes={len(self.body)})"


def render(receiver: Receiver, message: Message, now: datetime) -> Outgoing:
    if receiver.format == SLACK:
        payload = slack_message(message)
    elif receiver.format == PAGERDUTY:
        payload = pagerduty_event(message, receiver.routing_key, receiver.severity)
    else:
        payload = envelope(message)
    return _outgoing(receiver, message.id, payload, now)


def render_test_resolve(receiver: Receiver, test: Message, now: datetime) -> Outgoing:
    """Resolves the PagerDuty incident a TestWebhook trigger opened."""
    payload = pagerduty_resolve(receiver.routing_key, test_dedup_key(test))
    return _outgoing(receiver, test.id, payload, now)


def _outgoing(receiver: Receiver, msg_id: str, payload: dict[str, Any], now: datetime) -> Outgoing:
    body = orjson.dumps(payload)
    headers = {"content-type": "application/json", "user-agent": USER_AGENT}
    headers.update(signed_headers(receiver.secret, msg_id, int(now.timestamp()), body))
    return Outgoing(receiver.url, headers, body)


# ---- GENERIC ----------------------------------------------------------------


def envelope(message: Message) -> dict[str, Any]:
    entity, _, action = message.kind.rpartition(".")
    return {
        "entity": entity,
        "action": action,
        "timestamp": events.iso(message.created),
        "data": message.data,
    }


# ---- SLACK ------------------------------------------------------------------


def _esc(text: str) -> str:
    """Slack mrkdwn escaping: only &, < and > are special."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _when(iso_text: str) -> str:
    """A Slack date token (rendered in the reader's zone) with a UTC fallback."""
    t = datetime.fromisoformat(iso_text)
    fallback = t.strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{int(t.timestamp())}^{{date_short_pretty}} {{time}}|{fallback}>"


def _who(d: dict[str, Any]) -> str:
    scope = d["scope"]
    if scope == "global":
        return "all traffic"
    member = d.get("member") or d["target"]
    return f"{scope} {member}"


def _headline(message: Message) -> tuple[str, str]:
    """(emoji, title) of a budget event."""
    d = message.data
    name = d["policy_name"]
    if message.kind == events.EXCEEDED:
        return ":rotating_light:", f"Budget exceeded: {name}"
    if message.kind == events.THRESHOLD_CROSSED:
        return ":warning:", f"Budget {d['threshold_percent']}% reached: {name}"
    if message.kind == events.WOULD_REJECT:
        return ":eyes:", f"Shadow budget would reject requests: {name}"
    if message.kind == events.FORECAST:
        left = duration_text(d["exhausted_in_s"])
        return ":hourglass_flowing_sand:", f"Budget runs out in {left} at this pace: {name}"
    return ":white_check_mark:", f"Budget window reset: {name}"


def slack_message(message: Message) -> dict[str, Any]:
    d = message.data
    if message.kind == events.TEST:
        text = f":wave: spendgate test message for webhook {_esc(d['webhook_name'])}"
        return {"text": text, "blocks": [_section(text)]}
    if message.kind == events.ANOMALY:
        text = f":rotating_light: {_esc(anomaly_summary(d))}"
        return {"text": text, "blocks": [_section(text)]}
    emoji, title = _headline(message)
    spend = f"${d['spent_usd']} of ${d['amount_usd']} ({d['percent_used']}%)"
    text = f"{emoji} {_esc(title)} — {_esc(_who(d))} spent {spend}"
    detail = f"{_esc(_who(d))} spent *{spend}*."
    if message.kind == events.WINDOW_RESET:
        text = f"{emoji} {_esc(title)} — a new window started for {_esc(_who(d))}"
        detail = f"a new window started for {_esc(_who(d))}."
    shadow = d.get("enforcement") == "shadow"
    if message.kind == events.FORECAST:
        pace = f"${d['rate_usd_per_hour']}/h, gone {_when(d['exhausted_at'])}"
        text += f"; at this pace ({pace})"
        detail += f" At this pace ({pace}) the budget is gone before it resets."
    consequence = (
        "Shadow policy: requests are admitted; those it would refuse are counted."
        if shadow and message.kind != events.WINDOW_RESET
        else "Requests are answered with HTTP 429 until the window resets."
        if d["action"] == "reject" and message.kind == events.EXCEEDED
        else "Traffic keeps flowing."
        if message.kind != events.WINDOW_RESET
        else "Spend starts again from $0."
    )
    fields = [
        f"*Policy*\n{_esc(d['policy_name'])} (`{d['policy_id']}`)",
        f"*Spend vs limit*\n{spend}",
        f"*Applies to*\n{_esc(_who(d))}",
        f"*Action*\n{d['action']}",
        f"*Window*\n{_when(d['window_start'])} to {_when(d['window_end'])}",
        f"*Resets*\n{_when(d['window_end'])}",
    ]
    return {
        "text": text,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": f"{emoji} {title}"[:150]}},
            _section(f"*{_esc(d['policy_name'])}*: {detail}\n{consequence}"),
            {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"spendgate · event `{d['event_id']}`"}],
            },
        ],
    }


def anomaly_summary(d: dict[str, Any]) -> str:
    """One line about a usage.anomaly event (Slack, PagerDuty)."""
    why = (
        "beyond the largest representable cost"
        if d["reason"] == "cost_saturated"
        else f"above the maximum of ${d['max_cost_usd']} per response"
    )
    return (
        f"Usage anomaly: one {d['model'][:100]} response reported ${d['reported_cost_usd']}, "
        f"{why}; charged ${d['charged_usd']} (data plane {d['data_plane_id'][:100]}, "
        f"request {d['request_id'][:100]})"
    )


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


# ---- PAGERDUTY -------------------------------------------------------------


def dedup_key(data: dict[str, Any]) -> str:
    """One incident per policy, member and window (PagerDuty allows 255 characters)."""
    key = f"spendgate/{data['policy_id']}/{data['window_start']}/{data['member']}"
    if len(key) <= 255:
        return key
    member = hashlib.sha256(data["member"].encode()).hexdigest()
    return f"spendgate/{data['policy_id']}/{data['window_start']}/sha256:{member}"


def incident_key(data: dict[str, Any]) -> str:
    """The PagerDuty incident of an event: the window's, or its forecast's
    (a warning of its own: deduplicated into the window's incident, it would
    keep a later "exceeded" from paging at its severity)."""
    if data.get("type") != events.FORECAST and data.get("incident") != events.FORECAST_INCIDENT:
        return dedup_key(data)
    key = f"{dedup_key(data)}/forecast"
    if len(key) <= 255:
        return key
    member = hashlib.sha256(data["member"].encode()).hexdigest()
    return f"spendgate/{data['policy_id']}/{data['window_start']}/sha256:{member}/forecast"


def test_dedup_key(test: Message) -> str:
    return f"spendgate/test/{test.id}"


def pagerduty_event(message: Message, routing_key: str, severity: str) -> dict[str, Any]:
    d = message.data
    if message.kind == events.TEST:
        return {
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": test_dedup_key(message),
            "client": "spendgate",
            "payload": {
                "summary": f"spendgate test event for webhook {d['webhook_name']}",
                "source": "spendgate",
                "severity": "info",
                "timestamp": events.iso(message.created),
                "class": events.TEST,
            },
        }
    if message.kind == events.WINDOW_RESET:
        return pagerduty_resolve(routing_key, incident_key(d))
    if message.kind == events.ANOMALY:
        return {
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": f"spendgate/anomaly/{d['anomaly_id']}"[:255],
            "client": "spendgate",
            "payload": {
                "summary": anomaly_summary(d)[:1024],
                "source": "spendgate",
                "severity": severity,
                "timestamp": events.iso(message.created),
                "class": message.kind,
                "custom_details": d,
            },
        }
    _, title = _headline(message)
    who = "" if d["scope"] == "global" else f" ({_who(d)})"
    summary = (
        f"{title}{who}: ${d['spent_usd']} of ${d['amount_usd']} ({d['percent_used']}%), "
        f"action {d['action']}, window ends {d['window_end']}"
    )
    if message.kind == events.FORECAST:
        # A warning of what is coming, whatever the webhook's severity for
        # budgets already spent.
        severity = "warning"
        summary += f"; ${d['rate_usd_per_hour']}/h, gone at {d['exhausted_at']}"
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": incident_key(d),
        "client": "spendgate",
        "payload": {
            "summary": summary[:1024],
            "source": "spendgate",
            "severity": severity,
            "timestamp": events.iso(message.created),
            "component": d["policy_name"],
            "group": d["scope"],
            "class": message.kind,
            "custom_details": d,
        },
    }


def pagerduty_resolve(routing_key: str, key: str) -> dict[str, Any]:
    return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": key}
