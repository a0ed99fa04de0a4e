"""Webhook admin use cases: one transaction each (over ControlPlane.run).

A URL is checked when written (scheme, credentials, literal addresses, and,
when the host resolves, every address it resolves to); a host that does not
resolve now is accepted and checked again before every attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control_plane import names
from control_plane.errors import EtagMismatch, FailedPrecondition, InvalidArgument, NotFound
from control_plane.keyring import Keyring, SecretUnreadable
from control_plane.service import ControlPlane, clamp_page_size
from control_plane.store import webhook_repo
from control_plane.store.models import WebhookRow
from control_plane.webhooks import convert, events, sealed
from control_plane.webhooks.formats import PAGERDUTY, Message, render, render_test_resolve
from control_plane.webhooks.sender import Sender
from control_plane.webhooks.ssrf import ResolveFailed, UrlBlocked, UrlPolicy
from spendgate.domain.webhook_urls import MASK
from spendgate.v1 import webhooks_pb2 as wpb

log = structlog.get_logger("spendgate.webhooks")


@dataclass(frozen=True, slots=True)
class Secrets:
    """Write-only fields of an update: None keeps the stored value."""

    secret: str | None = None
    routing_key: str | None = None


SECRETS_MARK = " secrets="


def stale_marker(marker: str) -> str:
    """``marker`` with its secrets fingerprint replaced by "changed": the
    secrets were changed by another writer than `spendgate apply`, so the
    next apply writes its own again."""
    return marker.partition(SECRETS_MARK)[0] + SECRETS_MARK + "changed"


class WebhookAdmin:
    def __init__(
        self, cp: ControlPlane, url_policy: UrlPolicy, sender: Sender, keyring: Keyring | None
    ) -> None:
        """``keyring`` seals the secret columns (None: no key configured, so
        no webhook can be written)."""
        self.cp = cp
        self.url_policy = url_policy
        self.sender = sender
        self.keyring = keyring

    async def _check_resolved(self, url: str) -> None:
        try:
            await self.url_policy.addresses(url, self.sender.resolver)
        except UrlBlocked as e:
            raise InvalidArgument.one("url", str(e)) from None
        except ResolveFailed:
            pass  # checked again before every attempt

    async def create_webhook(self, msg: wpb.Webhook, author: str) -> wpb.Webhook:
        values = convert.webhook_values(
            msg, url_policy=self.url_policy, secret=msg.secret, routing_key=msg.routing_key
        )
        await self._check_resolved(values.url)
        now = self.cp.clock()

        def create(s: Session) -> WebhookRow:
            row = WebhookRow(
                id=webhook_repo.new_id("wh_"),
                create_time=now,
                update_time=now,
                created_by=author,
                updated_by=author,
                version=1,
            )
            convert.apply_values(row, values, self.keyring)
            names.check_free(s, WebhookRow, "webhook", row.name, row.id)
            s.add(row)
            return row

        try:
            row = await self.cp.run(create)
        except IntegrityError:
            raise names.taken("webhook", values.name) from None
        log.info("webhook created", webhook_id=row.id, format=row.format, author=author)
        return convert.webhook_message(row)

    async def get_webhook(self, webhook_id: str) -> wpb.Webhook:
        row = await self.cp.run(lambda s: webhook_repo.get_webhook(s, webhook_id))
        if row is None:
            raise NotFound("webhook", webhook_id)
        return convert.webhook_message(row)

    async def list_webhooks(self, page_size: int, page_token: str) -> tuple[list[wpb.Webhook], str]:
        limit = clamp_page_size(page_size, default=50)
        tokens = await self.cp.page_tokens()
        after = tokens.decode("webhooks", page_token, 1)[0] if page_token else ""
        rows = await self.cp.run(
            lambda s: webhook_repo.list_webhooks(s, after_id=after, limit=limit + 1)
        )
        page = rows[:limit]
        token = tokens.encode("webhooks", page[-1].id) if len(rows) > limit else ""
        return [convert.webhook_message(r) for r in page], token

    async def update_webhook(
        self,
        webhook_id: str,
        merge: Callable[[wpb.Webhook], wpb.Webhook],
        secrets: Secrets,
        expected_etag: str,
        author: str,
    ) -> wpb.Webhook:
        """Read, merge, validate and write in one transaction (row locked)."""
        now = self.cp.clock()
        checked: set[str] = set()
        wanted = {"name": ""}  # the name written, for a concurrent writer's error

        def update(s: Session) -> WebhookRow | str:
            row = s.get(WebhookRow, webhook_id, with_for_update=True)
            if row is None:
                raise NotFound("webhook", webhook_id)
            if expected_etag and expected_etag != convert.etag(row):
                raise EtagMismatch(webhook_id, "webhook")
            merged = merge(convert.webhook_message(row))
            # The masked form sent back means "unchanged"; a URL with nothing
            # masked is its own full form (and needs no decryption).
            shown = convert.shown_url(row)
            url_kept = merged.url == shown and MASK in shown
            if url_kept:
                merged.url = self._kept(row, "url")
            values = convert.webhook_values(
                merged,
                url_policy=self.url_policy,
                secret=self._kept(row, "secret") if secrets.secret is None else secrets.secret,
                routing_key=self._kept(row, "routing_key")
                if secrets.routing_key is None
                else secrets.routing_key,
            )
            if not url_kept and values.url not in checked:
                return values.url  # resolve outside the transaction, then again
            if values.apply_marker == row.apply_marker and self._secrets_changed(row, values):
                values = replace(values, apply_marker=stale_marker(row.apply_marker))
            convert.apply_values(row, values, self.keyring)
            wanted["name"] = row.name
            names.check_free(s, WebhookRow, "webhook", row.name, row.id)
            row.update_time = now
            row.updated_by = author
            row.version += 1
            return row

        while True:
            try:
                result = await self.cp.run(update)
            except IntegrityError:
                raise names.taken("webhook", wanted["name"]) from None
            if isinstance(result, WebhookRow):
                break
            await self._check_resolved(result)
            checked.add(result)
        log.info("webhook updated", webhook_id=webhook_id, author=author, version=result.version)
        return convert.webhook_message(result)

    def _secrets_changed(self, row: WebhookRow, values: convert.WebhookValues) -> bool:
        """Whether an update changes a secret column of a webhook whose apply
        marker carries a fingerprint of the secrets `spendgate apply` wrote."""
        if SECRETS_MARK not in row.apply_marker:
            return False
        return any(getattr(values, c) != self._kept(row, c) for c in sealed.COLUMNS)

    def _kept(self, row: WebhookRow, column: str) -> str:
        """A stored secret an update keeps (opened to validate and re-seal it)."""
        try:
            return sealed.unseal(self.keyring, column, row.id, getattr(row, column))
        except SecretUnreadable as e:
            raise FailedPrecondition(
                f"the stored {column} of webhook {row.id} cannot be read ({e}); "
                f"set {column} in this update, or configure the key"
            ) from None

    async def delete_webhook(self, webhook_id: str, expected_etag: str, author: str) -> None:
        def delete(s: Session) -> None:
            row = s.get(WebhookRow, webhook_id, with_for_update=True)
            if row is None:
                raise NotFound("webhook", webhook_id)
            if expected_etag and expected_etag != convert.etag(row):
                raise EtagMismatch(webhook_id, "webhook")
            webhook_repo.delete_webhook(s, row)

        await self.cp.run(delete)
        log.info("webhook deleted", webhook_id=webhook_id, author=author)

    async def test_webhook(self, webhook_id: str) -> wpb.TestWebhookResponse:
        """Send a test event now; PagerDuty's test incident is resolved at once."""
        row = await self.cp.run(lambda s: webhook_repo.get_webhook(s, webhook_id))
        if row is None:
            raise NotFound("webhook", webhook_id)
        now = self.cp.clock()
        message = Message(
            webhook_repo.new_id("msg_"),
            events.TEST,
            {
                "webhook_id": row.id,
                "webhook_name": row.name,
                "message": "spendgate test event: this webhook is reachable",
            },
            now,
        )
        try:
            receiver = convert.receiver(row, self.keyring)
        except SecretUnreadable as e:
            raise FailedPrecondition(f"webhook {row.id} cannot be sent: {e}") from None
        out = render(receiver, message, now)
        result = await self.sender.send(out, now)
        if row.format == PAGERDUTY and result.delivered:
            await self.sender.send(render_test_resolve(receiver, message, now), now)
        log.info(
            "webhook tested",
            webhook_id=row.id,
            status_code=result.status_code,
            delivered=result.delivered,
            error=result.error,
        )
        return wpb.TestWebhookResponse(
            delivered=result.delivered,
            status_code=result.status_code,
            error=result.error,
            response_excerpt=result.excerpt,
            duration_ms=result.duration_ms,
        )

    async def list_deliveries(
        self, req: wpb.ListDeliveriesRequest
    ) -> tuple[list[wpb.WebhookDelivery], str]:
        limit = clamp_page_size(req.page_size, default=50)
        tokens = await self.cp.page_tokens()
        before = tokens.decode("deliveries", req.page_token, 1)[0] if req.page_token else ""
        state = ""
        if req.state:
            if req.state not in convert.STATES:
                raise InvalidArgument.one("state", "is not a known delivery state")
            state = convert.STATES[req.state]

        def query(s: Session) -> list[webhook_repo.DeliveryView]:
            if req.webhook_id and webhook_repo.get_webhook(s, req.webhook_id) is None:
                raise NotFound("webhook", req.webhook_id)
            if req.event_id and not webhook_repo.event_exists(s, req.event_id):
                raise NotFound("event", req.event_id)
            return webhook_repo.list_deliveries(
                s,
                webhook_id=req.webhook_id,
                event_id=req.event_id,
                state=state,
                before_id=before,
                limit=limit + 1,
            )

        views = await self.cp.run(query)
        page = views[:limit]
        token = tokens.encode("deliveries", page[-1].delivery.id) if len(views) > limit else ""
        return [convert.delivery_message(v) for v in page], token

    async def list_events(self, req: wpb.ListEventsRequest) -> tuple[list[wpb.BudgetEvent], str]:
        limit = clamp_page_size(req.page_size, default=50)
        tokens = await self.cp.page_tokens()
        before = tokens.decode("events", req.page_token, 1)[0] if req.page_token else ""
        if req.type and req.type not in events.SUBSCRIBABLE:
            raise InvalidArgument.one("type", f"must be one of {', '.join(events.SUBSCRIBABLE)}")
        kinds = (req.type,) if req.type else events.SUBSCRIBABLE
        rows = await self.cp.run(
            lambda s: webhook_repo.list_events(
                s, policy_id=req.policy_id, kinds=kinds, before_id=before, limit=limit + 1
            )
        )
        page = rows[:limit]
        token = tokens.encode("events", page[-1].id) if len(rows) > limit else ""
        return [convert.event_message(r) for r in page], token
