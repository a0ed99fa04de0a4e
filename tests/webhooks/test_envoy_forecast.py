"""End to end: a steady load from the official openai SDK through a real
Envoy and ext_proc makes a policy's exhaustion forecast cross its
forecast_alert (set with `spendgate policy create --forecast-alert`); the
budget_policy.forecast event reaches local GENERIC, Slack and PagerDuty
receivers, once, and `spendgate status` shows the pace. Time moves by a
FakeClock shared by ext_proc and the control plane."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any, cast

import openai
import pytest
from standardwebhooks import Webhook as StandardWebhook

from control_plane.webhooks.signing import new_secret
from spendgate.cli.main import main
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.v1 import webhooks_pb2_grpc
from tests.conftest import Stack, start_stack, stop_stack
from tests.harness import ADMIN_TOKEN, FakeClock, grpc_channel, wait_until
from tests.webhooks.conftest import FAST, recent_instant
from tests.webhooks.receiver import Receiver

pytestmark = pytest.mark.e2e
# With these fake-provider knobs a gpt-4o-mini response costs exactly $0.00045.
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}
FORECAST = "budget_policy.forecast"
STEP = timedelta(seconds=5)  # one request every 5 s: $0.324/h
HORIZON_S = 60  # evidence needs 15 s of it


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(recent_instant())


@pytest.fixture
def stack(clock: FakeClock, db_url: str) -> Iterator[Stack]:
    """On SQLite and on PostgreSQL."""
    s = start_stack(db_url, clock=clock, control_plane={**FAST, "forecast_horizon_s": HORIZON_S})
    yield s
    stop_stack(s)


@pytest.fixture
def receivers() -> Iterator[dict[int, Receiver]]:
    formats = (wpb.WEBHOOK_FORMAT_GENERIC, wpb.WEBHOOK_FORMAT_SLACK, wpb.WEBHOOK_FORMAT_PAGERDUTY)
    started = {f: Receiver().start() for f in formats}
    yield started
    for r in started.values():
        r.stop()


def printed_json(out: str) -> dict[str, Any]:
    """The indented JSON document the CLI printed (the stack's log lines share stdout)."""
    lines = out.splitlines()
    start = lines.index("{")
    end = lines.index("}", start)
    return cast(dict[str, Any], json.loads("\n".join(lines[start : end + 1])))


def test_steady_sdk_load_sends_one_forecast_event_to_every_format(
    stack: Stack,
    clock: FakeClock,
    receivers: dict[int, Receiver],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = f"127.0.0.1:{stack.cp.port}"
    webhooks = webhooks_pb2_grpc.WebhookServiceStub(grpc_channel(stack.cp.port))
    secret = new_secret()
    for fmt, receiver in receivers.items():
        extra = {"secret": secret} if fmt == wpb.WEBHOOK_FORMAT_GENERIC else {}
        if fmt == wpb.WEBHOOK_FORMAT_PAGERDUTY:
            extra = {
                "routing_key": "R0123456789abcdef0123456789abcde",
                "pagerduty_severity": wpb.PAGER_DUTY_SEVERITY_CRITICAL,
            }
        webhooks.CreateWebhook(
            wpb.CreateWebhookRequest(
                webhook=wpb.Webhook(
                    name=f"ops-{fmt}", format=fmt, url=receiver.url, events=[FORECAST], **extra
                )
            ),
            metadata=stack.admin,
            timeout=10,
        )
    created = main(
        [
            "policy",
            "create",
            "--name",
            "team pace",
            "--amount",
            "0.1",
            "--window",
            "1d",
            "--action",
            "alert",
            "--forecast-alert",
            "1h",
            "--json",
            "--server",
            server,
            "--token",
            ADMIN_TOKEN,
        ]
    )
    assert created == 0
    policy_json = printed_json(capsys.readouterr().out)
    assert policy_json["forecast_alert"] == {"within": "3600s", "before_window_end": False}
    policy_id = policy_json["id"]
    wait_until(lambda: policy_id in stack.ext.state.index.policies, message="policy in ext_proc")

    def spend() -> pb.SpendEntry | None:
        entries = stack.budgets.ListSpend(
            pb.ListSpendRequest(policy_id=policy_id), metadata=stack.admin, timeout=10
        ).entries
        return entries[0] if entries else None

    with openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1", api_key="sk-test", default_headers=BIG, max_retries=0
    ) as client:
        for n in range(1, 7):
            reply = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
            )
            assert reply.status_code == 200
            wait_until(
                lambda n=n: (e := spend()) is not None and e.request_count == n,
                message=f"request {n} applied",
            )
            entry = spend()
            assert entry is not None
            # No evidence yet before 15 s of spend after the first report.
            assert entry.HasField("forecast_exhaust_time") is (n >= 4), n
            if n < 6:
                clock.advance(STEP)

    # The 4th report gave the evidence: $0.0018 spent, $0.0982 left at
    # $0.324/h is 1091 s, within the hour.
    got = {fmt: r.wait_for(1) for fmt, r in receivers.items()}
    assert all(len(r) == 1 for r in got.values())  # once per window, not per report
    generic = StandardWebhook(secret).verify(
        got[wpb.WEBHOOK_FORMAT_GENERIC][0].body, got[wpb.WEBHOOK_FORMAT_GENERIC][0].headers
    )
    assert (generic["entity"], generic["action"]) == ("budget_policy", "forecast")
    data = generic["data"]
    assert (data["policy_id"], data["spent_usd"], data["amount_usd"]) == (
        policy_id,
        "0.0018",
        "0.10",
    )
    true_left = (Decimal("0.1") - Decimal("0.0018")) / Decimal("0.00045") * 5
    assert abs(data["exhausted_in_s"] - float(true_left)) <= 0.10 * float(true_left)
    assert data["forecast_alert"] == {"within_s": 3600, "before_window_end": False}
    assert float(data["rate_usd_per_hour"]) == pytest.approx(0.324, rel=0.10)

    slack = got[wpb.WEBHOOK_FORMAT_SLACK][0].json()
    assert slack["text"].startswith(":hourglass_flowing_sand: Budget runs out in ")
    assert "team pace" in slack["text"] and "at this pace" in slack["text"]
    pagerduty = got[wpb.WEBHOOK_FORMAT_PAGERDUTY][0].json()
    assert pagerduty["event_action"] == "trigger"
    assert pagerduty["payload"]["severity"] == "warning"  # though the webhook says critical
    assert pagerduty["payload"]["class"] == FORECAST
    assert pagerduty["payload"]["custom_details"]["exhausted_at"] == data["exhausted_at"]

    # ListEvents and status show it; status --json has the API's forecast.
    events = webhooks.ListEvents(
        wpb.ListEventsRequest(type=FORECAST), metadata=stack.admin, timeout=10
    ).events
    assert [e.forecast_exhaust_time.ToJsonString() for e in events] == [data["exhausted_at"]]
    assert main(["status", "--server", server, "--token", ADMIN_TOKEN, "--json"]) == 0
    status = printed_json(capsys.readouterr().out)
    (shown,) = next(p for p in status["policies"] if p["id"] == policy_id)["spend"]
    entry = spend()
    assert entry is not None
    assert shown["forecast_exhausted_at"] == entry.forecast_exhaust_time.ToJsonString()
    assert shown["forecast_rate_usd_per_hour"] == entry.forecast_rate_usd_per_hour
    assert main(["status", "--server", server, "--token", ADMIN_TOKEN]) == 0
    text = capsys.readouterr().out
    # About 18 minutes left: before the day's end unless the test runs
    # just before midnight (UTC), when status says so instead.
    if entry.forecast_exhaust_time.seconds < entry.window_end.seconds:
        line = r"exhausted in \d+m\d\ds \(window resets in \S+\)"
    else:
        line = r"not exhausted before the window resets \(in \S+\)"
    assert re.search(r"^  at this pace \(\$0\.3\d+/h\): " + line + "$", text, re.MULTILINE), text
    assert re.search(r"  forecast\s+team pace " + policy_id, text), text

    # `policy update --forecast-alert` changes the rule, `off` removes it;
    # the other fields stay.
    base = ["--server", server, "--token", ADMIN_TOKEN, "--json"]
    assert main(["policy", "update", "team pace", "--forecast-alert", "30m,window-end", *base]) == 0
    changed = printed_json(capsys.readouterr().out)
    assert changed["forecast_alert"] == {"within": "1800s", "before_window_end": True}
    assert main(["policy", "update", "team pace", "--forecast-alert", "off", *base]) == 0
    off = printed_json(capsys.readouterr().out)
    assert "forecast_alert" not in off and off["amount_usd"] == "0.10"
    assert main(["policy", "update", "team pace", "--forecast-alert=-2h", *base]) == 1
    assert "--forecast-alert '-2h': use a time" in capsys.readouterr().err
