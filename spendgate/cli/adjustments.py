"""`spendgate spend adjust` and `spendgate spend adjustments`: correct a
window's spend, and the audit trail of corrections."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable

import grpc

from spendgate.cli.client import AdminClient, CliError
from spendgate.cli.output import as_json, echo, table
from spendgate.cli.policies import POLICY_ID_PREFIX, resolve_policy
from spendgate.v1 import budget_pb2 as pb
from spendgate.wire import from_timestamp

ATTEMPTS = 3  # of CreateSpendAdjustment, when the control plane did not answer


def add_parsers(
    spend: argparse.ArgumentParser, admin_flags: Callable[[argparse.ArgumentParser], None]
) -> None:
    sub = spend.add_subparsers(dest="spend_command", metavar="{adjust,adjustments}")
    adjust = sub.add_parser(
        "adjust",
        help="correct the current window's spend of a policy (and member) by a signed amount",
    )
    adjust.add_argument("policy_id", metavar="POLICY", help="the policy's id or name")
    adjust.add_argument("--member", default="", help="the member of a '*' policy")
    adjust.add_argument(
        "--amount",
        required=True,
        help="signed US dollars: -12.50 lowers the spend, 3.20 raises it",
    )
    adjust.add_argument("--reason", required=True, help="why (kept with the record)")
    admin_flags(adjust)
    listing = sub.add_parser("adjustments", help="spend adjustments made, newest first")
    listing.add_argument(
        "--policy", help="only this policy (id, also of a deleted policy, or name)"
    )
    listing.add_argument("--member", help="only this member")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    admin_flags(listing)


def signed_usd(amount: str) -> str:
    """ "-12.50" -> "-$12.50", "3.20" -> "+$3.20"."""
    return f"-${amount[1:]}" if amount.startswith("-") else f"+${amount}"


def run(args: argparse.Namespace, client: AdminClient) -> None:
    if args.spend_command == "adjust":
        _adjust(args, client)
    else:
        _list(args, client)


def _policy_filter(client: AdminClient, ref: str) -> str:
    """The policy id to list adjustments of: ``ref``'s, or ``ref`` itself
    when it names no policy (the records outlive a deleted policy)."""
    if not ref:
        return ""
    try:
        return resolve_policy(client, ref).id
    except CliError as e:
        if ref.startswith(POLICY_ID_PREFIX) and e.code in (None, grpc.StatusCode.NOT_FOUND):
            return ref
        raise


def _adjust(args: argparse.Namespace, client: AdminClient) -> None:
    request = pb.CreateSpendAdjustmentRequest(
        adjustment=pb.SpendAdjustment(
            policy_id=resolve_policy(client, args.policy_id).id,
            member=args.member,
            amount_usd=args.amount,
            reason=args.reason,
        ),
        # A retry after a lost answer must not apply the correction twice:
        # the control plane answers a known request id with the first result.
        request_id=str(uuid.uuid4()),
    )
    for attempt in range(ATTEMPTS):
        try:
            a: pb.SpendAdjustment = client.call("CreateSpendAdjustment", request)
            break
        except CliError as e:
            if not e.retryable or attempt == ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
            client.reconnect()
    if args.json:
        echo(json.dumps(as_json(a), indent=2))
        return
    member = f" member {a.member}" if a.member else ""
    start = from_timestamp(a.window_start).strftime("%Y-%m-%d %H:%M")
    end = from_timestamp(a.window_end).strftime("%Y-%m-%d %H:%M")
    echo(
        f"adjusted {a.policy_name} {a.policy_id}{member} by {signed_usd(a.amount_usd)}: "
        f"spent ${a.spent_before_usd} -> ${a.spent_after_usd} "
        f"(window {start} -> {end} UTC)\n"
        f"recorded as {a.id} by {a.created_by}: {a.reason}"
    )


def _list(args: argparse.Namespace, client: AdminClient) -> None:
    if args.limit <= 0:
        raise CliError("--limit must be greater than 0")
    found: list[pb.SpendAdjustment] = []
    token = ""
    while len(found) < args.limit:
        resp = client.call(
            "ListSpendAdjustments",
            pb.ListSpendAdjustmentsRequest(
                policy_id=_policy_filter(client, args.policy or ""),
                member=args.member or "",
                page_size=min(args.limit - len(found), 1000),
                page_token=token,
            ),
        )
        found.extend(resp.adjustments)
        token = resp.next_page_token
        if not token:
            break
    if args.json:
        echo(json.dumps(as_json(found), indent=2))
        return
    echo(
        table(
            ["time (UTC)", "id", "policy", "member", "amount", "spent after", "by", "reason"],
            [
                [
                    from_timestamp(a.create_time).strftime("%Y-%m-%d %H:%M:%S"),
                    a.id,
                    a.policy_id,
                    a.member or "-",
                    signed_usd(a.amount_usd),
                    f"${a.spent_after_usd}",
                    a.created_by,
                    a.reason,
                ]
                for a in found
            ],
        )
    )
