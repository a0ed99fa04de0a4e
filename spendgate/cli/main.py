"""The `spendgate` command."""

from __future__ import annotations

import argparse
import sys

from spendgate.cli import (
    adjustments,
    apply,
    policies,
    prices,
    reports,
    secrets,
    status,
    up,
    webhooks,
)
from spendgate.cli.client import AdminClient, CliError
from spendgate.cli.credentials import client_server, client_token
from spendgate.visible import visible


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spendgate", description="Hard dollar budgets for LLM traffic, enforced in Envoy."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_up = sub.add_parser("up", help="run control plane, ext_proc and Envoy on this machine")
    up.add_arguments(p_up)
    p_envoy = sub.add_parser(
        "envoy-config",
        help="print the Envoy bootstrap for a spendgate.yaml (what `up` runs, or --compose)",
    )
    up.add_envoy_config_arguments(p_envoy)

    def admin_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", help="control plane host:port (default 127.0.0.1:50051)")
        p.add_argument("--token", help="bearer token (default: SPENDGATE_TOKEN or .spendgate/)")
        p.add_argument(
            "--state-dir",
            help="folder of `spendgate up`'s credentials.json (default: SPENDGATE_STATE_DIR, "
            "else .spendgate/ here or in the nearest parent folder)",
        )
        p.add_argument("--tls", action="store_true", help="connect with TLS")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p_policy = sub.add_parser("policy", help="create, list, get, update, delete budget policies")
    psub = p_policy.add_subparsers(dest="policy_command", required=True)
    create = psub.add_parser("create", help="create a budget policy")
    policies.add_policy_fields(create, create=True)
    admin_flags(create)
    admin_flags(psub.add_parser("list", help="list budget policies"))
    for name in ("get", "delete"):
        p = psub.add_parser(name, help=f"{name} a budget policy")
        p.add_argument("id", metavar="ID_OR_NAME")
        admin_flags(p)
    update = psub.add_parser("update", help="change fields of a budget policy")
    update.add_argument("id", metavar="ID_OR_NAME")
    policies.add_policy_fields(update, create=False)
    admin_flags(update)

    p_spend = sub.add_parser("spend", help="spend in the current window of each policy")
    p_spend.add_argument("--policy", help="only this policy (id or name)")
    p_spend.add_argument("--member", help="only this member of a wildcard policy")
    admin_flags(p_spend)
    adjustments.add_parsers(p_spend, admin_flags)

    status.add_parser(sub, admin_flags)
    webhooks.add_parser(sub, admin_flags)
    prices.add_parser(sub, admin_flags)
    secrets.add_parser(sub, admin_flags)
    apply.add_parsers(sub, admin_flags)
    reports.add_parser(sub, admin_flags)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            return up.run_up(args)
        if args.command == "envoy-config":
            return up.run_envoy_config(args)
        if secrets.run_offline(args):
            return 0
        client = AdminClient(
            client_server(args.server), client_token(args.token, args.state_dir), tls=args.tls
        )
        try:
            if args.command == "apply":
                return apply.run_apply(args, client)
            if args.command == "export":
                apply.run_export(args, client)
            elif args.command == "policy":
                policies.run_policy(args, client)
            elif args.command == "webhook":
                webhooks.run_webhook(args, client)
            elif args.command == "price":
                prices.run_price(args, client)
            elif args.command == "secrets":
                secrets.run_secrets(args, client)
            elif args.command == "report":
                reports.run_report(args, client)
            elif args.command == "status":
                status.run_status(args, client)
            elif getattr(args, "spend_command", None):
                adjustments.run(args, client)
            else:
                policies.run_spend(args, client)
        finally:
            client.close()
        return 0
    except CliError as e:
        print(f"spendgate: {visible(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
