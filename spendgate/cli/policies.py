"""`spendgate policy ...` and `spendgate spend`: the admin API from a terminal."""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime

from google.protobuf.field_mask_pb2 import FieldMask

from spendgate.cli.client import AdminClient, CliError
from spendgate.cli.lookup import by_id_or_name
from spendgate.cli.output import as_json, echo, percent_text, table
from spendgate.domain.forecast import duration_text
from spendgate.domain.limits import MAX_THRESHOLD_PERCENT, MAX_WINDOW_COUNT
from spendgate.v1 import budget_pb2 as pb
from spendgate.visible import visible

_UNITS = {
    "m": pb.WINDOW_UNIT_MINUTES,
    "min": pb.WINDOW_UNIT_MINUTES,
    "minute": pb.WINDOW_UNIT_MINUTES,
    "minutes": pb.WINDOW_UNIT_MINUTES,
    "h": pb.WINDOW_UNIT_HOURS,
    "hour": pb.WINDOW_UNIT_HOURS,
    "hours": pb.WINDOW_UNIT_HOURS,
    "d": pb.WINDOW_UNIT_DAYS,
    "day": pb.WINDOW_UNIT_DAYS,
    "days": pb.WINDOW_UNIT_DAYS,
    "w": pb.WINDOW_UNIT_WEEKS,
    "week": pb.WINDOW_UNIT_WEEKS,
    "weeks": pb.WINDOW_UNIT_WEEKS,
    "mo": pb.WINDOW_UNIT_MONTHS,
    "month": pb.WINDOW_UNIT_MONTHS,
    "months": pb.WINDOW_UNIT_MONTHS,
}
_UNIT_NAMES = {
    pb.WINDOW_UNIT_MINUTES: "minute",
    pb.WINDOW_UNIT_HOURS: "hour",
    pb.WINDOW_UNIT_DAYS: "day",
    pb.WINDOW_UNIT_WEEKS: "week",
    pb.WINDOW_UNIT_MONTHS: "month",
}
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


POLICY_ID_PREFIX = "bp_"


def parse_window(text: str) -> pb.BudgetWindow:
    """ "1d", "day", "2 weeks", "15m", "1mo" -> BudgetWindow."""
    m = re.fullmatch(r"\s*(\d*)\s*([a-z]+)\s*", text.lower())
    if not m or m.group(2) not in _UNITS:
        raise CliError(
            f"--window '{visible(text, 40)}': use a count and a unit, "
            "e.g. 1d, 12h, 15m, 2w, 1mo, day, month"
        )
    digits = m.group(1).lstrip("0") or ("0" if m.group(1) else "1")
    # A count that cannot even be sent is refused here; the server checks the
    # rest (1..MAX_WINDOW_COUNT), together with every other field.
    if len(digits) > 10 or int(digits) >= 2**31:
        raise CliError(
            f"--window '{visible(text, 40)}': the count must be 1 to {MAX_WINDOW_COUNT}, "
            "e.g. 3mo for a quarter"
        )
    return pb.BudgetWindow(unit=_UNITS[m.group(2)], count=int(digits))


def window_text(w: pb.BudgetWindow) -> str:
    name = _UNIT_NAMES.get(w.unit, "?")
    return f"{w.count} {name}{'s' if w.count != 1 else ''}"


def _thresholds(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CliError(
            f"--thresholds '{visible(text, 40)}': use percentages like 50,80,100"
        ) from None
    if any(not -(2**31) <= t < 2**31 for t in values):  # cannot be sent; the server checks the rest
        raise CliError(f"--thresholds: each must be 1 to {MAX_THRESHOLD_PERCENT} (percent)")
    return values


def add_policy_fields(p: argparse.ArgumentParser, *, create: bool) -> None:
    p.add_argument("--name", required=create)
    p.add_argument("--description")
    p.add_argument("--amount", help="US dollars, e.g. 25 or 0.50", required=create)
    p.add_argument("--window", help="e.g. 1d (default), 12h, 15m, 2w, 1mo")
    p.add_argument("--week-start", choices=_WEEKDAYS, help="first day of WEEKS windows")
    p.add_argument("--timezone", help="IANA zone, default UTC")
    p.add_argument("--action", choices=["alert", "reject"], required=create)
    p.add_argument(
        "--scope",
        choices=[
            "global",
            "workspace",
            "endpoint",
            "user",
            "api_key",
            "model",
            "provider",
            "tag",
            "service",
        ],
        default="global" if create else None,
    )
    p.add_argument("--target", help="member name, '*' for each member, key=value for tags")
    p.add_argument("--thresholds", help="alert percentages, e.g. 50,80,100")
    p.add_argument(
        "--forecast-alert",
        metavar="RULE",
        help="budget_policy.forecast event when, at the recent pace, the budget will be gone "
        "within a time (2h, 90m, 1d12h), before the window ends (window-end), either "
        "(2h,window-end); off: none",
    )
    if create:
        p.add_argument("--disabled", action="store_true", help="create it disabled")
        p.add_argument(
            "--shadow",
            action="store_true",
            help="REJECT only: meter and evaluate it, never block; count what it would refuse",
        )
        p.add_argument(
            "--expose-to-clients",
            action="store_true",
            help="admitted responses carry its x-spendgate-budget-* headers",
        )
    else:
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--shadow", action="store_true", help="stop blocking; count instead")
        mode.add_argument(
            "--enforce", action="store_true", help="promote a SHADOW policy: block from now on"
        )
        expose = p.add_mutually_exclusive_group()
        expose.add_argument("--expose-to-clients", action="store_true")
        expose.add_argument("--hide-from-clients", action="store_true")
        group = p.add_mutually_exclusive_group()
        group.add_argument("--enable", action="store_true")
        group.add_argument("--disable", action="store_true")
        p.add_argument("--etag", help="only update this version")


def policy_from_args(args: argparse.Namespace) -> tuple[pb.BudgetPolicy, list[str]]:
    """The policy fields given on the command line, and their field-mask paths."""
    policy = pb.BudgetPolicy()
    paths: list[str] = []
    simple = {
        "name": "name",
        "description": "description",
        "timezone": "timezone",
        "target": "target",
    }
    for arg, field in simple.items():
        value = getattr(args, arg)
        if value is not None:
            setattr(policy, field, value)
            paths.append(field)
    if args.amount is not None:
        policy.amount_usd = args.amount.lstrip("$")
        paths.append("amount_usd")
    if args.window is not None:
        w = parse_window(args.window)
        policy.window.unit, policy.window.count = w.unit, w.count
        paths += ["window.unit", "window.count"]
    if args.week_start is not None:
        policy.window.week_start = pb.Weekday.Value(f"WEEKDAY_{args.week_start.upper()}")  # type: ignore[assignment]
        paths.append("window.week_start")
    if args.action is not None:
        policy.action = pb.Action.Value(f"ACTION_{args.action.upper()}")  # type: ignore[assignment]
        paths.append("action")
    if args.scope is not None:
        policy.scope = pb.Scope.Value(f"SCOPE_{args.scope.upper()}")  # type: ignore[assignment]
        paths.append("scope")
    if args.thresholds is not None:
        policy.alert_thresholds.extend(_thresholds(args.thresholds))
        paths.append("alert_thresholds")
    if args.shadow or getattr(args, "enforce", False):
        policy.enforcement = pb.ENFORCEMENT_SHADOW if args.shadow else pb.ENFORCEMENT_ENFORCED
        paths.append("enforcement")
    if args.expose_to_clients or getattr(args, "hide_from_clients", False):
        policy.expose_to_clients = bool(args.expose_to_clients)
        paths.append("expose_to_clients")
    if args.forecast_alert is not None:
        rule = parse_forecast_alert(args.forecast_alert)
        if rule is not None:
            policy.forecast_alert.CopyFrom(rule)
        paths.append("forecast_alert")
    return policy, paths


def action_text(p: pb.BudgetPolicy) -> str:
    """ "alert", "reject", or "reject (shadow)"."""
    action = pb.Action.Name(p.action).removeprefix("ACTION_").lower()
    return f"{action} (shadow)" if p.enforcement == pb.ENFORCEMENT_SHADOW else action


_SPAN = re.compile(r"(\d{1,9})(d|h|m|s)")
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_forecast_alert(text: str) -> pb.ForecastAlert | None:
    """ "2h", "window-end", "2h,window-end", "1d12h" -> ForecastAlert; "off" -> None.
    The server checks the bounds."""
    parts = [t.strip().lower() for t in text.split(",") if t.strip()]
    if parts == ["off"]:
        return None
    rule = pb.ForecastAlert()
    for part in parts:
        if part == "window-end" and not rule.before_window_end:
            rule.before_window_end = True
        elif re.fullmatch(f"(?:{_SPAN.pattern})+", part) and not rule.HasField("within"):
            rule.within.seconds = sum(int(n) * _SECONDS[u] for n, u in _SPAN.findall(part))
        else:
            raise CliError(
                f"--forecast-alert '{visible(text, 40)}': use a time (2h, 90m, 1d12h), "
                "window-end, both (2h,window-end), or off"
            )
    if not parts:
        raise CliError("--forecast-alert: give a rule, e.g. 2h or window-end, or off")
    return rule


def forecast_alert_text(p: pb.BudgetPolicy) -> str:
    """A policy's forecast_alert as --forecast-alert takes it ("-" when none)."""
    if not p.HasField("forecast_alert"):
        return "-"
    rule = p.forecast_alert
    parts = [duration_text(rule.within.seconds)] if rule.within.seconds else []
    if rule.before_window_end:
        parts.append("window-end")
    return ",".join(parts) or "-"


def _policy_rows(policies: list[pb.BudgetPolicy]) -> str:
    return table(
        ["id", "name", "action", "scope", "target", "amount", "window", "forecast", "enabled"],
        [
            [
                p.id,
                p.name,
                action_text(p),
                pb.Scope.Name(p.scope).removeprefix("SCOPE_").lower(),
                p.target or "-",
                f"${p.amount_usd}",
                window_text(p.window) + (f" {p.timezone}" if p.timezone != "UTC" else ""),
                forecast_alert_text(p),
                "yes" if p.enabled else "no",
            ]
            for p in policies
        ],
    )


def _show(args: argparse.Namespace, p: pb.BudgetPolicy) -> None:
    if args.json:
        echo(json.dumps(as_json(p), indent=2))
    else:
        echo(_policy_rows([p]))


def run_policy(args: argparse.Namespace, client: AdminClient) -> None:
    cmd = args.policy_command
    if cmd == "create":
        policy, _ = policy_from_args(args)
        if args.window is None:
            policy.window.unit, policy.window.count = pb.WINDOW_UNIT_DAYS, 1
        if args.disabled:
            policy.enabled = False
        _show(args, client.call("CreateBudgetPolicy", pb.CreateBudgetPolicyRequest(policy=policy)))
    elif cmd == "get":
        _show(args, resolve_policy(client, args.id))
    elif cmd == "list":
        policies = all_policies(client)
        echo(json.dumps(as_json(policies), indent=2) if args.json else _policy_rows(policies))
    elif cmd == "update":
        policy, paths = policy_from_args(args)
        if args.enable or args.disable:
            policy.enabled = bool(args.enable)
            paths.append("enabled")
        if not paths:
            raise CliError("nothing to update: give at least one field, e.g. --amount 50")
        policy.id = resolve_policy(client, args.id).id
        policy.etag = args.etag or ""
        req = pb.UpdateBudgetPolicyRequest(policy=policy, update_mask=FieldMask(paths=paths))
        _show(args, client.call("UpdateBudgetPolicy", req))
    elif cmd == "delete":
        policy_id = resolve_policy(client, args.id).id
        client.call("DeleteBudgetPolicy", pb.DeleteBudgetPolicyRequest(id=policy_id))
        if args.json:
            echo(json.dumps({"deleted": policy_id}))
        else:
            echo(f"deleted {policy_id}")


def all_policies(client: AdminClient) -> list[pb.BudgetPolicy]:
    policies: list[pb.BudgetPolicy] = []
    token = ""
    while True:
        resp = client.call(
            "ListBudgetPolicies", pb.ListBudgetPoliciesRequest(page_size=500, page_token=token)
        )
        policies.extend(resp.policies)
        token = resp.next_page_token
        if not token:
            return policies


def resolve_policy(client: AdminClient, ref: str) -> pb.BudgetPolicy:
    """The policy ``ref`` names: its id, else its name."""
    return by_id_or_name(
        ref,
        kind="policy",
        id_prefix=POLICY_ID_PREFIX,
        get=lambda i: client.call("GetBudgetPolicy", pb.GetBudgetPolicyRequest(id=i)),
        listing=lambda: all_policies(client),
        list_command="spendgate policy list",
    )


def _reset_in(end: datetime, now: datetime) -> str:
    seconds = max(0, int((end - now).total_seconds()))
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes = rem // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {rem % 60}s"


def run_spend(args: argparse.Namespace, client: AdminClient) -> None:
    entries: list[pb.SpendEntry] = []
    token = ""
    policy_id = resolve_policy(client, args.policy).id if args.policy else ""
    while True:
        resp = client.call(
            "ListSpend",
            pb.ListSpendRequest(
                policy_id=policy_id,
                member=args.member or "",
                page_size=1000,
                page_token=token,
            ),
        )
        entries.extend(resp.entries)
        token = resp.next_page_token
        if not token:
            break
    if args.json:
        echo(json.dumps(as_json(entries), indent=2))
        return
    now = datetime.now(UTC)
    echo(
        table(
            [
                "policy",
                "name",
                "member",
                "spent",
                "held",
                "limit",
                "used",
                "state",
                "resets in",
                "adjusted",
            ],
            [
                [
                    e.policy_id,
                    e.policy_name,
                    e.member or "-",
                    f"${e.spent_usd}",
                    # what requests still running hold, not part of "spent"
                    f"${e.held_usd or '0.00'}"
                    + (f" ({e.held_requests} running)" if e.held_requests else ""),
                    f"${e.limit_usd}",
                    percent_text(e.spent_usd, e.limit_usd),
                    ("EXCEEDED" if e.exceeded else "ok")
                    + (" (rejecting)" if e.exceeded and e.action == pb.ACTION_REJECT else ""),
                    _reset_in(e.window_end.ToDatetime(UTC), now),
                    _adjusted(e),
                ]
                for e in entries
            ],
        )
    )


def _adjusted(e: pb.SpendEntry) -> str:
    """The net of the window's spend adjustments (in "spent"), or "-"."""
    if not e.adjustment_count:
        return "-"
    amount = e.adjusted_usd
    net = f"-${amount[1:]}" if amount.startswith("-") else f"+${amount}"
    return f"{net} ({e.adjustment_count})"
