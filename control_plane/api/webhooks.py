"""WebhookService: thin async methods over control_plane.webhooks.service."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2
from google.protobuf.field_mask_pb2 import FieldMask

from control_plane.api.auth import AuthInterceptor
from control_plane.api.errors import check_id, unary
from control_plane.errors import InvalidArgument
from control_plane.webhooks.service import Secrets, WebhookAdmin
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.v1 import webhooks_pb2_grpc

WRITABLE_PATHS = frozenset(
    {
        "name",
        "description",
        "url",
        "format",
        "events",
        "secret",
        "routing_key",
        "pagerduty_severity",
        "resolve_on_reset",
        "enabled",
        "apply_marker",
    }
)
_WRITE_ONLY = ("secret", "routing_key")


class WebhookMerge:
    """Applies an update's field mask to the stored webhook (write-only
    fields are handled separately, see ``secrets_of``)."""

    def __init__(self, patch: wpb.Webhook, mask: FieldMask) -> None:
        bad = [p for p in mask.paths if p not in WRITABLE_PATHS]
        if bad:
            raise InvalidArgument.one(
                "update_mask",
                f"unknown or read-only path(s): {', '.join(bad)}; writable: "
                + ", ".join(sorted(WRITABLE_PATHS)),
            )
        self.patch = patch
        self.mask = mask

    def __call__(self, stored: wpb.Webhook) -> wpb.Webhook:
        if not self.mask.paths:
            return self.patch  # empty mask: replace every writable field
        merged = wpb.Webhook()
        merged.CopyFrom(stored)
        paths = [p for p in self.mask.paths if p not in _WRITE_ONLY]
        if paths:
            FieldMask(paths=paths).MergeMessage(
                self.patch, merged, replace_message_field=True, replace_repeated_field=True
            )
        return merged


def secrets_of(patch: wpb.Webhook, mask: FieldMask) -> Secrets:
    """None keeps the stored value: a write-only field changes when the mask
    names it (empty clears it), or with an empty mask when it is given."""
    paths = set(mask.paths)

    def pick(name: str) -> str | None:
        value: str = getattr(patch, name)
        if name in paths or (not paths and value):
            return value
        return None

    return Secrets(secret=pick("secret"), routing_key=pick("routing_key"))


class WebhookServicer(webhooks_pb2_grpc.WebhookServiceServicer):
    def __init__(self, admin: WebhookAdmin, auth: AuthInterceptor) -> None:
        self.admin = admin
        self.auth = auth

    @unary
    async def CreateWebhook(
        self, request: wpb.CreateWebhookRequest, context: grpc.aio.ServicerContext
    ) -> wpb.Webhook:
        if not request.HasField("webhook"):
            raise InvalidArgument.one("webhook", "is required")
        return await self.admin.create_webhook(request.webhook, self.auth.author(context))

    @unary
    async def GetWebhook(
        self, request: wpb.GetWebhookRequest, context: grpc.aio.ServicerContext
    ) -> wpb.Webhook:
        check_id("id", request.id)
        return await self.admin.get_webhook(request.id)

    @unary
    async def ListWebhooks(
        self, request: wpb.ListWebhooksRequest, context: grpc.aio.ServicerContext
    ) -> wpb.ListWebhooksResponse:
        webhooks, token = await self.admin.list_webhooks(request.page_size, request.page_token)
        return wpb.ListWebhooksResponse(webhooks=webhooks, next_page_token=token)

    @unary
    async def UpdateWebhook(
        self, request: wpb.UpdateWebhookRequest, context: grpc.aio.ServicerContext
    ) -> wpb.Webhook:
        check_id("webhook.id", request.webhook.id)
        merge = WebhookMerge(request.webhook, request.update_mask)
        return await self.admin.update_webhook(
            request.webhook.id,
            merge,
            secrets_of(request.webhook, request.update_mask),
            request.webhook.etag,
            self.auth.author(context),
        )

    @unary
    async def DeleteWebhook(
        self, request: wpb.DeleteWebhookRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        check_id("id", request.id)
        await self.admin.delete_webhook(request.id, request.etag, self.auth.author(context))
        return empty_pb2.Empty()

    @unary
    async def TestWebhook(
        self, request: wpb.TestWebhookRequest, context: grpc.aio.ServicerContext
    ) -> wpb.TestWebhookResponse:
        check_id("id", request.id)
        return await self.admin.test_webhook(request.id)

    @unary
    async def ListDeliveries(
        self, request: wpb.ListDeliveriesRequest, context: grpc.aio.ServicerContext
    ) -> wpb.ListDeliveriesResponse:
        check_id("webhook_id", request.webhook_id, required=False)
        check_id("event_id", request.event_id, required=False)
        deliveries, token = await self.admin.list_deliveries(request)
        return wpb.ListDeliveriesResponse(deliveries=deliveries, next_page_token=token)

    @unary
    async def ListEvents(
        self, request: wpb.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> wpb.ListEventsResponse:
        check_id("policy_id", request.policy_id, required=False)
        found, token = await self.admin.list_events(request)
        return wpb.ListEventsResponse(events=found, next_page_token=token)
