"""`spendgate secrets ...`: the keys that encrypt stored secrets.

spendgate secrets new-key      print a fresh key (for secrets_key_file)
spendgate secrets status       which key seals how many stored values
spendgate secrets rotate       re-encrypt every stored secret under the current key

Replacing a key: put the new key first in every control plane's key file
(the old one after it) and restart them; run `spendgate secrets rotate`;
when `spendgate secrets status` shows nothing under the old key, remove it
from the files and restart again.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from control_plane.keyring import new_key
from spendgate.cli.client import AdminClient, CliError
from spendgate.cli.output import as_json, echo, table
from spendgate.v1 import secrets_pb2 as spb


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    admin_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser("secrets", help="keys that encrypt stored webhook secrets")
    ssub = p.add_subparsers(dest="secrets_command", required=True)
    ssub.add_parser("new-key", help="print a new random key (nothing is sent anywhere)")
    admin_flags(ssub.add_parser("status", help="which key seals how many stored values"))
    admin_flags(
        ssub.add_parser(
            "rotate", help="re-encrypt every stored secret under the control plane's current key"
        )
    )


def run_offline(args: argparse.Namespace) -> bool:
    """Handle the commands that need no control plane; True if handled."""
    if args.command == "secrets" and args.secrets_command == "new-key":
        echo(new_key())
        return True
    return False


def run_secrets(args: argparse.Namespace, client: AdminClient) -> None:
    if args.secrets_command == "status":
        status = client.call("GetSecretsStatus", spb.GetSecretsStatusRequest())
        if args.json:
            echo(json.dumps(as_json(status), indent=2))
            return
        current = status.current_key_id or "(no key configured)"
        echo(f"current key: {current}   configured: {', '.join(status.key_ids) or '-'}")
        echo(
            table(
                ["key", "stored values", "configured here"],
                [[s.key_id, str(s.count), "yes" if s.configured else "no"] for s in status.stored],
            )
        )
        return
    result = client.call("RotateSecrets", spb.RotateSecretsRequest())
    if args.json:
        echo(json.dumps(as_json(result), indent=2))
    else:
        echo(
            f"re-encrypted {result.rotated} stored value(s) under key {result.current_key_id}; "
            f"{result.unchanged} already were"
        )
        for u in result.unreadable:
            echo(f"  cannot read {u.field} of webhook {u.webhook_id}: {u.reason}")
    if result.unreadable:
        raise CliError(
            f"{len(result.unreadable)} stored value(s) could not be read and were left as they "
            "are: configure their key on this control plane, or set those fields again"
        )
