"""Queries over the webhook tables: webhooks, events, the delivery outbox and
attempts. Sessions are passed in; callers own the transaction.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import and_, delete, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from control_plane.store.models import (
    DeliveryAttemptRow,
    DeliveryRow,
    WebhookEventRow,
    WebhookRow,
)
from control_plane.store.repo import dialect_insert

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_id_lock = threading.Lock()
_last_id = 0
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def new_id(prefix: str) -> str:
    """prefix + 26 base32 characters, ordered by creation within this process
    (a monotonic ULID: same millisecond -> previous + 1)."""
    global _last_id
    with _id_lock:
        n = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
        if n >> 80 <= _last_id >> 80:
            n = _last_id + 1
        _last_id = n
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[n & 31])
        n >>= 5
    return prefix + "".join(reversed(chars))


# ---- webhooks ---------------------------------------------------------------


def get_webhook(session: Session, webhook_id: str) -> WebhookRow | None:
    return session.get(WebhookRow, webhook_id)


def list_webhooks(session: Session, *, after_id: str, limit: int) -> Sequence[WebhookRow]:
    q = select(WebhookRow).where(WebhookRow.id > after_id).order_by(WebhookRow.id).limit(limit)
    return session.scalars(q).all()


def enabled_webhooks(session: Session) -> Sequence[WebhookRow]:
    return session.scalars(
        select(WebhookRow).where(WebhookRow.enabled.is_(True)).order_by(WebhookRow.id)
    ).all()


def delete_webhook(session: Session, row: WebhookRow) -> None:
    ids = select(DeliveryRow.id).where(DeliveryRow.webhook_id == row.id)
    session.execute(delete(DeliveryAttemptRow).where(DeliveryAttemptRow.delivery_id.in_(ids)))
    session.execute(delete(DeliveryRow).where(DeliveryRow.webhook_id == row.id))
    session.delete(row)


# ---- events and the outbox ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventKey:
    policy_id: str
    member: str
    window_start: int
    kind: str
    threshold: int


def insert_event(
    session: Session,
    key: EventKey,
    *,
    event_id: str,
    window_end: int,
    data: dict[str, Any],
    now: datetime,
) -> bool:
    """Insert the event unless its key exists; True if this call inserted it.

    On PostgreSQL a concurrent transaction inserting the same key waits for
    this one and then finds the conflict, so exactly one of them creates it.
    """
    stmt = (
        dialect_insert(session, WebhookEventRow)
        .values(
            id=event_id,
            kind=key.kind,
            policy_id=key.policy_id,
            member=key.member,
            window_start=key.window_start,
            threshold=key.threshold,
            window_end=window_end,
            data=orjson.dumps(data).decode(),
            create_time=now,
        )
        .on_conflict_do_nothing(
            index_elements=["policy_id", "member", "window_start", "kind", "threshold"]
        )
        .returning(WebhookEventRow.id)
    )
    return session.execute(stmt).first() is not None


def event_id_of(session: Session, key: EventKey) -> str | None:
    return session.scalar(
        select(WebhookEventRow.id).where(
            WebhookEventRow.policy_id == key.policy_id,
            WebhookEventRow.member == key.member,
            WebhookEventRow.window_start == key.window_start,
            WebhookEventRow.kind == key.kind,
            WebhookEventRow.threshold == key.threshold,
        )
    )


def add_deliveries(
    session: Session, event_id: str, webhook_ids: Iterable[str], *, due: datetime, now: datetime
) -> int:
    """One pending delivery of the event per webhook (none twice); how many were new."""
    added = 0
    for webhook_id in webhook_ids:
        stmt = (
            dialect_insert(session, DeliveryRow)
            .values(
                id=new_id("msg_"),
                webhook_id=webhook_id,
                event_id=event_id,
                state=PENDING,
                attempts=0,
                next_attempt_at=due,
                claim_token="",
                last_status_code=0,
                last_error="",
                create_time=now,
            )
            .on_conflict_do_nothing(index_elements=["webhook_id", "event_id"])
            .returning(DeliveryRow.id)
        )
        added += session.execute(stmt).first() is not None
    return added


# ---- the dispatcher's side ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery this dispatcher holds until ``lease_until``."""

    delivery: DeliveryRow
    webhook: WebhookRow
    event: WebhookEventRow
    number: int  # the attempt about to be made (1-based)
    token: str


def claim_due(
    session: Session,
    *,
    now: datetime,
    lease_until: datetime,
    token: str,
    limit: int,
    busy_webhooks: Iterable[str] = (),
) -> list[Claimed]:
    """Claim the oldest due delivery of up to ``limit`` enabled webhooks.

    One per webhook so deliveries of a webhook go out in event order. On
    PostgreSQL rows another replica is claiming are skipped (FOR UPDATE SKIP
    LOCKED); the claim itself moves ``next_attempt_at`` to the end of the lease,
    so after commit nobody else finds the row due until the lease runs out.
    """
    busy = list(busy_webhooks)
    older = aliased(DeliveryRow)
    q = (
        select(DeliveryRow.id)
        .join(WebhookRow, WebhookRow.id == DeliveryRow.webhook_id)
        .where(
            DeliveryRow.state == PENDING,
            DeliveryRow.next_attempt_at <= now,
            WebhookRow.enabled.is_(True),
            ~exists().where(
                older.webhook_id == DeliveryRow.webhook_id,
                older.state == PENDING,
                older.next_attempt_at <= now,
                older.id < DeliveryRow.id,
            ),
        )
        .order_by(DeliveryRow.next_attempt_at, DeliveryRow.id)
        .limit(limit)
    )
    if busy:
        q = q.where(DeliveryRow.webhook_id.not_in(busy))
    if session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True, of=DeliveryRow)
    ids = list(session.scalars(q).all())
    if not ids:
        return []
    claimed_ids = session.scalars(
        update(DeliveryRow)
        .where(
            DeliveryRow.id.in_(ids),
            DeliveryRow.state == PENDING,
            DeliveryRow.next_attempt_at <= now,
        )
        .values(attempts=DeliveryRow.attempts + 1, claim_token=token, next_attempt_at=lease_until)
        .returning(DeliveryRow.id)
    ).all()
    rows = session.execute(
        select(DeliveryRow, WebhookRow, WebhookEventRow)
        .join(WebhookRow, WebhookRow.id == DeliveryRow.webhook_id)
        .join(WebhookEventRow, WebhookEventRow.id == DeliveryRow.event_id)
        .where(DeliveryRow.id.in_(claimed_ids))
        .order_by(DeliveryRow.id)
        .execution_options(populate_existing=True)
    ).all()
    return [Claimed(d, w, e, d.attempts, token) for d, w, e in rows]


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    start: datetime
    duration_ms: int
    status_code: int
    error: str
    excerpt: str


def record_attempt(
    session: Session,
    claimed: Claimed,
    attempt: AttemptRecord,
    *,
    state: str,
    next_attempt_at: datetime,
    delivery_error: str,
    finished: datetime,
) -> bool:
    """Store the attempt and the delivery's new state. False when the delivery
    is gone (its webhook was deleted meanwhile) or another dispatcher took it
    over after this one's lease ran out (then only the attempt is stored)."""
    mine = session.execute(
        update(DeliveryRow)
        .where(DeliveryRow.id == claimed.delivery.id, DeliveryRow.claim_token == claimed.token)
        .values(
            state=state,
            next_attempt_at=next_attempt_at,
            claim_token="",
            last_status_code=attempt.status_code,
            last_error=delivery_error,
            last_attempt_at=attempt.start,
            delivered_at=finished if state == DELIVERED else None,
        )
        .returning(DeliveryRow.id)
    ).first()
    if mine is None and session.get(DeliveryRow, claimed.delivery.id) is None:
        return False
    session.add(
        DeliveryAttemptRow(
            delivery_id=claimed.delivery.id,
            number=claimed.number,
            start_time=attempt.start,
            duration_ms=attempt.duration_ms,
            status_code=attempt.status_code,
            error=attempt.error,
            response_excerpt=attempt.excerpt,
        )
    )
    return mine is not None


def next_due(session: Session) -> datetime | None:
    """When the earliest pending delivery of an enabled webhook is due."""
    return session.scalar(
        select(func.min(DeliveryRow.next_attempt_at))
        .join(WebhookRow, WebhookRow.id == DeliveryRow.webhook_id)
        .where(DeliveryRow.state == PENDING, WebhookRow.enabled.is_(True))
    )


# ---- queries for the API --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryView:
    delivery: DeliveryRow
    event: WebhookEventRow
    attempts: list[DeliveryAttemptRow]


def list_deliveries(
    session: Session,
    *,
    webhook_id: str,
    event_id: str,
    state: str,
    before_id: str,
    limit: int,
) -> list[DeliveryView]:
    """Newest first (ids are time-ordered), with every attempt."""
    q = select(DeliveryRow, WebhookEventRow).join(
        WebhookEventRow, WebhookEventRow.id == DeliveryRow.event_id
    )
    if webhook_id:
        q = q.where(DeliveryRow.webhook_id == webhook_id)
    if event_id:
        q = q.where(DeliveryRow.event_id == event_id)
    if state:
        q = q.where(DeliveryRow.state == state)
    if before_id:
        q = q.where(DeliveryRow.id < before_id)
    q = q.where(exists().where(WebhookRow.id == DeliveryRow.webhook_id))
    rows = session.execute(q.order_by(DeliveryRow.id.desc()).limit(limit)).all()
    attempts: dict[str, list[DeliveryAttemptRow]] = {d.id: [] for d, _ in rows}
    if attempts:
        for a in session.scalars(
            select(DeliveryAttemptRow)
            .where(DeliveryAttemptRow.delivery_id.in_(list(attempts)))
            .order_by(DeliveryAttemptRow.delivery_id, DeliveryAttemptRow.number)
        ):
            attempts[a.delivery_id].append(a)
    return [DeliveryView(d, e, attempts[d.id]) for d, e in rows]


def event_exists(session: Session, event_id: str) -> bool:
    return session.get(WebhookEventRow, event_id) is not None


def list_events(
    session: Session, *, policy_id: str, kinds: Sequence[str], before_id: str, limit: int
) -> Sequence[WebhookEventRow]:
    """Events of the given kinds, newest first (ids are time-ordered)."""
    q = select(WebhookEventRow).where(WebhookEventRow.kind.in_(list(kinds)))
    if policy_id:
        q = q.where(WebhookEventRow.policy_id == policy_id)
    if before_id:
        q = q.where(WebhookEventRow.id < before_id)
    return session.scalars(q.order_by(WebhookEventRow.id.desc()).limit(limit)).all()


# ---- retention ------------------------------------------------------------------


def forget(session: Session, *, finished_before: datetime, window_ended_before: int) -> int:
    """Delete finished deliveries (and their attempts) older than the cutoff,
    deliveries whose webhook is gone, and events whose window ended before
    ``window_ended_before`` and have no delivery left; how many rows."""
    finished = and_(
        DeliveryRow.state.in_((DELIVERED, FAILED)),
        func.coalesce(DeliveryRow.last_attempt_at, DeliveryRow.create_time) < finished_before,
    )
    orphan = ~exists().where(WebhookRow.id == DeliveryRow.webhook_id)
    gone = list(session.scalars(select(DeliveryRow.id).where(finished | orphan)).all())
    removed = 0
    for i in range(0, len(gone), 500):
        chunk = gone[i : i + 500]
        session.execute(delete(DeliveryAttemptRow).where(DeliveryAttemptRow.delivery_id.in_(chunk)))
        removed += len(
            session.scalars(
                delete(DeliveryRow).where(DeliveryRow.id.in_(chunk)).returning(DeliveryRow.id)
            ).all()
        )
    removed += len(
        session.scalars(
            delete(WebhookEventRow)
            .where(
                WebhookEventRow.window_end < window_ended_before,
                ~exists().where(DeliveryRow.event_id == WebhookEventRow.id),
            )
            .returning(WebhookEventRow.id)
        ).all()
    )
    return removed
