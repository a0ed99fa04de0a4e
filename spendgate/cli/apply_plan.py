"""What `spendgate apply` would change: declared objects and the control
plane's, in one comparable form each, and the difference.

Pure: takes the declared entries and the messages the admin API returned.
Secrets are never compared as values (the API does not return them): a
webhook's apply marker carries a fingerprint of the url, secret and routing
key apply last wrote (``fingerprint``), compared with the declared ones'.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from spendgate.cli.apply_files import Declared, Entry, identity
from spendgate.cli.client import CliError
from spendgate.cli.policies import (
    forecast_alert_text,
    parse_forecast_alert,
    parse_window,
    window_text,
)
from spendgate.domain import limits
from spendgate.domain.policies import (
    FieldViolation,
    PolicyInvalid,
    Scope,
    normalize_target,
    validate_policy,
)
from spendgate.domain.pricing import format_usd, parse_usd
from spendgate.domain.webhook_urls import masked_url
from spendgate.domain.windows import InvalidWindow, WindowSpec
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import pricing_pb2 as pp
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.wire import PRICE_FIELDS, UNITS, price_from_message, price_message

MARKER = "apply"
SECRETS_MARK = " secrets="
DEFAULT_EVENTS = ["budget_policy.exceeded", "budget_policy.threshold_crossed"]
PAGERDUTY_ONLY = ("severity", "resolve_on_reset")
KIND_NAMES = {"policies": "policy", "webhooks": "webhook", "price_overrides": "price override"}
Server = pb.BudgetPolicy | wpb.Webhook | pp.PriceOverride


def fingerprint(name: str, secrets: dict[str, str]) -> str:
    """16 hex digits of SHA-256 over the webhook's name and the secrets apply
    writes: tells apply whether they changed, without the server ever
    returning them. The name salts it (two webhooks with one key differ).
    A URL counts only when it carries credentials (the API masks them);
    any other URL is compared as the API returns it."""
    url = secrets.get("url", "")
    if masked_url(url) == url:
        url = ""
    parts = [name, url, secrets.get("secret", ""), secrets.get("routing_key", "")]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _usd(text: str) -> str:
    return format_usd(parse_usd(text)).removeprefix("$")


def _scope(msg_scope: int) -> str:
    return pb.Scope.Name(msg_scope).removeprefix("SCOPE_").lower()


def declared_policy(e: Entry) -> dict[str, Any]:
    """The policy as declared, checked here with the control plane's own
    rules (so --dry-run finds what the server would refuse)."""
    f = e.fields
    amount = str(f["amount"])
    try:
        nanos = parse_usd(amount)
    except ValueError:
        raise CliError(f"{e.where}.amount: {amount!r} is not a dollar amount") from None
    thresholds = sorted(int(t) for t in f.get("thresholds", []))
    problems = validate_policy(
        name=str(f["name"]).strip(),
        amount_nanos=nanos,
        alert_thresholds=thresholds,
        description=str(f.get("description", "")),
    )
    try:
        window = parse_window(str(f.get("window", "1d")))
        WindowSpec(
            unit=UNITS[window.unit], count=window.count, timezone=str(f.get("timezone", "UTC"))
        )
    except CliError as err:
        raise CliError(f"{e.where}.window: {str(err).partition(': ')[2]}") from None
    except InvalidWindow as err:
        key = "timezone" if err.field == "timezone" else "window"
        problems.append(FieldViolation(key, err.message))
    if problems:
        first = problems[0]
        key = {"amount_usd": "amount", "alert_thresholds": "thresholds"}.get(first.field, "")
        raise CliError(f"{e.where}.{key or first.field}: {first.description}")
    amount = _usd(amount)
    scope = str(f.get("scope", "global"))
    try:
        target = normalize_target(Scope(scope.upper()), str(f.get("target", "")))
    except PolicyInvalid as err:
        text = "; ".join(v.description for v in err.violations)
        raise CliError(f"{e.where}.target: {text}") from None
    enforcement = str(f.get("enforcement", "enforced"))
    if enforcement == "shadow" and str(f["action"]) != "reject":
        raise CliError(f"{e.where}.enforcement: shadow applies to reject policies only")
    try:
        rule = parse_forecast_alert(str(f.get("forecast_alert", "off")))
    except CliError as err:
        raise CliError(f"{e.where}.forecast_alert: {err}") from None
    if rule is not None and rule.within.seconds > limits.MAX_FORECAST_WITHIN_S:
        raise CliError(
            f"{e.where}.forecast_alert: forecast_alert.within must be at most "
            f"{limits.MAX_FORECAST_WITHIN_S // 86400} days"
        )
    forecast = "-"
    if rule is not None:
        forecast = forecast_alert_text(pb.BudgetPolicy(forecast_alert=rule))
    wanted: dict[str, Any] = {
        "name": str(f["name"]).strip(),
        "description": str(f.get("description", "")),
        "amount": amount,
        "window": window_text(window),
        "timezone": str(f.get("timezone", "UTC")),
        "action": str(f["action"]),
        "scope": scope,
        "target": target,
        "thresholds": thresholds,
        "enabled": bool(f.get("enabled", True)),
        "enforcement": enforcement,
        "expose_to_clients": bool(f.get("expose_to_clients", False)),
        "forecast_alert": forecast,
        "marker": MARKER,
    }
    if "week_start" in f:  # omitted: the server's default, not compared
        wanted["week_start"] = str(f["week_start"])
    return wanted


def server_policy(p: pb.BudgetPolicy) -> dict[str, Any]:
    return {
        "name": p.name,
        "description": p.description,
        "amount": p.amount_usd,
        "window": window_text(p.window),
        "week_start": pb.Weekday.Name(p.window.week_start).removeprefix("WEEKDAY_").lower(),
        "timezone": p.timezone,
        "action": pb.Action.Name(p.action).removeprefix("ACTION_").lower(),
        "scope": _scope(p.scope),
        "target": p.target,
        "thresholds": sorted(p.alert_thresholds),
        "enabled": p.enabled,
        "enforcement": "shadow" if p.enforcement == pb.ENFORCEMENT_SHADOW else "enforced",
        "expose_to_clients": p.expose_to_clients,
        "forecast_alert": forecast_alert_text(p),
        "marker": p.apply_marker,
    }


def declared_webhook(e: Entry) -> dict[str, Any]:
    f = e.fields
    name = str(f["name"]).strip()
    wanted: dict[str, Any] = {
        "name": name,
        "description": str(f.get("description", "")),
        "format": str(f["format"]),
        "events": sorted(f.get("events") or DEFAULT_EVENTS),
        "enabled": bool(f.get("enabled", True)),
        "marker": f"{MARKER}{SECRETS_MARK}{fingerprint(name, e.secrets)}",
    }
    if "url" in e.secrets:  # omitted (PagerDuty): the Events API, not compared
        wanted["url"] = masked_url(e.secrets["url"])
    if wanted["format"] == "pagerduty":
        wanted["severity"] = str(f.get("severity", "error"))
        wanted["resolve_on_reset"] = bool(f.get("resolve_on_reset", True))
    return wanted


def server_webhook(w: wpb.Webhook) -> dict[str, Any]:
    return {
        "name": w.name,
        "description": w.description,
        "format": wpb.WebhookFormat.Name(w.format).removeprefix("WEBHOOK_FORMAT_").lower(),
        "url": w.url,
        "events": sorted(w.events),
        "enabled": w.enabled,
        "severity": wpb.PagerDutySeverity.Name(w.pagerduty_severity)
        .removeprefix("PAGER_DUTY_SEVERITY_")
        .lower(),
        "resolve_on_reset": w.resolve_on_reset,
        "marker": w.apply_marker,
    }


def _prices(e_where: str, model: str, provider: str, f: dict[str, Any]) -> dict[str, str]:
    msg = pp.Price(**{n: str(f[n]) for n in PRICE_FIELDS if n in f})
    try:
        text = price_message(price_from_message(model, provider, msg))
    except ValueError as err:
        raise CliError(f"{e_where}: {err}") from None
    return {n: getattr(text, n) for n in PRICE_FIELDS}


def declared_price(e: Entry) -> dict[str, Any]:
    f = e.fields
    model = str(f["model"]).strip().lower()
    provider = str(f.get("provider", "")).strip().lower()
    return {
        "model": model,
        "provider": provider,
        "route": str(f.get("route", "")).strip(),
        **_prices(e.where, model, provider, f),
        "note": str(f.get("note", "")),
        "marker": MARKER,
    }


def server_price(o: pp.PriceOverride) -> dict[str, Any]:
    return {
        "model": o.model,
        "provider": o.provider,
        "route": o.route,
        **{n: getattr(o.price, n) for n in PRICE_FIELDS},
        "note": o.note,
        "marker": o.apply_marker,
    }


def server_identity(kind: str, msg: Server) -> str:
    if isinstance(msg, pp.PriceOverride):
        return f"{msg.model} {msg.provider or '*'} {msg.route or '*'}"
    return msg.name


DECLARED = {
    "policies": declared_policy,
    "webhooks": declared_webhook,
    "price_overrides": declared_price,
}
SERVER = {"policies": server_policy, "webhooks": server_webhook, "price_overrides": server_price}


@dataclass(frozen=True, slots=True)
class Change:
    """One line of the plan. ``action``: create, update, unchanged, delete or
    keep (not declared, and not to be deleted). ``fields``: for an update,
    the compared fields that differ (``marker`` alone: adopted or secrets)."""

    action: str
    kind: str
    name: str
    entry: Entry | None = None
    current: Server | None = None
    fields: tuple[str, ...] = ()
    wanted: dict[str, Any] | None = None
    had: dict[str, Any] | None = None

    @property
    def is_change(self) -> bool:
        return self.action in ("create", "update", "delete")

    def describe(self, *, dry_run: bool) -> str:
        what = f"{KIND_NAMES[self.kind]} {self.name}"
        if self.action == "create":
            return f"+ {'would create' if dry_run else 'created'} {what}"
        if self.action == "delete":
            return f"- {'would delete' if dry_run else 'deleted'} {what}"
        if self.action == "unchanged":
            return f"= unchanged {what}"
        if self.action == "keep":
            return f"  not declared {what} (kept: " + (
                "--prune deletes it)"
                if self.current is not None and self.current.apply_marker
                else "not created by apply; --prune-all deletes it)"
            )
        return f"~ {'would update' if dry_run else 'updated'} {what}: " + ", ".join(
            self._field_text(f) for f in self.fields
        )

    def _field_text(self, name: str) -> str:
        assert self.wanted is not None and self.had is not None
        if name == "marker":
            if not self.had["marker"].startswith(MARKER):
                return "adopted (it was not created by apply)"
            return "secrets (url, secret or routing key)"
        return f"{name} {_show(self.had.get(name))} -> {_show(self.wanted[name])}"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" or value != value.strip() else value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def check(declared: Declared) -> None:
    """CliError naming the file and key of the first declared value the
    control plane would refuse (checked before it is asked anything)."""
    for kind, convert in DECLARED.items():
        for entry in declared.of(kind):
            convert(entry)


def plan(
    declared: Declared,
    current: dict[str, list[Server]],
    *,
    prune: bool,
    prune_all: bool,
) -> list[Change]:
    """The changes that make the control plane's objects the declared ones,
    per kind in the file's order, then what is not declared."""
    changes: list[Change] = []
    for kind in ("price_overrides", "webhooks", "policies"):
        by_id = {server_identity(kind, m): m for m in current.get(kind, [])}
        declared_ids = set()
        for entry in declared.of(kind):
            name = identity(entry)
            declared_ids.add(name)
            wanted = DECLARED[kind](entry)
            found = by_id.get(name)
            if found is None:
                changes.append(Change("create", kind, name, entry=entry, wanted=wanted))
                continue
            had = SERVER[kind](found)  # type: ignore[operator]
            differ = tuple(k for k in wanted if wanted[k] != had.get(k))
            action = "update" if differ else "unchanged"
            changes.append(Change(action, kind, name, entry, found, differ, wanted, had))
        for name, msg in sorted(by_id.items()):
            if name in declared_ids:
                continue
            delete = prune_all or (prune and msg.apply_marker.startswith(MARKER))
            changes.append(Change("delete" if delete else "keep", kind, name, current=msg))
    return changes
