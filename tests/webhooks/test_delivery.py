"""Deliveries to real local HTTP receivers, driven with a FakeClock: the
dispatcher is run round by round (``run_until_idle``) so retries happen when
the test moves the clock, never by sleeping. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook as StandardWebhook

from control_plane.webhooks.signing import new_secret
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import webhooks_pb2 as wpb
from tests.webhooks.conftest import USD, Rig
from tests.webhooks.receiver import Receiver, Reply

EXCEEDED = "budget_policy.exceeded"
THRESHOLD = "budget_policy.threshold_crossed"


def hour_window(rig: Rig) -> tuple[datetime, datetime]:
    start = rig.clock().replace(minute=0, second=0, microsecond=0)
    return start, start + timedelta(hours=1)


def z(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def test_generic_delivery_is_signed_the_standard_webhooks_way(
    rig: Rig, receiver: Receiver
) -> None:
    secret = new_secret()
    hook = await rig.webhook(receiver.url, secret=secret)
    policy = await rig.policy("10", name="search team", action=pb.ACTION_REJECT)
    await rig.spend(policy.id, 10 * USD + 500_000_000)
    assert await rig.dispatcher.run_until_idle() == 1

    (got,) = receiver.received()
    delivery = await rig.one_delivery()
    # An independent implementation verifies the signature.
    payload = StandardWebhook(secret).verify(got.body, got.headers)
    start, end = hour_window(rig)
    assert payload == {
        "entity": "budget_policy",
        "action": "exceeded",
        "timestamp": z(rig.clock()),
        "data": {
            "event_id": delivery.event.id,
            "type": EXCEEDED,
            "policy_id": policy.id,
            "policy_name": "search team",
            "scope": "global",
            "target": "",
            "member": "",
            "action": "reject",
            "amount_usd": "10.00",
            "spent_usd": "10.50",
            "percent_used": "105.0",
            "window_start": z(start),
            "window_end": z(end),
            "timezone": "UTC",
        },
    }
    assert got.headers["webhook-id"] == delivery.id
    assert got.headers["webhook-timestamp"] == str(int(rig.clock().timestamp()))
    assert got.headers["webhook-signature"].startswith("v1,")
    assert got.headers["content-type"] == "application/json"
    assert got.path == "/hook"
    # A tampered body fails verification.
    with pytest.raises(Exception, match=r"(?i)signature"):
        StandardWebhook(secret).verify(got.body.replace(b"10.50", b"1.05"), got.headers)

    assert delivery.webhook_id == hook.id
    assert delivery.state == wpb.DELIVERY_STATE_DELIVERED
    assert delivery.attempt_count == 1
    assert delivery.last_status_code == 200
    assert delivery.last_error == ""
    assert not delivery.HasField("next_attempt_time")
    assert delivery.delivered_time.ToDatetime(UTC) == rig.clock()
    assert [(a.number, a.status_code, a.error, a.response_excerpt) for a in delivery.attempts] == [
        (1, 200, "", "ok")
    ]
    assert json.loads(got.body)["data"]["event_id"] == delivery.event.id


# ---- formats -----------------------------------------------------------------------


def slack_date(t: datetime) -> str:
    return f"<!date^{int(t.timestamp())}^{{date_short_pretty}} {{time}}|{t:%Y-%m-%d %H:%M} UTC>"


async def test_slack_message_field_by_field(rig: Rig, receiver: Receiver) -> None:
    await rig.webhook(receiver.url, format=wpb.WEBHOOK_FORMAT_SLACK, events=[THRESHOLD])
    policy = await rig.policy(
        "20",
        name="search & ranking",
        thresholds=(80,),
        action=pb.ACTION_ALERT,
        scope=pb.SCOPE_USER,
        target="*",
    )
    await rig.spend(policy.id, 17 * USD, member="alice")
    assert await rig.dispatcher.run_until_idle() == 1
    (got,) = receiver.received()
    body = got.json()
    start, end = hour_window(rig)
    (delivery,) = await rig.deliveries()
    assert set(body) == {"text", "blocks"}
    assert body["text"] == (
        ":warning: Budget 80% reached: search &amp; ranking — user alice spent $17.00 of "
        "$20.00 (85.0%)"
    )
    header, summary, facts, context = body["blocks"]
    assert header == {
        "type": "header",
        "text": {"type": "plain_text", "text": ":warning: Budget 80% reached: search & ranking"},
    }
    assert summary == {
        "type": "section",
        "text": {
            "type": "mrkdwn",
            "text": "*search &amp; ranking*: user alice spent *$17.00 of $20.00 (85.0%)*.\n"
            "Traffic keeps flowing.",
        },
    }
    assert facts == {
        "type": "section",
        "fields": [
            {"type": "mrkdwn", "text": f"*Policy*\nsearch &amp; ranking (`{policy.id}`)"},
            {"type": "mrkdwn", "text": "*Spend vs limit*\n$17.00 of $20.00 (85.0%)"},
            {"type": "mrkdwn", "text": "*Applies to*\nuser alice"},
            {"type": "mrkdwn", "text": "*Action*\nalert"},
            {"type": "mrkdwn", "text": f"*Window*\n{slack_date(start)} to {slack_date(end)}"},
            {"type": "mrkdwn", "text": f"*Resets*\n{slack_date(end)}"},
        ],
    }
    assert context == {
        "type": "context",
        "elements": [{"type": "mrkdwn", "text": f"spendgate · event `{delivery.event.id}`"}],
    }
    assert "webhook-signature" not in got.headers  # Slack webhooks carry no secret


async def test_pagerduty_triggers_one_incident_per_window_and_resolves_at_reset(
    rig: Rig, receiver: Receiver
) -> None:
    key = "R0123456789abcdef0123456789abcde"
    await rig.webhook(
        receiver.url,
        format=wpb.WEBHOOK_FORMAT_PAGERDUTY,
        routing_key=key,
        pagerduty_severity=wpb.PAGER_DUTY_SEVERITY_CRITICAL,
    )
    policy = await rig.policy("10", name="bots", thresholds=(50,), scope=pb.SCOPE_USER, target="*")
    start, end = hour_window(rig)
    await rig.spend(policy.id, 6 * USD, member="bot-7")
    await rig.dispatcher.run_until_idle()
    await rig.spend(policy.id, 5 * USD, member="bot-7")
    await rig.dispatcher.run_until_idle()
    dedup = f"spendgate/{policy.id}/{z(start)}/bot-7"
    first, second = (r.json() for r in receiver.received())
    assert {k: v for k, v in first.items() if k != "payload"} == {
        "routing_key": key,
        "event_action": "trigger",
        "dedup_key": dedup,
        "client": "spendgate",
    }
    assert first["payload"] == {
        "summary": "Budget 50% reached: bots (user bot-7): $6.00 of $10.00 (60.0%), "
        f"action reject, window ends {z(end)}",
        "source": "spendgate",
        "severity": "critical",
        "timestamp": z(rig.clock()),
        "component": "bots",
        "group": "user",
        "class": THRESHOLD,
        "custom_details": first["payload"]["custom_details"],
    }
    details = first["payload"]["custom_details"]
    assert (details["threshold_percent"], details["member"], details["spent_usd"]) == (
        50,
        "bot-7",
        "6.00",
    )
    assert second["dedup_key"] == dedup and second["event_action"] == "trigger"
    assert second["payload"]["class"] == EXCEEDED
    assert second["payload"]["summary"].startswith("Budget exceeded: bots (user bot-7): $11.00")

    # The resolve waits for the window to end; it is visible meanwhile.
    pending = await rig.deliveries(state=wpb.DELIVERY_STATE_PENDING)
    assert [(d.event.type, d.next_attempt_time.ToDatetime(UTC)) for d in pending] == [
        ("budget_policy.window_reset", end)
    ]
    rig.clock.set(end - timedelta(seconds=1))
    assert await rig.dispatcher.run_until_idle() == 0
    rig.clock.set(end)
    assert await rig.dispatcher.run_until_idle() == 1
    assert receiver.received()[-1].json() == {
        "routing_key": key,
        "event_action": "resolve",
        "dedup_key": dedup,
    }
    assert len(receiver.received()) == 3


# ---- retries -------------------------------------------------------------------------


async def exceeded_delivery(rig: Rig, url: str) -> None:
    await rig.webhook(url)
    policy = await rig.policy("1")
    await rig.spend(policy.id, 2 * USD)


async def test_receiver_down_then_up_is_delivered_when_it_comes_back(rig: Rig) -> None:
    receiver = Receiver()  # not started: connections are refused
    await exceeded_delivery(rig, receiver.url)
    assert await rig.dispatcher.run_until_idle() == 1
    d = await rig.one_delivery()
    assert (d.state, d.attempt_count, d.last_status_code) == (wpb.DELIVERY_STATE_PENDING, 1, 0)
    assert d.last_error.startswith("connection failed")
    assert d.next_attempt_time.ToDatetime(UTC) == rig.clock() + timedelta(seconds=1)
    rig.clock.advance(timedelta(seconds=1))
    await rig.dispatcher.run_until_idle()
    assert (await rig.one_delivery()).attempt_count == 2
    receiver.start()
    try:
        assert await rig.dispatcher.run_until_idle() == 0  # not due yet (2 s backoff)
        rig.clock.advance(timedelta(seconds=2))
        assert await rig.dispatcher.run_until_idle() == 1
        d = await rig.one_delivery()
        assert (d.state, d.attempt_count, d.last_status_code, d.last_error) == (
            wpb.DELIVERY_STATE_DELIVERED,
            3,
            200,
            "",
        )
        assert [a.status_code for a in d.attempts] == [0, 0, 200]
        assert len(receiver.received()) == 1
    finally:
        receiver.stop()


async def test_two_500s_then_200_is_three_attempts_and_one_delivery(
    rig: Rig, receiver: Receiver
) -> None:
    receiver.reply(Reply(500, b"boom"), Reply(500, b"boom again"))
    await exceeded_delivery(rig, receiver.url)
    t0 = rig.clock()
    for step in (0, 1, 2):  # backoff 1 s, then 2 s
        rig.clock.advance(timedelta(seconds=step))
        assert await rig.dispatcher.run_until_idle() == 1
    d = await rig.one_delivery()
    assert d.state == wpb.DELIVERY_STATE_DELIVERED
    assert [
        (a.number, a.start_time.ToDatetime(UTC) - t0, a.status_code, a.error, a.response_excerpt)
        for a in d.attempts
    ] == [
        (1, timedelta(0), 500, "HTTP 500", "boom"),
        (2, timedelta(seconds=1), 500, "HTTP 500", "boom again"),
        (3, timedelta(seconds=3), 200, "", "ok"),
    ]
    bodies = receiver.received()
    assert len(bodies) == 3
    # The same message each time: one id, so the receiver can drop duplicates.
    assert {r.headers["webhook-id"] for r in bodies} == {d.id}
    assert {r.body for r in bodies} == {bodies[0].body}


async def test_429_retry_after_is_honoured(rig: Rig, receiver: Receiver) -> None:
    receiver.reply(Reply(429, b"slow down", {"retry-after": "30"}))
    await exceeded_delivery(rig, receiver.url)
    await rig.dispatcher.run_until_idle()
    d = await rig.one_delivery()
    # Backoff alone would retry after 1 s; the receiver asked for 30.
    assert d.next_attempt_time.ToDatetime(UTC) == rig.clock() + timedelta(seconds=30)
    assert (d.last_status_code, d.last_error) == (429, "HTTP 429")
    rig.clock.advance(timedelta(seconds=29))
    assert await rig.dispatcher.run_until_idle() == 0
    assert len(receiver.received()) == 1
    rig.clock.advance(timedelta(seconds=1))
    assert await rig.dispatcher.run_until_idle() == 1
    assert (await rig.one_delivery()).state == wpb.DELIVERY_STATE_DELIVERED
    assert len(receiver.received()) == 2


async def test_retry_after_as_an_http_date(rig: Rig, receiver: Receiver) -> None:
    from email.utils import format_datetime

    await exceeded_delivery(rig, receiver.url)
    when = rig.clock() + timedelta(minutes=2)
    receiver.reply(Reply(503, b"", {"retry-after": format_datetime(when, usegmt=True)}))
    await rig.dispatcher.run_until_idle()
    assert (await rig.one_delivery()).next_attempt_time.ToDatetime(UTC) == when


async def test_slow_receiver_times_out_and_is_retried(db_url: str, clock: object) -> None:
    from tests.webhooks.conftest import make_rig

    receiver = Receiver().start()
    receiver.reply(Reply(200, b"too late", delay_s=1.5))
    try:
        async with make_rig(db_url, clock, webhook_read_timeout_s=0.3) as rig:  # type: ignore[arg-type]
            await exceeded_delivery(rig, receiver.url)
            await rig.dispatcher.run_until_idle()
            d = await rig.one_delivery()
            assert (d.state, d.last_status_code, d.last_error) == (
                wpb.DELIVERY_STATE_PENDING,
                0,
                "read timeout (0.3s)",
            )
            assert d.attempts[0].duration_ms < 1400
            rig.clock.advance(timedelta(seconds=1))
            await rig.dispatcher.run_until_idle()
            d = await rig.one_delivery()
            assert (d.state, d.attempt_count) == (wpb.DELIVERY_STATE_DELIVERED, 2)
    finally:
        receiver.stop()


async def test_gives_up_after_max_attempts_and_stays_queryable(
    db_url: str, clock: object, receiver: Receiver
) -> None:
    from tests.webhooks.conftest import make_rig

    receiver.default = Reply(502, b"bad gateway")
    async with make_rig(db_url, clock, webhook_max_attempts=3) as rig:  # type: ignore[arg-type]
        await exceeded_delivery(rig, receiver.url)
        for _ in range(5):
            await rig.dispatcher.run_until_idle()
            rig.clock.advance(timedelta(seconds=8))
        d = await rig.one_delivery()
        assert (d.state, d.attempt_count, d.last_status_code) == (
            wpb.DELIVERY_STATE_FAILED,
            3,
            502,
        )
        assert d.last_error == "HTTP 502 (gave up after 3 attempts)"
        assert not d.HasField("next_attempt_time")
        assert [a.error for a in d.attempts] == ["HTTP 502"] * 3
        assert len(receiver.received()) == 3
        failed = await rig.deliveries(state=wpb.DELIVERY_STATE_FAILED)
        assert [f.id for f in failed] == [d.id]


async def test_gives_up_when_the_next_attempt_would_be_too_late(
    db_url: str, clock: object, receiver: Receiver
) -> None:
    from tests.webhooks.conftest import make_rig

    receiver.reply(Reply(503, b"", {"retry-after": "7200"}))
    async with make_rig(db_url, clock, webhook_max_age_hours=1.0) as rig:  # type: ignore[arg-type]
        await exceeded_delivery(rig, receiver.url)
        await rig.dispatcher.run_until_idle()
        d = await rig.one_delivery()
        assert d.state == wpb.DELIVERY_STATE_FAILED
        assert d.last_error == "HTTP 503 (gave up: not delivered within 1 hour)"


async def test_a_delivery_held_past_max_age_is_not_sent(
    db_url: str, clock: object, receiver: Receiver
) -> None:
    from google.protobuf.field_mask_pb2 import FieldMask

    from control_plane.api.webhooks import WebhookMerge
    from control_plane.webhooks.service import Secrets
    from tests.webhooks.conftest import make_rig

    async with make_rig(db_url, clock, webhook_max_age_hours=1.0) as rig:  # type: ignore[arg-type]
        await exceeded_delivery(rig, receiver.url)
        hook = (await rig.admin.list_webhooks(0, ""))[0][0]

        async def enable(on: bool) -> None:
            merge = WebhookMerge(wpb.Webhook(enabled=on), FieldMask(paths=["enabled"]))
            await rig.admin.update_webhook(hook.id, merge, Secrets(), "", "admin")

        await enable(False)  # a disabled webhook's deliveries wait
        assert await rig.dispatcher.run_until_idle() == 0
        rig.clock.advance(timedelta(hours=2))
        await enable(True)
        assert await rig.dispatcher.run_until_idle() == 1
        d = await rig.one_delivery()
        assert (d.state, d.last_error) == (
            wpb.DELIVERY_STATE_FAILED,
            "not sent: gave up: not delivered within 1 hour",
        )
        assert receiver.received() == []


# ---- which events, in which order --------------------------------------------------


async def test_one_batch_over_several_thresholds_emits_each_in_order(
    rig: Rig, receiver: Receiver
) -> None:
    await rig.webhook(receiver.url)
    policy = await rig.policy("10", thresholds=(80, 50, 100, 150), action=pb.ACTION_ALERT)
    await rig.spend(policy.id, 12 * USD)  # 120 %: jumps over 50, 80 and 100
    await rig.dispatcher.run_until_idle()
    got = [
        (r.json()["action"], r.json()["data"].get("threshold_percent")) for r in receiver.received()
    ]
    assert got == [
        ("threshold_crossed", 50),
        ("threshold_crossed", 80),
        ("threshold_crossed", 100),
        ("exceeded", None),
    ]
    # More spend in the same window: only the level not reached before.
    await rig.spend(policy.id, 1 * USD)
    await rig.spend(policy.id, 5 * USD)
    await rig.dispatcher.run_until_idle()
    assert [r.json()["data"].get("threshold_percent") for r in receiver.received()[4:]] == [150]
    # A new window starts from zero and alerts again.
    rig.clock.advance(timedelta(hours=1))
    await rig.spend(policy.id, 6 * USD)
    await rig.dispatcher.run_until_idle()
    assert [r.json()["data"].get("threshold_percent") for r in receiver.received()[5:]] == [50]


async def test_subscriptions_formats_and_disabled_webhooks(rig: Rig) -> None:
    generic, slack, off = Receiver().start(), Receiver().start(), Receiver().start()
    try:
        await rig.webhook(generic.url, events=[EXCEEDED])
        await rig.webhook(slack.url, format=wpb.WEBHOOK_FORMAT_SLACK)
        await rig.webhook(off.url, enabled=False)
        policy = await rig.policy("10", thresholds=(50,))
        await rig.spend(policy.id, 11 * USD)
        await rig.dispatcher.run_until_idle()
        assert [r.json()["action"] for r in generic.received()] == ["exceeded"]
        assert [r.json()["text"].split(":")[1] for r in slack.received()] == [
            "warning",
            "rotating_light",
        ]
        assert off.received() == []
        assert len(await rig.deliveries()) == 3
    finally:
        for r in (generic, slack, off):
            r.stop()


async def test_disabled_policies_emit_nothing(rig: Rig, receiver: Receiver) -> None:
    await rig.webhook(receiver.url)
    policy = await rig.policy("1")
    from google.protobuf.field_mask_pb2 import FieldMask

    from control_plane.api.budgets import mask_merger

    await rig.cp.update_policy(
        policy.id,
        mask_merger(pb.BudgetPolicy(enabled=False), FieldMask(paths=["enabled"])),
        "",
        "admin",
    )
    await rig.spend(policy.id, 5 * USD)
    assert await rig.dispatcher.run_until_idle() == 0
    assert await rig.deliveries() == []
