"""`spendgate apply -f budgets.yaml` and `spendgate export`: budgets as code.

apply reads the declared policies, webhooks and price overrides (one file or
a folder, see spendgate/cli/apply_files.py), compares them with the control
plane's (spendgate/cli/apply_plan.py) and makes the difference: creates,
updates (each with the etag it read, so a concurrent change is reported,
never overwritten) and, with --prune, deletes. Exit status: 0 done (or
nothing to do), 2 a --dry-run found a difference, 1 an error.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.field_mask_pb2 import FieldMask

from spendgate.cli import apply_files, apply_plan
from spendgate.cli.apply_plan import Change, Server
from spendgate.cli.client import AdminClient, CliError
from spendgate.cli.output import echo
from spendgate.cli.policies import all_policies, parse_forecast_alert, parse_window
from spendgate.cli.webhooks import FORMATS, SEVERITIES, all_webhooks
from spendgate.domain.webhook_urls import MASK
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import pricing_pb2 as pp
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.visible import visible
from spendgate.wire import PRICE_FIELDS

EXIT_DIFF = 2
# The fields apply manages (its update masks). Named one by one, not derived
# from the messages: a field a later release adds must not be cleared by an
# apply that does not know it.
# fmt: off
POLICY_PATHS = [
    "name", "description", "amount_usd", "window.unit", "window.count", "timezone",
    "action", "scope", "target", "alert_thresholds", "enabled", "apply_marker",
    "enforcement", "expose_to_clients", "forecast_alert",
]
WEBHOOK_PATHS = [
    "name", "description", "url", "format", "events", "secret", "routing_key",
    "pagerduty_severity", "resolve_on_reset", "enabled", "apply_marker",
]
# fmt: on


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    admin_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "apply",
        help="make policies, webhooks and price overrides what budget files declare",
        description="Exit status: 0 applied (or nothing to do), 2 --dry-run found a "
        "difference, 1 error.",
    )
    p.add_argument("-f", "--file", required=True, help="a budgets YAML/JSON file, or a folder")
    p.add_argument("--dry-run", action="store_true", help="print the difference, change nothing")
    p.add_argument(
        "--prune", action="store_true", help="delete what apply created and the files omit"
    )
    p.add_argument(
        "--prune-all",
        action="store_true",
        help="delete everything the files omit, also what was made by hand",
    )
    admin_flags(p)
    e = sub.add_parser("export", help="write policies, webhooks and price overrides as YAML")
    e.add_argument("-o", "--output", help="file to write (default: standard output)")
    admin_flags(e)


def current_state(client: AdminClient) -> dict[str, list[Server]]:
    overrides = client.call("ListPriceOverrides", pp.ListPriceOverridesRequest()).overrides
    return {
        "policies": list(all_policies(client)),
        "webhooks": list(all_webhooks(client)),
        "price_overrides": list(overrides),
    }


def run_apply(args: argparse.Namespace, client: AdminClient) -> int:
    declared = apply_files.load(Path(args.file))
    apply_plan.check(declared)
    changes = apply_plan.plan(
        declared, current_state(client), prune=args.prune, prune_all=args.prune_all
    )
    if args.dry_run:
        for c in changes:
            echo(visible(c.describe(dry_run=True)))
        echo(_summary(changes, dry_run=True))
        return EXIT_DIFF if any(c.is_change for c in changes) else 0
    failed: list[str] = []
    done: list[Change] = []
    for c in changes:
        if not c.is_change:
            echo(visible(c.describe(dry_run=False)))
            done.append(c)
            continue
        try:
            _execute(client, c)
        except CliError as e:
            if e.retryable or e.code in _STOP:
                raise  # the next change would fail the same way
            where = c.entry.where if c.entry else f"{apply_plan.KIND_NAMES[c.kind]} {c.name}"
            failed.append(f"{where}: {_failure(c, e)}")
            continue
        echo(visible(c.describe(dry_run=False)))
        done.append(c)
    echo(_summary(done, dry_run=False))
    for line in failed:
        print(f"spendgate: {visible(line)}", file=sys.stderr)
    return 1 if failed else 0


_STOP = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def _failure(c: Change, e: CliError) -> str:
    what = f"{apply_plan.KIND_NAMES[c.kind]} {c.name!r}"
    if e.code == grpc.StatusCode.ABORTED:
        return (
            f"{what} was changed by someone else after apply read it; nothing was "
            "overwritten: run apply again to see the difference now"
        )
    if e.code == grpc.StatusCode.NOT_FOUND and c.action != "create":
        return f"{what} was deleted by someone else after apply read it: run apply again"
    return f"cannot {c.action} {what}: {e}"


def _summary(changes: list[Change], *, dry_run: bool) -> str:
    count = {a: sum(c.action == a for c in changes) for a in ("create", "update", "delete")}
    unchanged = sum(c.action == "unchanged" for c in changes)
    kept = sum(c.action == "keep" for c in changes)
    if dry_run:
        text = (
            f"plan: {count['create']} to create, {count['update']} to update, "
            f"{unchanged} unchanged, {count['delete']} to delete"
        )
    else:
        text = (
            f"applied: {count['create']} created, {count['update']} updated, "
            f"{unchanged} unchanged, {count['delete']} deleted"
        )
    return text + (f", {kept} not declared (kept)" if kept else "")


def _execute(client: AdminClient, c: Change) -> None:
    if c.action == "delete":
        assert c.current is not None
        if isinstance(c.current, pb.BudgetPolicy):
            req: Any = pb.DeleteBudgetPolicyRequest(id=c.current.id, etag=c.current.etag)
            client.call("DeleteBudgetPolicy", req)
        elif isinstance(c.current, wpb.Webhook):
            client.call(
                "DeleteWebhook", wpb.DeleteWebhookRequest(id=c.current.id, etag=c.current.etag)
            )
        else:
            client.call(
                "DeletePriceOverride",
                pp.DeletePriceOverrideRequest(id=c.current.id, etag=c.current.etag),
            )
        return
    assert c.entry is not None and c.wanted is not None
    if c.kind == "policies":
        policy = _policy_message(c.entry, c.wanted)
        if c.current is None:
            client.call("CreateBudgetPolicy", pb.CreateBudgetPolicyRequest(policy=policy))
            return
        assert isinstance(c.current, pb.BudgetPolicy)
        policy.id, policy.etag = c.current.id, c.current.etag
        paths = POLICY_PATHS + (["window.week_start"] if "week_start" in c.wanted else [])
        req = pb.UpdateBudgetPolicyRequest(policy=policy, update_mask=FieldMask(paths=paths))
        client.call("UpdateBudgetPolicy", req)
    elif c.kind == "webhooks":
        webhook = _webhook_message(c.entry, c.wanted)
        if c.current is None:
            client.call("CreateWebhook", wpb.CreateWebhookRequest(webhook=webhook))
            return
        assert isinstance(c.current, wpb.Webhook)
        webhook.id, webhook.etag = c.current.id, c.current.etag
        req = wpb.UpdateWebhookRequest(webhook=webhook, update_mask=FieldMask(paths=WEBHOOK_PATHS))
        client.call("UpdateWebhook", req)
    else:
        override = _price_message(c.wanted)
        if c.current is not None:
            override.etag = c.current.etag
        client.call("SetPriceOverride", pp.SetPriceOverrideRequest(override=override))


def _policy_message(entry: apply_files.Entry, wanted: dict[str, Any]) -> pb.BudgetPolicy:
    f = entry.fields
    window = parse_window(str(f.get("window", "1d")))
    if "week_start" in wanted:
        window.week_start = pb.Weekday.Value(f"WEEKDAY_{wanted['week_start'].upper()}")  # type: ignore[assignment]
    policy = pb.BudgetPolicy(
        name=wanted["name"],
        description=wanted["description"],
        amount_usd=wanted["amount"],
        window=window,
        timezone=wanted["timezone"],
        action=f"ACTION_{wanted['action'].upper()}",
        scope=f"SCOPE_{wanted['scope'].upper()}",
        target=str(f.get("target", "")),
        alert_thresholds=wanted["thresholds"],
        enabled=wanted["enabled"],
        apply_marker=wanted["marker"],
        enforcement=(
            pb.ENFORCEMENT_SHADOW if wanted["enforcement"] == "shadow" else pb.ENFORCEMENT_ENFORCED
        ),
        expose_to_clients=wanted["expose_to_clients"],
    )
    rule = parse_forecast_alert(str(f.get("forecast_alert", "off")))
    if rule is not None:
        policy.forecast_alert.CopyFrom(rule)
    return policy


def _webhook_message(entry: apply_files.Entry, wanted: dict[str, Any]) -> wpb.Webhook:
    w = wpb.Webhook(
        name=wanted["name"],
        description=wanted["description"],
        format=FORMATS[wanted["format"]],
        url=entry.secrets.get("url", ""),
        events=wanted["events"],
        secret=entry.secrets.get("secret", ""),
        routing_key=entry.secrets.get("routing_key", ""),
        enabled=wanted["enabled"],
        apply_marker=wanted["marker"],
    )
    if wanted["format"] == "pagerduty":
        w.pagerduty_severity = SEVERITIES[wanted["severity"]]
        w.resolve_on_reset = wanted["resolve_on_reset"]
    return w


def _price_message(wanted: dict[str, Any]) -> pp.PriceOverride:
    return pp.PriceOverride(
        model=wanted["model"],
        provider=wanted["provider"],
        route=wanted["route"],
        price=pp.Price(**{n: wanted[n] for n in PRICE_FIELDS}),
        note=wanted["note"],
        apply_marker=wanted["marker"],
    )


# ---- export -----------------------------------------------------------------


def env_name(webhook_name: str, what: str) -> str:
    """SPENDGATE_WEBHOOK_<NAME>_<WHAT>: the variable export points a secret to."""
    slug = re.sub(r"[^A-Z0-9]+", "_", webhook_name.upper()).strip("_")[:80] or "UNNAMED"
    return f"SPENDGATE_WEBHOOK_{slug}_{what}"


def exported_policy(p: pb.BudgetPolicy) -> dict[str, Any]:
    had = apply_plan.server_policy(p)
    out: dict[str, Any] = {"name": p.name}
    if p.description:
        out["description"] = p.description
    out |= {"amount": had["amount"], "window": _window_short(p.window)}
    if p.window.unit == pb.WINDOW_UNIT_WEEKS:
        out["week_start"] = had["week_start"]
    if p.timezone != "UTC":
        out["timezone"] = p.timezone
    out |= {"action": had["action"], "scope": had["scope"]}
    if p.target:
        out["target"] = p.target
    if p.alert_thresholds:
        out["thresholds"] = had["thresholds"]
    if not p.enabled:
        out["enabled"] = False
    if had["enforcement"] != "enforced":
        out["enforcement"] = had["enforcement"]
    if p.expose_to_clients:
        out["expose_to_clients"] = True
    if had["forecast_alert"] != "-":
        out["forecast_alert"] = had["forecast_alert"]
    return out


_SHORT_UNITS = {
    pb.WINDOW_UNIT_MINUTES: "m",
    pb.WINDOW_UNIT_HOURS: "h",
    pb.WINDOW_UNIT_DAYS: "d",
    pb.WINDOW_UNIT_WEEKS: "w",
    pb.WINDOW_UNIT_MONTHS: "mo",
}


def _window_short(w: pb.BudgetWindow) -> str:
    return f"{w.count}{_SHORT_UNITS[w.unit]}"


def exported_webhook(w: wpb.Webhook) -> tuple[dict[str, Any], list[str]]:
    """The webhook as a file declares it, and the comment lines naming the
    environment variables its secret references need."""
    had = apply_plan.server_webhook(w)
    out: dict[str, Any] = {"name": w.name}
    if w.description:
        out["description"] = w.description
    out["format"] = had["format"]
    needs: list[str] = []
    if MASK in w.url:  # the URL carries a credential the API does not return
        out["url"] = "${env:" + env_name(w.name, "URL") + "}"
        needs.append(f"{env_name(w.name, 'URL')}: the full URL (with its token)")
    elif w.url:
        out["url"] = w.url
    if w.has_secret:
        out["secret"] = "${env:" + env_name(w.name, "SECRET") + "}"
        needs.append(f"{env_name(w.name, 'SECRET')}: the whsec_ signing secret")
    if w.has_routing_key:
        out["routing_key"] = "${env:" + env_name(w.name, "ROUTING_KEY") + "}"
        needs.append(f"{env_name(w.name, 'ROUTING_KEY')}: the PagerDuty routing key")
    out["events"] = list(w.events)
    if had["format"] == "pagerduty":
        out |= {"severity": had["severity"], "resolve_on_reset": w.resolve_on_reset}
    if not w.enabled:
        out["enabled"] = False
    return out, needs


def exported_price(o: pp.PriceOverride) -> dict[str, Any]:
    out: dict[str, Any] = {"model": o.model}
    if o.provider:
        out["provider"] = o.provider
    if o.route:
        out["route"] = o.route
    out |= {n: getattr(o.price, n) for n in PRICE_FIELDS if getattr(o.price, n)}
    if o.note:
        out["note"] = o.note
    return out


def _dump(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=100)


def export_text(state: dict[str, list[Server]], source: str, now: datetime) -> str:
    """The state as a budgets file (apply re-creates it from this text)."""
    lines = [
        f"# spendgate export of {source} at {now.strftime('%Y-%m-%dT%H:%M:%SZ')}",
        "# Apply with: spendgate apply -f <this file>",
        "# Schema: schemas/budgets.schema.json (docs/policies-as-code.md)",
        "# Secrets are never exported: each ${env:NAME} below must be set when applying.",
        "version: 1",
    ]
    policies = sorted(state["policies"], key=lambda m: m.name)  # type: ignore[union-attr]
    lines.append("policies:" + ("" if policies else " []"))
    for p in policies:
        assert isinstance(p, pb.BudgetPolicy)
        lines.append(_dump([exported_policy(p)]).rstrip("\n"))
    hooks = sorted(state["webhooks"], key=lambda m: m.name)  # type: ignore[union-attr]
    lines.append("webhooks:" + ("" if hooks else " []"))
    for w in hooks:
        assert isinstance(w, wpb.Webhook)
        data, needs = exported_webhook(w)
        lines += [f"# {w.name}: set {need}" for need in needs]
        lines.append(_dump([data]).rstrip("\n"))
    prices = sorted(
        state["price_overrides"],
        key=lambda m: apply_plan.server_identity("price_overrides", m),
    )
    lines.append("price_overrides:" + ("" if prices else " []"))
    for o in prices:
        assert isinstance(o, pp.PriceOverride)
        lines.append(_dump([exported_price(o)]).rstrip("\n"))
    return "\n".join(lines) + "\n"


def run_export(args: argparse.Namespace, client: AdminClient) -> None:
    text = export_text(current_state(client), client.server, datetime.now(UTC))
    if not args.output:
        sys.stdout.write(text)
        return
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as e:
        raise CliError(f"{args.output}: cannot write: {e}") from None
    echo(f"exported to {args.output}")
