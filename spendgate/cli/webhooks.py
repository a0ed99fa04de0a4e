"""`spendgate webhook ...`: where budget alerts go, and what became of them.

spendgate webhook create --name oncall --routing-key R0123...      (PagerDuty)
spendgate webhook create --name chat --url https://hooks.slack.com/services/...
spendgate webhook create --name ops --url https://ops.example.com/hook --generate-secret
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from spendgate.cli import listen as listen_args
from spendgate.cli.client import AdminClient, CliError
from spendgate.cli.lookup import by_id_or_name
from spendgate.cli.output import as_json, echo, table
from spendgate.v1 import webhooks_pb2 as wpb

FORMATS = {
    "generic": wpb.WEBHOOK_FORMAT_GENERIC,
    "slack": wpb.WEBHOOK_FORMAT_SLACK,
    "pagerduty": wpb.WEBHOOK_FORMAT_PAGERDUTY,
}
SEVERITIES = {
    "critical": wpb.PAGER_DUTY_SEVERITY_CRITICAL,
    "error": wpb.PAGER_DUTY_SEVERITY_ERROR,
    "warning": wpb.PAGER_DUTY_SEVERITY_WARNING,
    "info": wpb.PAGER_DUTY_SEVERITY_INFO,
}
STATES = {
    "pending": wpb.DELIVERY_STATE_PENDING,
    "delivered": wpb.DELIVERY_STATE_DELIVERED,
    "failed": wpb.DELIVERY_STATE_FAILED,
}
EVENTS = {
    "exceeded": "budget_policy.exceeded",
    "threshold_crossed": "budget_policy.threshold_crossed",
    "threshold": "budget_policy.threshold_crossed",
    "anomaly": "usage.anomaly",
    "forecast": "budget_policy.forecast",
}


def _name(value: int, table_: Mapping[str, int]) -> str:
    return next((k for k, v in table_.items() if v == value), "?")


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    admin_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "webhook", help="send budget alerts to Slack, PagerDuty or any HTTPS endpoint"
    )
    wsub = p.add_subparsers(dest="webhook_command", required=True)
    create = wsub.add_parser("create", help="add a webhook")
    _fields(create, create=True)
    admin_flags(create)
    admin_flags(wsub.add_parser("list", help="list webhooks"))
    for name, text in (("get", "show a webhook"), ("delete", "delete a webhook")):
        one = wsub.add_parser(name, help=text)
        one.add_argument("id", metavar="ID_OR_NAME")
        admin_flags(one)
    update = wsub.add_parser("update", help="change fields of a webhook")
    update.add_argument("id", metavar="ID_OR_NAME")
    _fields(update, create=False)
    admin_flags(update)
    test = wsub.add_parser("test", help="send a test event now and show the answer")
    test.add_argument("id", metavar="ID_OR_NAME")
    admin_flags(test)
    deliveries = wsub.add_parser("deliveries", help="deliveries and their attempts, newest first")
    deliveries.add_argument("--webhook", help="only this webhook (id or name)")
    deliveries.add_argument("--event", help="only this event id")
    deliveries.add_argument("--state", choices=sorted(STATES))
    deliveries.add_argument("--limit", type=int, default=50, help="at most this many (50)")
    admin_flags(deliveries)
    listen = wsub.add_parser(
        "listen",
        help="receive alerts here: register a signed webhook, print each event, remove it on exit",
    )
    listen_args.add_arguments(listen)
    admin_flags(listen)


def _fields(p: argparse.ArgumentParser, *, create: bool) -> None:
    p.add_argument("--name", required=create)
    p.add_argument("--description")
    p.add_argument(
        "--url",
        help="where to POST (PagerDuty: default Events API v2; Slack: the incoming-webhook URL)",
    )
    p.add_argument(
        "--format",
        choices=sorted(FORMATS),
        help="default: pagerduty with --routing-key, slack for hooks.slack.com, else generic",
    )
    p.add_argument(
        "--events", help="exceeded,threshold_crossed,anomaly,forecast (default the first two)"
    )
    p.add_argument("--secret", help="whsec_... signing secret (GENERIC); '-' reads stdin")
    p.add_argument("--routing-key", help="PagerDuty integration key; '-' reads stdin")
    p.add_argument("--severity", choices=list(SEVERITIES), help="PagerDuty severity (error)")
    if create:
        p.add_argument(
            "--generate-secret",
            action="store_true",
            help="make a signing secret and print it once",
        )
        p.add_argument("--no-resolve", action="store_true", help="PagerDuty: no resolve at reset")
        p.add_argument("--disabled", action="store_true", help="create it disabled")
    else:
        p.add_argument("--clear-secret", action="store_true", help="stop signing")
        resolve = p.add_mutually_exclusive_group()
        resolve.add_argument("--resolve", action="store_true", dest="resolve_on_reset")
        resolve.add_argument("--no-resolve", action="store_true")
        group = p.add_mutually_exclusive_group()
        group.add_argument("--enable", action="store_true")
        group.add_argument("--disable", action="store_true")
        p.add_argument("--etag", help="only update this version")


def _stdin_or(value: str) -> str:
    return sys.stdin.readline().strip() if value == "-" else value


def _events(text: str) -> list[str]:
    out = []
    for part in (t.strip() for t in text.split(",") if t.strip()):
        name = EVENTS.get(part, part)
        if name not in EVENTS.values():
            raise CliError(f"--events {part!r}: use exceeded, threshold_crossed, anomaly, forecast")
        out.append(name)
    return out


def webhook_from_args(args: argparse.Namespace) -> tuple[wpb.Webhook, list[str]]:
    """The fields given on the command line, and their field-mask paths."""
    w = wpb.Webhook()
    paths: list[str] = []
    for field in ("name", "description", "url"):
        value = getattr(args, field)
        if value is not None:
            setattr(w, field, value)
            paths.append(field)
    if args.format is not None:
        w.format = FORMATS[args.format]
        paths.append("format")
    if args.events is not None:
        w.events.extend(_events(args.events))
        paths.append("events")
    if args.secret is not None:
        w.secret = _stdin_or(args.secret)
        paths.append("secret")
    if args.routing_key is not None:
        w.routing_key = _stdin_or(args.routing_key)
        paths.append("routing_key")
    if args.severity is not None:
        w.pagerduty_severity = SEVERITIES[args.severity]
        paths.append("pagerduty_severity")
    return w, paths


def _guess_format(w: wpb.Webhook) -> int:
    if w.routing_key:
        return wpb.WEBHOOK_FORMAT_PAGERDUTY
    if urlsplit(w.url).hostname == "hooks.slack.com":
        return wpb.WEBHOOK_FORMAT_SLACK
    return wpb.WEBHOOK_FORMAT_GENERIC


def _rows(webhooks: list[wpb.Webhook]) -> str:
    return table(
        ["id", "name", "format", "url", "events", "signed", "enabled"],
        [
            [
                w.id,
                w.name,
                _name(w.format, FORMATS),
                w.url,
                ",".join(e.removeprefix("budget_policy.") for e in w.events),
                "yes" if w.has_secret else "-",
                "yes" if w.enabled else "no",
            ]
            for w in webhooks
        ],
    )


def _show(args: argparse.Namespace, w: wpb.Webhook, secret: str = "") -> None:
    if args.json:
        data = as_json(w)
        if secret:
            data["secret"] = secret
        echo(json.dumps(data, indent=2))
        return
    echo(_rows([w]))
    if secret:
        echo(f"\nsigning secret (shown once; verify webhook-signature with it):\n{secret}")


def run_webhook(args: argparse.Namespace, client: AdminClient) -> None:
    cmd = args.webhook_command
    if cmd == "create":
        w, _ = webhook_from_args(args)
        secret = ""
        if args.generate_secret:
            if w.secret:
                raise CliError("give --secret or --generate-secret, not both")
            # Made here so the server never has to return it (secrets are write-only).
            w.secret = secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        if not w.format:
            w.format = _guess_format(w)  # type: ignore[assignment]
        if args.no_resolve:
            w.resolve_on_reset = False
        if args.disabled:
            w.enabled = False
        _show(args, client.call("CreateWebhook", wpb.CreateWebhookRequest(webhook=w)), secret)
    elif cmd == "get":
        _show(args, resolve_webhook(client, args.id))
    elif cmd == "list":
        hooks = all_webhooks(client)
        echo(json.dumps(as_json(hooks), indent=2) if args.json else _rows(hooks))
    elif cmd == "update":
        _update(args, client)
    elif cmd == "delete":
        webhook_id = resolve_webhook(client, args.id).id
        client.call("DeleteWebhook", wpb.DeleteWebhookRequest(id=webhook_id))
        echo(json.dumps({"deleted": webhook_id}) if args.json else f"deleted {webhook_id}")
    elif cmd == "test":
        _test(args, client)
    elif cmd == "deliveries":
        _deliveries(args, client)
    elif cmd == "listen":
        listen_args.run_listen(args, client, _events(args.events) if args.events else [])


def resolve_webhook(client: AdminClient, ref: str) -> wpb.Webhook:
    """The webhook ``ref`` names: its id, else its name."""
    return by_id_or_name(
        ref,
        kind="webhook",
        id_prefix="wh_",
        get=lambda i: client.call("GetWebhook", wpb.GetWebhookRequest(id=i)),
        listing=lambda: all_webhooks(client),
        list_command="spendgate webhook list",
    )


def all_webhooks(client: AdminClient) -> list[wpb.Webhook]:
    hooks: list[wpb.Webhook] = []
    token = ""
    while True:
        resp = client.call("ListWebhooks", wpb.ListWebhooksRequest(page_size=500, page_token=token))
        hooks.extend(resp.webhooks)
        token = resp.next_page_token
        if not token:
            return hooks


def _update(args: argparse.Namespace, client: AdminClient) -> None:
    w, paths = webhook_from_args(args)
    if args.clear_secret:
        if args.secret is not None:
            raise CliError("give --secret or --clear-secret, not both")
        w.secret = ""
        paths.append("secret")
    if args.resolve_on_reset or args.no_resolve:
        w.resolve_on_reset = bool(args.resolve_on_reset)
        paths.append("resolve_on_reset")
    if args.enable or args.disable:
        w.enabled = bool(args.enable)
        paths.append("enabled")
    if not paths:
        raise CliError("nothing to update: give at least one field, e.g. --url or --disable")
    w.id = resolve_webhook(client, args.id).id
    w.etag = args.etag or ""
    req = wpb.UpdateWebhookRequest(webhook=w, update_mask=FieldMask(paths=paths))
    _show(args, client.call("UpdateWebhook", req))


def _test(args: argparse.Namespace, client: AdminClient) -> None:
    resp = client.call(
        "TestWebhook", wpb.TestWebhookRequest(id=resolve_webhook(client, args.id).id)
    )
    if args.json:
        echo(json.dumps(as_json(resp), indent=2))
    if not resp.delivered:
        status = f" (HTTP {resp.status_code})" if resp.status_code else ""
        excerpt = f": {resp.response_excerpt.strip()[:200]}" if resp.response_excerpt else ""
        raise CliError(f"test delivery failed{status}: {resp.error}{excerpt}")
    if not args.json:
        echo(f"delivered: HTTP {resp.status_code} in {resp.duration_ms} ms")


def _when(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _deliveries(args: argparse.Namespace, client: AdminClient) -> None:
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    found: list[wpb.WebhookDelivery] = []
    token = ""
    while len(found) < args.limit:
        resp = client.call(
            "ListDeliveries",
            wpb.ListDeliveriesRequest(
                webhook_id=resolve_webhook(client, args.webhook).id if args.webhook else "",
                event_id=args.event or "",
                state=STATES[args.state] if args.state else wpb.DELIVERY_STATE_UNSPECIFIED,
                page_size=min(args.limit - len(found), 1000),
                page_token=token,
            ),
        )
        found.extend(resp.deliveries)
        token = resp.next_page_token
        if not token:
            break
    if args.json:
        echo(json.dumps(as_json(found), indent=2))
        return
    now = datetime.now(UTC)
    rows = []
    for d in found:
        event = d.event.type.removeprefix("budget_policy.")
        if d.event.threshold_percent:
            event += f" {d.event.threshold_percent}%"
        if d.state == wpb.DELIVERY_STATE_PENDING:
            seconds = int((d.next_attempt_time.ToDatetime(UTC) - now).total_seconds())
            when = f"next in {seconds}s" if seconds > 0 else "due now"
        elif d.state == wpb.DELIVERY_STATE_DELIVERED:
            when = _when(d.delivered_time)
        else:
            when = _when(d.last_attempt_time)
        rows.append(
            [
                d.id,
                d.webhook_id,
                event,
                d.event.policy_name + (f" / {d.event.member}" if d.event.member else ""),
                _name(d.state, STATES),
                str(d.attempt_count),
                str(d.last_status_code or "-"),
                when,
                d.last_error[:60] or "-",
            ]
        )
    echo(
        table(
            ["id", "webhook", "event", "policy", "state", "tries", "status", "when", "error"],
            rows,
        )
    )
