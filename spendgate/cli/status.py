"""`spendgate status [--watch]`: the view an on-call engineer opens first.

For each policy: its window and the current window's bounds, spend against
the limit as a bar, what remains, its state and when it resets; for wildcard
(``*``) policies the members that spent most. Then the latest budget events.
Policies in trouble come first.

``--watch`` redraws the view every ``--interval`` seconds until Ctrl-C (exit
0). While the control plane cannot be reached the view says so, keeps the
last data it had, and tries again next round. ``--json`` prints the same data
once for scripts. Colour only when stdout is a terminal (and NO_COLOR is unset).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from spendgate.cli.client import AdminClient, CliError
from spendgate.cli.output import echo, percent_of, visible_message
from spendgate.cli.policies import action_text, window_text
from spendgate.domain.forecast import duration_text as duration
from spendgate.domain.policies import Scope
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.visible import visible
from spendgate.wire import SCOPES, from_timestamp

OK, ALERTING, EXCEEDED = "OK", "ALERTING", "EXCEEDED"
_SEVERITY = {EXCEEDED: 0, ALERTING: 1, OK: 2}
BAR_WIDTH = 10
_EVENT_TYPES = {
    "budget_policy.exceeded": "exceeded",
    "budget_policy.threshold_crossed": "threshold",
    "budget_policy.would_reject": "would reject (shadow)",
    "budget_policy.forecast": "forecast",
}
ANOMALY = "usage.anomaly"


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    admin_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "status", help="every budget at a glance: spend, state, resets, recent events"
    )
    p.add_argument("--watch", action="store_true", help="redraw every --interval until Ctrl-C")
    p.add_argument(
        "--interval", type=float, default=2.0, help="seconds between redraws (default 2)"
    )
    p.add_argument(
        "--top", type=int, default=5, help="members shown per wildcard policy (default 5)"
    )
    p.add_argument("--events", type=int, default=10, help="recent events shown (default 10)")
    admin_flags(p)


# ---- the data ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spend:
    """One window's spend: a policy's, or one member's of a wildcard policy."""

    member: str
    spent_usd: str
    limit_usd: str
    remaining_usd: str
    percent: int  # spent / limit, rounded down (99.99 % is 99, not yet exceeded)
    state: str
    window_start: datetime
    window_end: datetime
    request_count: int
    # Not in spent_usd: what requests still running hold (on every data
    # plane), and how many they are.
    held_usd: str = "0.00"
    held_requests: int = 0
    # Spend adjustments made in this window: their net (signed USD, already
    # in spent_usd; "" when none) and how many.
    adjusted_usd: str = ""
    adjustment_count: int = 0
    # The exhaustion forecast at the recent spend rate (None: no forecast)
    # and that rate, US dollars per hour.
    exhausted_at: datetime | None = None
    rate_usd_per_hour: str = ""


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    policy: pb.BudgetPolicy
    wildcard: bool
    spend: list[Spend]  # highest spend first; empty for a wildcard nobody has spent on
    window: tuple[datetime, datetime] | None  # the current window (None: not known)
    # A wildcard policy's members counted by the control plane (members,
    # exceeded, alerting) when ``spend`` holds only the top ones; None: ``spend``
    # is every member (a control plane without ListSpendRequest.top_members).
    counts: tuple[int, int, int] | None = None

    @property
    def state(self) -> str:
        # The top spenders include the worst state: one limit, one scale.
        return min((s.state for s in self.spend), key=_SEVERITY.__getitem__, default=OK)

    @property
    def members(self) -> int:
        return self.counts[0] if self.counts is not None else len(self.spend)

    def count(self, state: str) -> int:
        """Members in ``state`` (EXCEEDED or ALERTING)."""
        if self.counts is not None:
            return self.counts[1] if state == EXCEEDED else self.counts[2]
        return sum(1 for s in self.spend if s.state == state)


@dataclass(frozen=True, slots=True)
class Snapshot:
    server: str
    at: datetime
    policies: list[PolicyStatus]
    events: list[wpb.BudgetEvent]
    # Shown at the top when there are any: usage records quarantined (their
    # cost is in no window) and the latest usage anomalies.
    quarantined: list[pb.QuarantinedUsage] = field(default_factory=list)
    quarantined_total: int = 0
    anomalies: list[wpb.BudgetEvent] = field(default_factory=list)


# The most members a wildcard policy shows (ListSpendRequest.top_members' limit).
MAX_TOP = 1000
# How many quarantined records and anomalies the top of the view lists.
ATTENTION_ROWS = 5


def state_of(percent_floor: int, exceeded: bool, thresholds: Sequence[int]) -> str:
    """EXCEEDED at or over the limit; ALERTING once an alert threshold below
    100 % is reached; OK otherwise."""
    if exceeded:
        return EXCEEDED
    if any(t < 100 and percent_floor >= t for t in thresholds):
        return ALERTING
    return OK


def _spend(e: pb.SpendEntry, thresholds: Sequence[int]) -> Spend:
    percent = percent_of(e.spent_usd, e.limit_usd)
    return Spend(
        member=e.member,
        spent_usd=e.spent_usd,
        limit_usd=e.limit_usd,
        remaining_usd=e.remaining_usd,
        percent=percent,
        state=state_of(percent, e.exceeded, thresholds),
        window_start=from_timestamp(e.window_start),
        window_end=from_timestamp(e.window_end),
        request_count=e.request_count,
        held_usd=e.held_usd or "0.00",
        held_requests=e.held_requests,
        adjusted_usd=e.adjusted_usd if e.adjustment_count else "",
        adjustment_count=e.adjustment_count,
        exhausted_at=(
            from_timestamp(e.forecast_exhaust_time) if e.HasField("forecast_exhaust_time") else None
        ),
        rate_usd_per_hour=e.forecast_rate_usd_per_hour,
    )


def _pages(fetch: Callable[[str], Any], field: str) -> Iterator[Any]:
    token = ""
    while True:
        resp = fetch(token)
        yield from getattr(resp, field)
        token = resp.next_page_token
        if not token:
            return


def _is_wildcard(p: pb.BudgetPolicy) -> bool:
    if SCOPES.get(p.scope) is Scope.TAG:
        return p.target.partition("=")[2] == "*"
    return p.target == "*"


def _top_spend(
    client: AdminClient, top: int
) -> tuple[dict[str, list[pb.SpendEntry]], dict[str, tuple[int, int, int]]]:
    """Every policy's current spend, a wildcard policy's ``top`` biggest
    spenders only (and its member counts): pages of whole policies, whatever
    the number of members."""
    entries: dict[str, list[pb.SpendEntry]] = {}
    counts: dict[str, tuple[int, int, int]] = {}
    token = ""
    while True:
        resp = client.call(
            "ListSpend", pb.ListSpendRequest(page_size=1000, page_token=token, top_members=top)
        )
        for e in resp.entries:
            entries.setdefault(e.policy_id, []).append(e)
        counts.update(
            {c.policy_id: (c.members, c.exceeded, c.alerting) for c in resp.member_counts}
        )
        token = resp.next_page_token
        if not token:
            return entries, counts


def fetch(client: AdminClient, *, events: int, now: datetime, top: int = 5) -> Snapshot:
    policies = list(
        _pages(
            lambda t: client.call(
                "ListBudgetPolicies", pb.ListBudgetPoliciesRequest(page_size=1000, page_token=t)
            ),
            "policies",
        )
    )
    # At least one member each: the top spender carries the policy's state.
    entries, counts = _top_spend(client, min(max(top, 1), MAX_TOP))
    recent: list[wpb.BudgetEvent] = []
    if events > 0:
        resp = client.call("ListEvents", wpb.ListEventsRequest(page_size=events))
        recent = list(resp.events)
    result = []
    for p in policies:
        spend = sorted(
            (_spend(e, p.alert_thresholds) for e in entries.get(p.id, [])),
            key=lambda s: (-Decimal(s.spent_usd), s.member),
        )
        window = (spend[0].window_start, spend[0].window_end) if spend else None
        result.append(PolicyStatus(p, _is_wildcard(p), spend, window, counts.get(p.id)))
    result.sort(key=lambda s: (not s.policy.enabled, _SEVERITY[s.state], s.policy.name))
    quarantined = client.call(
        "ListQuarantinedUsage", pb.ListQuarantinedUsageRequest(page_size=ATTENTION_ROWS)
    )
    anomalies = client.call(
        "ListEvents", wpb.ListEventsRequest(type=ANOMALY, page_size=ATTENTION_ROWS)
    )
    return Snapshot(
        client.server,
        now,
        result,
        recent,
        list(quarantined.records),
        quarantined.total_size,
        list(anomalies.events),
    )


# ---- text -------------------------------------------------------------------------


class Style:
    """ANSI colour when enabled; plain text otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def state(self, state: str, text: str | None = None) -> str:
        code = {EXCEEDED: "1;31", ALERTING: "1;33", OK: "32"}[state]
        return self._wrap(code, state if text is None else text)

    def error(self, text: str) -> str:
        return self._wrap("1;31", text)


def bar(percent: int, width: int = BAR_WIDTH) -> str:
    filled = min(width, max(0, percent) * width // 100)
    return "[" + "█" * filled + "░" * (width - filled) + "]"


def _per_hour(text: str) -> str:
    """ "0.324000" -> "0.324", "12.000000" -> "12.00": cents at least, no trailing zeros."""
    try:
        d = Decimal(text)
    except ArithmeticError:
        return text
    cents = d.quantize(Decimal("0.01"))
    return f"{cents if cents == d else d.normalize():f}"


def pace_text(s: Spend, now: datetime) -> str:
    """ "at this pace ($1.20/h): exhausted in 3h12m (window resets in 9h00m)", or
    "" when there is no forecast."""
    if s.exhausted_at is None:
        return ""
    resets = duration((s.window_end - now).total_seconds())
    pace = f"at this pace (${_per_hour(s.rate_usd_per_hour)}/h)"
    if s.exhausted_at >= s.window_end:
        return f"{pace}: not exhausted before the window resets (in {resets})"
    left = duration((s.exhausted_at - now).total_seconds())
    return f"{pace}: exhausted in {left} (window resets in {resets})"


def _scope_text(p: pb.BudgetPolicy) -> str:
    scope = pb.Scope.Name(p.scope).removeprefix("SCOPE_").lower()
    if not p.target:
        return scope
    return f"{scope} {p.target}" if SCOPES.get(p.scope) is Scope.TAG else f"{scope}={p.target}"


def _local(t: datetime, zone: str) -> str:
    try:
        return t.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M")
    except (KeyError, ValueError):
        return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _spend_line(s: Spend, style: Style, rejects: bool = False) -> str:
    line = (
        f"{style.state(s.state, s.state.ljust(8))}  {bar(s.percent)} {s.percent:>3}%  "
        f"spent ${s.spent_usd} of ${s.limit_usd}, remaining ${s.remaining_usd}" + _adjusted_text(s)
    )
    held = Decimal(s.held_usd)
    if held > 0 or s.held_requests:
        n = s.held_requests
        line += f"; ${s.held_usd} more held by {n} request{'s' if n != 1 else ''} in flight"
        if rejects and s.state != EXCEEDED and Decimal(s.spent_usd) + held >= Decimal(s.limit_usd):
            # Admission counts holds: new requests wait for those to end.
            line += style.state(EXCEEDED, " (new requests rejected while they run)")
    return line


def _adjusted_text(s: Spend) -> str:
    """ ", adjusted -$12.50 (1 adjustment)" when the window's spend was corrected."""
    if not s.adjustment_count:
        return ""
    a = s.adjusted_usd
    net = f"-${a[1:]}" if a.startswith("-") else f"+${a}"
    n = s.adjustment_count
    return f", adjusted {net} ({n} adjustment{'s' if n != 1 else ''})"


def _policy_block(ps: PolicyStatus, now: datetime, top: int, style: Style) -> list[str]:
    p = ps.policy
    zone = p.timezone or "UTC"
    action = action_text(p)
    title = f"{style.bold(p.name)}  {style.dim(p.id)}"
    if not p.enabled:
        title += "  (disabled)"
    lines = [
        title,
        f"  scope {_scope_text(p)} · action {action} · window {window_text(p.window)}, {zone}",
    ]
    if ps.window is not None:
        start, end = ps.window
        lines.append(
            f"  current window {_local(start, zone)} → {_local(end, zone)}, "
            f"resets in {duration((end - now).total_seconds())}"
        )
    if (line := shadow_text(p)) is not None:
        lines.append(f"  {line}")
    rejects = p.action == pb.ACTION_REJECT and p.enforcement != pb.ENFORCEMENT_SHADOW
    if not ps.wildcard:
        for s in ps.spend:
            lines.append(f"  {_spend_line(s, style, rejects)}")
            if pace := pace_text(s, now):
                lines.append(f"  {pace}")
        return lines
    if not ps.spend:
        lines.append("  no member has spent in the current window")
        return lines
    counts = [f"{n} {state}" for state in (EXCEEDED, ALERTING) if (n := ps.count(state))]
    shown = ps.spend[: max(top, 0)]
    members = f"{ps.members} member{'s' if ps.members != 1 else ''}"
    head = ", ".join([members, *counts])
    lines.append(f"  {head}" + (f"; top {len(shown)} by spend:" if shown else ""))
    width = max((len(s.member) for s in shown), default=0)
    for s in shown:
        pace = pace_text(s, now)
        lines.append(
            f"    {s.member.ljust(width)}  {_spend_line(s, style, rejects)}"
            + (f"; {pace}" if pace else "")
        )
    return lines


def shadow_text(p: pb.BudgetPolicy) -> str | None:
    """What a policy that has been SHADOW would have refused, or None."""
    if not p.HasField("shadow_since"):
        return None
    n = p.would_reject_count
    since = _local(from_timestamp(p.shadow_since), p.timezone or "UTC")
    text = f"would have rejected {n:,} request{'s' if n != 1 else ''} since {since}"
    if p.enforcement == pb.ENFORCEMENT_SHADOW:
        return f"shadow: {text} (admitted; promote with: spendgate policy update {p.id} --enforce)"
    return f"enforced now; while in shadow it {text}" if n else None


def _anomaly_text(e: wpb.BudgetEvent) -> str:
    a = e.anomaly
    return (
        f"model {_clip(a.model)} reported ${a.reported_cost_usd} "
        f"({a.output_tokens} output tokens), charged ${a.charged_usd}; "
        f"{a.reason.replace('_', ' ')}, request {_clip(a.request_id)}"
    )


def _clip(text: str, n: int = 40) -> str:
    """Printable and short: control characters escaped, long values cut."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: n + 1])
    return safe if len(text) <= n else safe[:n] + "…"


def _attention(snap: Snapshot, style: Style) -> list[str]:
    """What needs a human before anything else: usage that counts nowhere,
    and responses no real provider answer should cost."""
    lines: list[str] = []
    if snap.quarantined_total:
        lines.append(
            style.error(
                f"! {snap.quarantined_total} usage record"
                f"{'s' if snap.quarantined_total != 1 else ''} quarantined"
            )
            + " (their cost is in no window; `spendgate status --json` lists them)"
        )
        for q in snap.quarantined:
            when = from_timestamp(q.quarantine_time).strftime("%Y-%m-%d %H:%M:%S")
            member = f" member {_clip(q.member)} ({q.member_bytes} bytes)" if q.member_bytes else ""
            lines.append(
                f"  {when}  {q.reason:<16} ${q.cost_usd} policy {q.policy_id}{member}"
                f"  {style.dim(_clip(q.detail, 80))}"
            )
    if snap.anomalies:
        lines.append(style.error(f"! usage anomalies (latest {len(snap.anomalies)})"))
        for e in snap.anomalies:
            when = from_timestamp(e.create_time).strftime("%Y-%m-%d %H:%M:%S")
            lines.append(f"  {when}  {_anomaly_text(e)}")
    return lines


def _event_line(e: wpb.BudgetEvent, style: Style) -> str:
    when = from_timestamp(e.create_time).strftime("%Y-%m-%d %H:%M:%S")
    if e.type == ANOMALY:
        return f"  {when}  {style.state(EXCEEDED, 'usage anomaly')}{' ' * 11}{_anomaly_text(e)}"
    if e.type == "budget_policy.threshold_crossed":
        what = style.state(ALERTING, f"threshold {e.threshold_percent}% crossed")
        pad = 24 - len(f"threshold {e.threshold_percent}% crossed")
    elif e.type == "budget_policy.forecast":
        what = style.state(ALERTING, "forecast")
        pad = 24 - len("forecast")
    else:
        what = style.state(EXCEEDED, _EVENT_TYPES.get(e.type, e.type))
        pad = 24 - len(_EVENT_TYPES.get(e.type, e.type))
    member = f" member {e.member}" if e.member else ""
    return (
        f"  {when}  {what}{' ' * max(pad, 1)}{e.policy_name} {style.dim(e.policy_id)}{member}"
        f"  (spent ${e.spent_usd} of ${e.amount_usd})"
    )


def visible_snapshot(snap: Snapshot) -> Snapshot:
    """``snap`` with every string value escaped for a terminal."""
    return dataclasses.replace(
        snap,
        policies=[
            dataclasses.replace(
                ps,
                policy=visible_message(ps.policy),
                spend=[dataclasses.replace(s, member=visible(s.member)) for s in ps.spend],
            )
            for ps in snap.policies
        ],
        events=[visible_message(e) for e in snap.events],
        quarantined=[visible_message(q) for q in snap.quarantined],
        anomalies=[visible_message(a) for a in snap.anomalies],
    )


def render(
    snap: Snapshot | None,
    *,
    server: str,
    now: datetime,
    top: int,
    style: Style,
    error: str = "",
) -> str:
    """The whole view as text; ``snap`` None when nothing was ever fetched.
    Every value from the server is escaped (control characters shown as
    ``\x1b``); the only escape sequences in the text are ``style``'s."""
    server, error = visible(server), visible(error)
    if snap is not None:
        snap = visible_snapshot(snap)
    lines = [
        style.bold("spendgate status")
        + f"  ·  control plane {server}  ·  {now.strftime('%Y-%m-%d %H:%M:%S')} UTC"
    ]
    if error:
        lines.append(style.error(f"! {error}"))
        if snap is not None:
            lines.append(f"  showing data from {snap.at.strftime('%H:%M:%S')} UTC; retrying")
        else:
            lines.append("  retrying")
    if snap is None:
        return "\n".join(lines)
    lines += _attention(snap, style)
    states = [ps.state for ps in snap.policies if ps.policy.enabled]
    summary = ", ".join(f"{n} {s}" for s in (EXCEEDED, ALERTING, OK) if (n := states.count(s)))
    count = f"{len(snap.policies)} polic{'ies' if len(snap.policies) != 1 else 'y'}"
    lines.append(count + (f": {summary}" if summary else ""))
    for ps in snap.policies:
        lines.append("")
        lines += _policy_block(ps, now, top, style)
    lines += ["", style.bold("Recent events") + " (UTC, newest first)"]
    if snap.events:
        lines += [_event_line(e, style) for e in snap.events]
    else:
        lines.append("  (none)")
    return "\n".join(lines)


# ---- JSON -------------------------------------------------------------------------


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def as_json(snap: Snapshot, top: int) -> dict[str, Any]:
    def spend(s: Spend) -> dict[str, Any]:
        return {
            "member": s.member,
            "spent_usd": s.spent_usd,
            "limit_usd": s.limit_usd,
            "remaining_usd": s.remaining_usd,
            "percent": s.percent,
            "state": s.state,
            "window_start": _iso(s.window_start),
            "window_end": _iso(s.window_end),
            "resets_in_s": max(0, int((s.window_end - snap.at).total_seconds())),
            "request_count": s.request_count,
            "held_usd": s.held_usd,
            "held_requests": s.held_requests,
            "adjusted_usd": s.adjusted_usd or None,
            "adjustment_count": s.adjustment_count,
            "forecast_exhausted_at": _iso(s.exhausted_at) if s.exhausted_at else None,
            "forecast_rate_usd_per_hour": s.rate_usd_per_hour or None,
        }

    policies = []
    for ps in snap.policies:
        p = ps.policy
        shown = ps.spend[: max(top, 0)] if ps.wildcard else ps.spend
        policies.append(
            {
                "id": p.id,
                "name": p.name,
                "enabled": p.enabled,
                "scope": pb.Scope.Name(p.scope).removeprefix("SCOPE_").lower(),
                "target": p.target,
                "action": pb.Action.Name(p.action).removeprefix("ACTION_").lower(),
                "enforcement": "shadow" if p.enforcement == pb.ENFORCEMENT_SHADOW else "enforced",
                "shadow_since": _iso(from_timestamp(p.shadow_since))
                if p.HasField("shadow_since")
                else None,
                "would_reject_count": p.would_reject_count,
                "window": f"{window_text(p.window)}, {p.timezone or 'UTC'}",
                "timezone": p.timezone or "UTC",
                "alert_thresholds": list(p.alert_thresholds),
                "state": ps.state,
                "wildcard": ps.wildcard,
                "window_start": _iso(ps.window[0]) if ps.window else None,
                "window_end": _iso(ps.window[1]) if ps.window else None,
                "member_count": ps.members if ps.wildcard else None,
                "spend": [spend(s) for s in shown],
            }
        )
    return {
        "server": snap.server,
        "time": _iso(snap.at),
        "policies": policies,
        "events": [
            {
                "id": e.id,
                "type": e.type,
                "time": _iso(from_timestamp(e.create_time)),
                "policy_id": e.policy_id,
                "policy_name": e.policy_name,
                "member": e.member,
                "threshold_percent": e.threshold_percent or None,
                "spent_usd": e.spent_usd,
                "amount_usd": e.amount_usd,
            }
            for e in snap.events
        ],
        "quarantined_total": snap.quarantined_total,
        "quarantined": [
            {
                "id": q.id,
                "reason": q.reason,
                "detail": q.detail,
                "time": _iso(from_timestamp(q.quarantine_time)),
                "data_plane_id": q.data_plane_id,
                "batch_id": q.batch_id,
                "policy_id": q.policy_id,
                "member": q.member,
                "member_bytes": q.member_bytes,
                "member_sha256": q.member_sha256,
                "cost_usd": q.cost_usd,
                "request_count": q.request_count,
            }
            for q in snap.quarantined
        ],
        "anomalies": [
            {
                "id": e.id,
                "time": _iso(from_timestamp(e.create_time)),
                "reason": e.anomaly.reason,
                "model": e.anomaly.model,
                "request_id": e.anomaly.request_id,
                "data_plane_id": e.anomaly.data_plane_id,
                "charged_usd": e.anomaly.charged_usd,
                "reported_cost_usd": e.anomaly.reported_cost_usd,
                "input_tokens": e.anomaly.input_tokens,
                "output_tokens": e.anomaly.output_tokens,
            }
            for e in snap.anomalies
        ],
    }


# ---- the command ------------------------------------------------------------------


def _colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def run_status(args: argparse.Namespace, client: AdminClient) -> None:
    if args.interval <= 0:
        raise CliError("--interval must be greater than 0")
    if args.top < 0 or args.events < 0:
        raise CliError("--top and --events must not be negative")
    if args.watch:
        if args.json:
            raise CliError("--json prints once; use it without --watch")
        watch(args, client)
        return
    now = datetime.now(UTC)
    snap = fetch(client, events=args.events, now=now, top=args.top)
    if args.json:
        echo(json.dumps(as_json(snap, args.top), indent=2))
    else:
        text = render(snap, server=client.server, now=now, top=args.top, style=Style(_colour()))
        echo(text, raw=True)


def watch(args: argparse.Namespace, client: AdminClient) -> None:
    """Redraw until Ctrl-C. On a terminal each frame replaces the last (cursor
    home, clear to end of line and screen); into a pipe, frames follow each
    other separated by a blank line."""
    tty = sys.stdout.isatty()
    style = Style(_colour())
    snap: Snapshot | None = None
    out = sys.stdout
    if tty:
        out.write("\x1b[2J")
    try:
        while True:
            started = time.monotonic()
            now = datetime.now(UTC)
            error = ""
            try:
                snap = fetch(client, events=args.events, now=now, top=args.top)
            except CliError as e:
                if not e.retryable:
                    raise  # a bad token or request does not fix itself
                error = str(e)
                client.reconnect()  # a fresh channel: no reconnect backoff carried over
            text = render(
                snap, server=client.server, now=now, top=args.top, style=style, error=error
            )
            if tty:
                body = "\n".join(line + "\x1b[K" for line in text.split("\n"))
                out.write("\x1b[H" + body + "\n\x1b[J")
            else:
                out.write(text + "\n\n")
            out.flush()
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
