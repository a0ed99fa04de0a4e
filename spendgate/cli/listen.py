"""`spendgate webhook listen`: watch alerts on this machine.

A small HTTP receiver that registers itself as a GENERIC webhook with a fresh
signing secret, checks each delivery's Standard Webhooks signature and
timestamp, prints each event once (a retried delivery has the same
webhook-id), and deletes its webhook when stopped (Ctrl-C, SIGTERM). The
control plane must allow plain http to loopback: `spendgate up --demo` does,
else webhook_allow_http and webhook_allow_private_ranges (README "Alerts").
"""

from __future__ import annotations

import argparse
import hmac
import json
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from control_plane.webhooks.signing import new_secret, signature
from spendgate.cli.client import AdminClient, CliError
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.visible import visible

PATH = "/spendgate"
MAX_BODY = 1 << 20  # a delivery is a few hundred bytes; anything near this is not one
TOLERANCE_S = 300  # Standard Webhooks: refuse timestamps further than 5 minutes off
MAX_ID = 256
REMEMBERED_IDS = 10_000
ALL_EVENTS = ("budget_policy.exceeded", "budget_policy.threshold_crossed", "usage.anomaly")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8787, help="port to listen on (0: any free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on and register")
    p.add_argument("--name", default="webhook-listen", help="name of the registered webhook")
    p.add_argument(
        "--events",
        help="exceeded,threshold_crossed,anomaly (default: all three)",
    )
    p.add_argument("--keep", action="store_true", help="do not delete the webhook on exit")


def check_delivery(
    secret: str, headers: dict[str, str], body: bytes, now: float
) -> tuple[str, dict[str, Any]] | str:
    """(webhook-id, parsed body) of a genuine delivery, else why it is not."""
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    sent = headers.get("webhook-signature", "")
    if not msg_id or len(msg_id) > MAX_ID or not msg_id.isprintable():
        return "missing or malformed webhook-id"
    if not stamp.isdigit() or len(stamp) > 12:
        return "missing or malformed webhook-timestamp"
    if abs(now - int(stamp)) > TOLERANCE_S:
        return f"webhook-timestamp is more than {TOLERANCE_S} s away from this clock"
    expected = signature(secret, msg_id, int(stamp), body)
    # A header may carry several space-separated signatures (key rotation).
    if not any(hmac.compare_digest(expected, s) for s in sent.split(" ") if s):
        return "webhook-signature does not match the secret"
    try:
        payload = json.loads(body)
    except ValueError:
        return "body is not JSON"
    if not isinstance(payload, dict):
        return "body is not a JSON object"
    return msg_id, payload


def describe(payload: dict[str, Any]) -> str:
    """One line for a human: what happened to which budget."""
    kind = f"{payload.get('entity', '?')}.{payload.get('action', '?')}"
    data = payload.get("data")
    data = data if isinstance(data, dict) else {}
    parts = [str(payload.get("timestamp", "")), kind]
    if "policy_name" in data:
        member = f" member {data['member']}" if data.get("member") else ""
        parts.append(f"policy {data['policy_name']} ({data.get('scope', '')}{member})")
        if "threshold_percent" in data:
            parts.append(f"{data['threshold_percent']}% threshold")
        parts.append(
            f"${data.get('spent_usd', '?')} of ${data.get('amount_usd', '?')} "
            f"({data.get('percent_used', '?')}%), {data.get('action', '')}"
        )
    elif "reason" in data:
        parts.append(f"{data['reason']} on route {data.get('route', '')}")
    return visible("  ".join(p for p in parts if p))


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], secret: str, as_json: bool) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.secret = secret
        self.as_json = as_json
        self.lock = threading.Lock()
        self.seen: OrderedDict[str, None] = OrderedDict()


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the events are the output

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        length = self.headers.get("content-length", "")
        if not length.isdigit() or int(length) > MAX_BODY:
            self._answer(413 if length.isdigit() else 411)
            return
        body = self.rfile.read(int(length))
        headers = {k.lower(): v for k, v in self.headers.items()}
        checked = check_delivery(self.server.secret, headers, body, time.time())
        if isinstance(checked, str):
            _say(f"refused a delivery: {checked}", err=True)
            self._answer(401)
            return
        msg_id, payload = checked
        with self.server.lock:
            repeated = msg_id in self.server.seen
            self.server.seen[msg_id] = None
            if len(self.server.seen) > REMEMBERED_IDS:
                self.server.seen.popitem(last=False)
        self._answer(204)
        if repeated:
            return  # at-least-once delivery: shown the first time only
        if self.server.as_json:
            _say(json.dumps(payload, sort_keys=True))
        else:
            _say(describe(payload))


def _say(text: str, *, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def run_listen(args: argparse.Namespace, client: AdminClient, events: list[str]) -> None:
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: must be 0 to 65535")
    secret = new_secret()
    try:
        receiver = _Receiver((args.host, args.port), secret, args.json)
    except OSError as e:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{receiver.server_address[1]}{PATH}"
    webhook = wpb.Webhook(
        name=args.name,
        url=url,
        format=wpb.WEBHOOK_FORMAT_GENERIC,
        secret=secret,
        events=events or list(ALL_EVENTS),
        description="spendgate webhook listen: prints events on the terminal that runs it",
    )
    try:
        created = client.call("CreateWebhook", wpb.CreateWebhookRequest(webhook=webhook))
    except BaseException:
        receiver.server_close()
        raise

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    _say(
        f"listening on {url} as webhook {created.id} ({', '.join(created.events)}); "
        f"Ctrl-C stops{'' if args.keep else ' and deletes it'}"
    )
    try:
        receiver.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.server_close()
        if not args.keep:
            try:
                client.call("DeleteWebhook", wpb.DeleteWebhookRequest(id=created.id))
                _say(f"deleted webhook {created.id}")
            except CliError as e:
                _say(f"could not delete webhook {created.id}: {e}", err=True)
