"""WebhookService through a real grpc.aio ControlPlaneServer: standard
methods, validation with field violations, write-only secrets, roles,
TestWebhook and ListDeliveries. SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook as StandardWebhook

from control_plane.store.models import WebhookRow
from control_plane.webhooks import convert, formats
from control_plane.webhooks.signing import new_secret
from spendgate.v1 import webhooks_pb2 as wpb
from tests.harness import ADMIN_TOKEN, READ_TOKEN, bearer, wait_until
from tests.webhooks.conftest import USD, Api
from tests.webhooks.receiver import Receiver, Reply

ADMIN = bearer(ADMIN_TOKEN)
READ = bearer(READ_TOKEN)
SLACK_URL = "https://hooks.slack.com/services/T0001/B0001/s3cr3tT0k3nV4lu3"


def call(method: Callable[..., Any], request: Any, metadata: Any = ADMIN) -> Any:
    return method(request, metadata=metadata, timeout=10)


def rpc_error(method: Callable[..., Any], request: Any, metadata: Any = ADMIN) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(method, request, metadata)
    return e.value


def violations(err: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    out: dict[str, str] = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        out.update({v.field: v.description for v in bad.field_violations})
    return out


def create(api: Api, **fields: Any) -> wpb.Webhook:
    fields.setdefault("name", f"ops-{uuid.uuid4().hex[:8]}")  # names are unique
    fields.setdefault("format", wpb.WEBHOOK_FORMAT_GENERIC)
    return call(api.webhooks.CreateWebhook, wpb.CreateWebhookRequest(webhook=wpb.Webhook(**fields)))


def stored(api: Api, webhook_id: str) -> formats.Receiver:
    """The webhook as the store keeps it, its secrets opened with the server's key."""
    with Session(api.server.engine) as s:
        row = s.scalar(select(WebhookRow).where(WebhookRow.id == webhook_id))
        assert row is not None
        return convert.receiver(row, api.server.keyring)


def test_create_get_list_and_secrets_are_write_only(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = new_secret()
    key = "R0123456789abcdef0123456789abcde"
    generic = create(api, name="ops", url="https://93.184.216.34/hook?token=abc&v=1", secret=secret)
    pager = create(
        api,
        name="oncall",
        format=wpb.WEBHOOK_FORMAT_PAGERDUTY,
        routing_key=key,
        pagerduty_severity=wpb.PAGER_DUTY_SEVERITY_WARNING,
    )
    slack = create(api, name="chat", format=wpb.WEBHOOK_FORMAT_SLACK, url=SLACK_URL)
    assert generic.id.startswith("wh_") and len(generic.id) == 29
    expected = wpb.Webhook(
        id=generic.id,
        name="ops",
        url="https://93.184.216.34/hook?token=****&v=****",
        format=wpb.WEBHOOK_FORMAT_GENERIC,
        events=["budget_policy.exceeded", "budget_policy.threshold_crossed"],
        has_secret=True,
        pagerduty_severity=wpb.PAGER_DUTY_SEVERITY_ERROR,
        resolve_on_reset=True,
        enabled=True,
        create_time=generic.create_time,
        update_time=generic.create_time,
        created_by="admin",
        updated_by="admin",
        etag="v1",
    )
    assert generic == expected
    assert generic.create_time.ToDatetime().replace(tzinfo=api.clock().tzinfo) == api.clock()
    assert (pager.url, pager.has_routing_key, pager.routing_key, pager.pagerduty_severity) == (
        "https://events.pagerduty.com/v2/enqueue",
        True,
        "",
        wpb.PAGER_DUTY_SEVERITY_WARNING,
    )
    assert slack.url == "https://hooks.slack.com/services/T0001/B0001/****"
    got = call(api.webhooks.GetWebhook, wpb.GetWebhookRequest(id=generic.id), READ)
    assert got == generic
    listed = call(api.webhooks.ListWebhooks, wpb.ListWebhooksRequest(), READ)
    assert [w.id for w in listed.webhooks] == [generic.id, pager.id, slack.id]
    # No response and no log line carries a secret.
    everything = b"".join(m.SerializeToString() for m in (generic, pager, slack, got, listed))
    out = capsys.readouterr()
    for value in (secret, secret.removeprefix("whsec_"), key, "s3cr3tT0k3nV4lu3", "token=abc"):
        assert value.encode() not in everything
        assert value not in out.out + out.err
    # ... but the store keeps what signing and PagerDuty need.
    assert (stored(api, generic.id).secret, stored(api, pager.id).routing_key) == (secret, key)
    assert stored(api, slack.id).url == SLACK_URL


def test_every_bad_field_is_named(api: Api) -> None:
    err = rpc_error(
        api.webhooks.CreateWebhook,
        wpb.CreateWebhookRequest(
            webhook=wpb.Webhook(
                url="ftp://example.com/x",
                events=["budget_policy.exceeded", "budget_policy.deleted"],
                secret="not-a-secret",
                routing_key="r k",
            )
        ),
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err) == {
        "name": "is required",
        "format": "is required: GENERIC, SLACK or PAGERDUTY",
        "url": "must be an https:// URL",
        "events[1]": "must be one of budget_policy.exceeded, budget_policy.threshold_crossed, "
        "usage.anomaly, budget_policy.would_reject, budget_policy.forecast",
        "secret": 'must start with "whsec_" (e.g. from `spendgate webhook create`)',
        "routing_key": "must be 1 to 200 letters, digits or - _ . :",
    }
    cases: list[tuple[dict[str, Any], dict[str, str]]] = [
        (
            {"url": "https://x.test/", "secret": "whsec_abc"},
            {"secret": 'must be "whsec_" followed by standard base64'},
        ),
        (
            {"format": wpb.WEBHOOK_FORMAT_SLACK, "url": SLACK_URL, "secret": new_secret()},
            {"secret": "only GENERIC webhooks are signed"},
        ),
        (
            {"format": wpb.WEBHOOK_FORMAT_PAGERDUTY},
            {"routing_key": "is required for PAGERDUTY webhooks"},
        ),
        (
            {"format": wpb.WEBHOOK_FORMAT_PAGERDUTY, "routing_key": "bad key!"},
            {"routing_key": "must be 1 to 200 letters, digits or - _ . :"},
        ),
        (
            {"url": "https://10.0.0.1/hook"},
            {
                "url": "10.0.0.1 is not a public address (allow it with "
                "webhook_allow_private_ranges or webhook_allow_hosts)"
            },
        ),
        ({"url": "https://u:p@x.test/"}, {"url": "must not contain a user name or password"}),
    ]
    for fields, expected in cases:
        fields.setdefault("name", "n")
        fields.setdefault("format", wpb.WEBHOOK_FORMAT_GENERIC)
        err = rpc_error(
            api.webhooks.CreateWebhook, wpb.CreateWebhookRequest(webhook=wpb.Webhook(**fields))
        )
        assert violations(err) == expected, fields
    assert call(api.webhooks.ListWebhooks, wpb.ListWebhooksRequest()).webhooks == []


def test_host_resolving_to_a_private_address_is_refused(db_url: str, clock: Any) -> None:
    from tests.webhooks.conftest import running_api

    async def resolve(host: str, port: int) -> list[str]:
        return {"internal.test": ["192.168.1.20"], "public.test": ["93.184.216.34"]}[host]

    with running_api(db_url, clock, resolver=resolve) as api:
        err = rpc_error(
            api.webhooks.CreateWebhook,
            wpb.CreateWebhookRequest(
                webhook=wpb.Webhook(
                    name="n", format=wpb.WEBHOOK_FORMAT_GENERIC, url="https://internal.test/x"
                )
            ),
        )
        assert violations(err) == {
            "url": "internal.test resolves to 192.168.1.20, which is not a public address "
            "(allow it with webhook_allow_private_ranges or webhook_allow_hosts)"
        }
        hook = create(api, url="https://public.test/x")
        err = rpc_error(
            api.webhooks.UpdateWebhook,
            wpb.UpdateWebhookRequest(
                webhook=wpb.Webhook(id=hook.id, url="https://internal.test/y"),
                update_mask=FieldMask(paths=["url"]),
            ),
        )
        assert list(violations(err)) == ["url"]


def update(api: Api, webhook: wpb.Webhook, *paths: str) -> wpb.Webhook:
    return call(
        api.webhooks.UpdateWebhook,
        wpb.UpdateWebhookRequest(webhook=webhook, update_mask=FieldMask(paths=list(paths))),
    )


def test_update_mask_etag_and_write_only_fields(api: Api) -> None:
    secret = new_secret()
    hook = create(api, name="chat", format=wpb.WEBHOOK_FORMAT_SLACK, url=SLACK_URL)
    renamed = update(api, wpb.Webhook(id=hook.id, name="chat-2"), "name")
    assert (renamed.name, renamed.etag, renamed.url) == ("chat-2", "v2", hook.url)
    assert stored(api, hook.id).url == SLACK_URL  # the masked form did not replace it
    # Empty mask: every field replaced; the masked URL sent back keeps the URL.
    full = wpb.Webhook()
    full.CopyFrom(renamed)
    full.events[:] = ["budget_policy.exceeded"]
    replaced = update(api, full)
    assert (list(replaced.events), replaced.url) == (["budget_policy.exceeded"], renamed.url)
    assert stored(api, hook.id).url == SLACK_URL
    # Stale etag.
    err = rpc_error(
        api.webhooks.UpdateWebhook,
        wpb.UpdateWebhookRequest(
            webhook=wpb.Webhook(id=hook.id, name="x", etag="v1"),
            update_mask=FieldMask(paths=["name"]),
        ),
    )
    assert err.code() == grpc.StatusCode.ABORTED
    assert "etag mismatch" in (err.details() or "")
    # Unknown path.
    err = rpc_error(
        api.webhooks.UpdateWebhook,
        wpb.UpdateWebhookRequest(
            webhook=wpb.Webhook(id=hook.id), update_mask=FieldMask(paths=["has_secret"])
        ),
    )
    assert list(violations(err)) == ["update_mask"]
    # Secrets: set when named, kept when not named, cleared with an empty value.
    generic = create(api, name="g", url="https://93.184.216.34/")
    with_secret = update(api, wpb.Webhook(id=generic.id, secret=secret), "secret")
    assert with_secret.has_secret and stored(api, generic.id).secret == secret
    kept = update(api, wpb.Webhook(id=generic.id, name="g2", secret=new_secret()), "name")
    assert kept.has_secret and stored(api, generic.id).secret == secret
    cleared = update(api, wpb.Webhook(id=generic.id), "secret")
    assert not cleared.has_secret and stored(api, generic.id).secret == ""
    # A change that makes the webhook invalid is refused whole.
    err = rpc_error(
        api.webhooks.UpdateWebhook,
        wpb.UpdateWebhookRequest(
            webhook=wpb.Webhook(id=generic.id, format=wpb.WEBHOOK_FORMAT_PAGERDUTY),
            update_mask=FieldMask(paths=["format"]),
        ),
    )
    assert violations(err) == {"routing_key": "is required for PAGERDUTY webhooks"}
    assert stored(api, generic.id).format == "generic"


def test_unknown_ids_and_roles(api: Api, receiver: Receiver) -> None:
    for method, request in [
        (api.webhooks.GetWebhook, wpb.GetWebhookRequest(id="wh_nope")),
        (api.webhooks.DeleteWebhook, wpb.DeleteWebhookRequest(id="wh_nope")),
        (api.webhooks.TestWebhook, wpb.TestWebhookRequest(id="wh_nope")),
        (
            api.webhooks.UpdateWebhook,
            wpb.UpdateWebhookRequest(webhook=wpb.Webhook(id="wh_nope", name="x")),
        ),
        (api.webhooks.ListDeliveries, wpb.ListDeliveriesRequest(webhook_id="wh_nope")),
        (api.webhooks.ListDeliveries, wpb.ListDeliveriesRequest(event_id="evt_nope")),
    ]:
        err = rpc_error(method, request)
        assert err.code() == grpc.StatusCode.NOT_FOUND, method
    assert "webhook 'wh_nope' not found" in (
        rpc_error(api.webhooks.GetWebhook, wpb.GetWebhookRequest(id="wh_nope")).details() or ""
    )
    hook = create(api, url=receiver.url)
    # The read-only token reads; only the admin token writes or sends tests.
    call(api.webhooks.GetWebhook, wpb.GetWebhookRequest(id=hook.id), READ)
    call(api.webhooks.ListDeliveries, wpb.ListDeliveriesRequest(), READ)
    for method, request in [
        (api.webhooks.CreateWebhook, wpb.CreateWebhookRequest(webhook=hook)),
        (api.webhooks.UpdateWebhook, wpb.UpdateWebhookRequest(webhook=hook)),
        (api.webhooks.DeleteWebhook, wpb.DeleteWebhookRequest(id=hook.id)),
        (api.webhooks.TestWebhook, wpb.TestWebhookRequest(id=hook.id)),
    ]:
        assert rpc_error(method, request, READ).code() == grpc.StatusCode.PERMISSION_DENIED
    err = rpc_error(api.webhooks.ListWebhooks, wpb.ListWebhooksRequest(), ())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert receiver.received() == []
    health = health_pb2_grpc.HealthStub(api.channel)
    resp = health.Check(
        health_pb2.HealthCheckRequest(service="spendgate.v1.WebhookService"), timeout=10
    )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_test_webhook_sends_a_signed_event_and_reports_the_answer(
    api: Api, receiver: Receiver
) -> None:
    secret = new_secret()
    hook = create(api, name="ops", url=receiver.url, secret=secret)
    resp = call(api.webhooks.TestWebhook, wpb.TestWebhookRequest(id=hook.id))
    assert (resp.delivered, resp.status_code, resp.error, resp.response_excerpt) == (
        True,
        200,
        "",
        "ok",
    )
    (got,) = receiver.received()
    body = StandardWebhook(secret).verify(got.body, got.headers)
    assert body["entity"] == "webhook" and body["action"] == "test"
    assert body["data"] == {
        "webhook_id": hook.id,
        "webhook_name": "ops",
        "message": "spendgate test event: this webhook is reachable",
    }
    receiver.reply(Reply(500, b"nope"))
    resp = call(api.webhooks.TestWebhook, wpb.TestWebhookRequest(id=hook.id))
    assert (resp.delivered, resp.status_code, resp.error, resp.response_excerpt) == (
        False,
        500,
        "HTTP 500",
        "nope",
    )
    # Tests are not deliveries.
    assert api.deliveries() == []


def test_test_webhook_pagerduty_triggers_then_resolves(api: Api, receiver: Receiver) -> None:
    hook = create(
        api,
        format=wpb.WEBHOOK_FORMAT_PAGERDUTY,
        url=receiver.url,
        routing_key="R0123456789abcdef0123456789abcde",
    )
    assert call(api.webhooks.TestWebhook, wpb.TestWebhookRequest(id=hook.id)).delivered
    trigger, resolve = (r.json() for r in receiver.wait_for(2))
    assert trigger["event_action"] == "trigger"
    assert trigger["payload"]["severity"] == "info"
    assert resolve == {
        "routing_key": "R0123456789abcdef0123456789abcde",
        "event_action": "resolve",
        "dedup_key": trigger["dedup_key"],
    }


def test_list_deliveries_filters_and_pages(api: Api, receiver: Receiver) -> None:
    a = create(api, name="a", url=receiver.url)
    b = create(api, name="b", url=receiver.url, events=["budget_policy.exceeded"])
    policy = api.policy("10", alert_thresholds=[50])
    api.report(policy.id, 6 * USD)
    api.report(policy.id, 5 * USD)
    wait_until(
        lambda: len(api.deliveries(state=wpb.DELIVERY_STATE_DELIVERED)) == 3,
        message="three deliveries",
    )
    everything = api.deliveries()
    # Newest first: the exceeded event (to a and b), then the 50 % one (to a).
    assert [(d.webhook_id, d.event.type) for d in everything] == [
        (b.id, "budget_policy.exceeded"),
        (a.id, "budget_policy.exceeded"),
        (a.id, "budget_policy.threshold_crossed"),
    ]
    exceeded = everything[0].event
    assert (exceeded.policy_id, exceeded.policy_name, exceeded.spent_usd, exceeded.amount_usd) == (
        policy.id,
        "api budget",
        "11.00",
        "10.00",
    )
    assert everything[2].event.threshold_percent == 50
    assert [d.webhook_id for d in api.deliveries(event_id=exceeded.id)] == [b.id, a.id]
    assert [d.event.type for d in api.deliveries(webhook_id=b.id)] == ["budget_policy.exceeded"]
    assert api.deliveries(state=wpb.DELIVERY_STATE_FAILED) == []
    pages: list[str] = []
    token = ""
    while True:
        resp = call(
            api.webhooks.ListDeliveries,
            wpb.ListDeliveriesRequest(page_size=1, page_token=token),
            READ,
        )
        pages += [d.id for d in resp.deliveries]
        token = resp.next_page_token
        if not token:
            break
    assert pages == [d.id for d in everything]
    err = rpc_error(api.webhooks.ListDeliveries, wpb.ListDeliveriesRequest(page_token="zz"))
    assert list(violations(err)) == ["page_token"]
    # Deleting a webhook deletes its deliveries.
    call(api.webhooks.DeleteWebhook, wpb.DeleteWebhookRequest(id=b.id))
    assert [d.webhook_id for d in api.deliveries()] == [a.id, a.id]
    got = [(r.json()["action"], r.json()["data"]["event_id"]) for r in receiver.received()]
    assert sorted(got) == sorted(
        [("threshold_crossed", everything[2].event.id)] + [("exceeded", exceeded.id)] * 2
    )


def test_secret_base64_must_be_standard(api: Api) -> None:
    urlsafe = "whsec_" + base64.urlsafe_b64encode(b"\xfb" * 32).decode()
    err = rpc_error(
        api.webhooks.CreateWebhook,
        wpb.CreateWebhookRequest(
            webhook=wpb.Webhook(
                name="n", format=wpb.WEBHOOK_FORMAT_GENERIC, url="https://x.test/", secret=urlsafe
            )
        ),
    )
    assert list(violations(err)) == ["secret"]


def test_names_are_unique(api: Api) -> None:
    first = create(api, name="ops", url="https://93.184.216.34/a")
    err = rpc_error(
        api.webhooks.CreateWebhook,
        wpb.CreateWebhookRequest(
            webhook=wpb.Webhook(
                name="ops", format=wpb.WEBHOOK_FORMAT_GENERIC, url="https://93.184.216.34/b"
            )
        ),
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.details() == f"name: a webhook named 'ops' already exists ({first.id})"
    other = create(api, name="other", url="https://93.184.216.34/c")
    rename = wpb.UpdateWebhookRequest(
        webhook=wpb.Webhook(id=other.id, name="ops"), update_mask=FieldMask(paths=["name"])
    )
    err = rpc_error(api.webhooks.UpdateWebhook, rename)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "name: " in err.details()
