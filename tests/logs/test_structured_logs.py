"""Structured logs of a whole stack (control plane, ext_proc, real Envoy,
fake provider, a failing webhook receiver), configured as in production
(JSON lines) but written to a file: no secret ever reaches a log, every line
is JSON, and a rejection is found in both Envoy's access log and ext_proc's
log under the same request id."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from control_plane.webhooks.signing import new_secret
from spendgate import logs
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.v1 import webhooks_pb2_grpc
from tests.conftest import start_stack, stop_stack
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    grpc_channel,
    tempdir,
    wait_until,
)
from tests.webhooks.conftest import FAST
from tests.webhooks.receiver import Receiver, Reply

pytestmark = pytest.mark.e2e
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}  # $0.00045


@pytest.fixture
def log_file() -> Iterator[Path]:
    """structlog (and stdlib logging) as in production, JSON, into a file."""
    path = tempdir() / "services.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    with path.open("w") as f:
        logs.configure(json=True, level="info", stream=f)
        # Loggers must not keep this file once the test is over.
        structlog.configure(cache_logger_on_first_use=False)
        try:
            yield path
        finally:
            structlog.reset_defaults()
            root.handlers[:], level = saved
            root.setLevel(level)


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_logs_are_json_carry_request_ids_and_no_secrets(log_file: Path) -> None:
    provider_key = f"sk-test-{uuid.uuid4().hex}"
    anthropic_key = f"sk-ant-test-{uuid.uuid4().hex}"
    gemini_key = f"AIza-test-{uuid.uuid4().hex}"
    url_token = f"url-token-{uuid.uuid4().hex}"
    webhook_secret = new_secret()
    secrets = [
        provider_key,
        anthropic_key,
        gemini_key,
        url_token,
        webhook_secret,
        webhook_secret.removeprefix("whsec_"),
        ADMIN_TOKEN,
        READ_TOKEN,
        DATA_PLANE_TOKEN,
    ]
    receiver = Receiver().start()
    receiver.default = Reply(status=500, body=b"receiver is down")
    stack = start_stack(control_plane={**FAST, "webhook_max_attempts": 1})
    try:
        webhooks = webhooks_pb2_grpc.WebhookServiceStub(grpc_channel(stack.cp.port))
        hook = webhooks.CreateWebhook(
            wpb.CreateWebhookRequest(
                webhook=wpb.Webhook(
                    name="ops",
                    format=wpb.WEBHOOK_FORMAT_GENERIC,
                    url=f"{receiver.url}?token={url_token}",
                    secret=webhook_secret,
                )
            ),
            metadata=stack.admin,
            timeout=10,
        )
        team = stack.budgets.CreateBudgetPolicy(
            pb.CreateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(
                    name="team cap",
                    amount_usd="0.0008",  # two requests
                    window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                    action=pb.ACTION_REJECT,
                    scope=pb.SCOPE_GLOBAL,
                )
            ),
            metadata=stack.admin,
            timeout=10,
        )
        # An API_KEY policy is created with the key itself as target.
        stack.budgets.CreateBudgetPolicy(
            pb.CreateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(
                    name="one key",
                    amount_usd="100",
                    window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                    action=pb.ACTION_ALERT,
                    scope=pb.SCOPE_API_KEY,
                    target=provider_key,
                )
            ),
            metadata=stack.admin,
            timeout=10,
        )
        wait_until(lambda: team.id in stack.ext.state.index.policies, message="policy in ext_proc")
        base = stack.envoy.base_url
        body = {
            "model": "gpt-4o-mini",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}],
        }

        def openai_call() -> httpx.Response:
            return httpx.post(
                f"{base}/v1/chat/completions",
                headers={**BIG, "authorization": f"Bearer {provider_key}"},
                json=body,
                timeout=30,
            )

        assert openai_call().status_code == 200
        anthropic = httpx.post(
            f"{base}/v1/messages",
            headers={**BIG, "x-api-key": anthropic_key, "anthropic-version": "2023-06-01"},
            json={
                "model": "claude-3-5-haiku-latest",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "hi"}],
            },
            timeout=30,
        )
        assert anthropic.status_code == 200
        # Spent now: the next request is refused before the provider.
        wait_until(
            lambda: _exceeded(stack.budgets, team.id, stack.admin), message="team cap exceeded"
        )
        rejected = httpx.post(
            f"{base}/v1beta/models/gemini-2.0-flash:generateContent?key={gemini_key}",
            json={"contents": [{"parts": [{"text": "hi"}]}]},
            timeout=30,
        )
        assert rejected.status_code == 429
        request_id = rejected.headers["x-request-id"]
        refused = openai_call()
        assert refused.status_code == 429
        assert refused.headers["x-request-id"] != request_id

        def service_lines() -> list[dict[str, Any]]:
            return _json_lines(log_file.read_text())

        def given_up() -> list[dict[str, Any]]:
            return [e for e in service_lines() if e["event"] == "webhook delivery failed; given up"]

        [failure] = wait_until(given_up, message="the webhook delivery is given up")
        assert failure["level"] == "error"
        assert (failure["webhook_id"], failure["event_type"], failure["policy_id"]) == (
            hook.id,
            "budget_policy.exceeded",
            team.id,
        )
        assert failure["status_code"] == 500 and failure["error"].startswith("HTTP 500")
    finally:
        # Envoy writes its access log out every 10 s (--file-flush-interval-msec)
        # and when it stops: read it after.
        stop_stack(stack)
        receiver.stop()

    # (b) The same request in Envoy's access log and in ext_proc's log.
    envoy_text = stack.envoy.log_path.read_text()
    access = [json.loads(line) for line in envoy_text.splitlines() if line.startswith("{")]
    assert {(a["status"], a["route"]) for a in access} == {
        (200, "openai"),
        (200, "anthropic"),
        (429, "gemini"),
        (429, "openai"),
    }
    [line] = [a for a in access if a["request_id"] == request_id]
    assert (line["status"], line["details"], line["route"]) == (
        429,
        "spendgate_budget_exceeded",
        "gemini",
    )
    assert line["path"] == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert line["policy"] == team.id
    entries = _json_lines(log_file.read_text())
    rejections = [e for e in entries if e["event"] == "rejected"]
    [mine] = [e for e in rejections if e["request_id"] == request_id]
    assert mine == {
        "event": "rejected",
        "reason": "budget_exceeded",
        "request_id": request_id,
        "policy_id": team.id,
        "member": None,
        "reset": mine["reset"],
        "level": "info",
        "timestamp": mine["timestamp"],
    }
    assert {e["request_id"] for e in rejections} == {request_id, refused.headers["x-request-id"]}
    # A crossing recorded by the control plane: one line per event.
    recorded = [e for e in entries if e["event"] == "budget event recorded"]
    assert [(e["event_type"], e["policy_id"], e["deliveries"]) for e in recorded] == [
        ("budget_policy.exceeded", team.id, 1)
    ]
    # (c) Every line is JSON with a level and a time (checked by parsing
    # them all above); (a) no secret anywhere, in any form it was sent.
    text = log_file.read_text()
    assert all({"event", "level", "timestamp"} <= e.keys() for e in entries)
    for secret in secrets:
        assert secret not in text, secret
        assert secret not in envoy_text, secret


def _exceeded(budgets: Any, policy_id: str, metadata: Any) -> bool:
    resp = budgets.ListSpend(
        pb.ListSpendRequest(policy_id=policy_id), metadata=metadata, timeout=10
    )
    return any(e.exceeded for e in resp.entries)


WRITER = """
import sys
import structlog
from spendgate import logs
logs.configure(json=True)
log = structlog.get_logger("spendgate.test")
for i in range(int(sys.argv[1])):
    log.info("line from a worker", worker=sys.argv[2], i=i, pad="x" * 200)
"""


def test_processes_sharing_stderr_write_whole_lines() -> None:
    """ext_proc --workers: the workers write their logs to the parent's
    stderr. Each line is one write, so no line is cut by another process's
    (they were: print() writes the newline apart, and stderr writes
    through: two workers' lines came out as one unparseable line)."""
    path = tempdir() / "shared.log"
    lines = 2000
    with path.open("wb") as f:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(lines), str(k)],
                stderr=f,
                cwd=Path(__file__).resolve().parents[2],
            )
            for k in range(3)
        ]
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    events = _json_lines(path.read_text())
    assert sorted((e["worker"], e["i"]) for e in events) == [
        (str(k), i) for k in range(3) for i in range(lines)
    ]
