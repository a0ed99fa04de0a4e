"""How a budget_policy.would_reject event (a SHADOW policy, issue 15) reads
in each webhook format."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from control_plane.webhooks import events
from control_plane.webhooks.formats import Message, pagerduty_event, slack_message
from spendgate.domain.policies import Action, Policy, Scope
from spendgate.domain.windows import WindowSpec, WindowUnit

NOW = datetime(2026, 6, 15, 10, 30, tzinfo=UTC)
SHADOW = Policy("bp_1", "team-a daily", 25 * 10**9, WindowSpec(WindowUnit.DAYS), Action.REJECT,
                Scope.WORKSPACE, "team-a", shadow=True)  # fmt: skip


def data(kind: str, policy: Policy = SHADOW) -> dict[str, object]:
    return events.event_data(
        event_id="evt_1", kind=kind, policy=policy, member="", threshold=0,
        spent_nanos=26 * 10**9, window_start=1781481600, window_end=1781568000,
        would_reject=3,
    )  # fmt: skip


def test_would_reject_payload_names_the_count_and_enforcement() -> None:
    d = data(events.WOULD_REJECT)
    assert d["type"] == "budget_policy.would_reject"
    assert d["would_reject_count"] == 3 and d["enforcement"] == "shadow"
    assert d["action"] == "reject" and d["spent_usd"] == "26.00"
    # Enforced policies' payloads are as before: no enforcement key.
    enforced = data(events.EXCEEDED, dataclasses.replace(SHADOW, shadow=False))
    assert "enforcement" not in enforced and "would_reject_count" not in enforced


def test_slack_and_pagerduty_say_nothing_was_blocked() -> None:
    msg = Message("dl_1", events.WOULD_REJECT, data(events.WOULD_REJECT), NOW)
    slack = slack_message(msg)
    assert slack["text"].startswith(":eyes: Shadow budget would reject requests: team-a daily")
    body = slack["blocks"][1]["text"]["text"]
    assert "Shadow policy: requests are admitted; those it would refuse are counted." in body
    # A shadow policy's "exceeded" does not claim 429s either.
    exceeded = slack_message(Message("dl_2", events.EXCEEDED, data(events.EXCEEDED), NOW))
    assert "HTTP 429" not in exceeded["blocks"][1]["text"]["text"]
    pd = pagerduty_event(msg, "rk", "warning")
    assert pd["payload"]["summary"].startswith(
        "Shadow budget would reject requests: team-a daily (workspace team-a): $26.00 of $25.00"
    )
    assert pd["payload"]["class"] == "budget_policy.would_reject"
