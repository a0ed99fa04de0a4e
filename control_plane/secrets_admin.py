"""Secrets at rest, the use cases: what seals the stored secrets, their
re-encryption under the current key (``spendgate secrets rotate``), and the
start-up check.

Rotation is an admin API call, so it works the same with one SQLite process
or many replicas on PostgreSQL: the replica that serves it re-encrypts, in
short transactions of ``BATCH`` webhooks each, with the rows locked
(``FOR UPDATE``) so a concurrent update of the same webhook waits instead of
being overwritten. It uses that replica's current key: run it once every
replica has the new key first in its key list (otherwise a replica still
writing under the old key leaves values to rotate; ``GetSecretsStatus``
shows them, and running it again picks them up).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from control_plane.errors import FailedPrecondition
from control_plane.keyring import (
    CLEAR,
    KEY_SETTINGS,
    Keyring,
    SecretsKeyRequired,
    SecretUnreadable,
    stored_key_id,
)
from control_plane.service import ControlPlane
from control_plane.store.models import WebhookRow
from control_plane.webhooks import sealed
from spendgate.domain.webhook_urls import masked_url

log = structlog.get_logger("spendgate.control_plane")
BATCH = 200


@dataclass(frozen=True, slots=True)
class Unreadable:
    webhook_id: str
    field: str
    reason: str


@dataclass(slots=True)
class RotationResult:
    current_key_id: str
    rotated: int = 0
    unchanged: int = 0
    unreadable: list[Unreadable] = field(default_factory=list)


def stored_key_ids(session: Session) -> Counter[str]:
    """How many stored (non-empty) secret values each key id seals."""
    counts: Counter[str] = Counter()
    for column in sealed.COLUMNS:
        col = getattr(WebhookRow, column)
        for value in session.scalars(select(col).where(col != "")):
            counts[stored_key_id(value)] += 1
    return counts


def rotate_batch(
    session: Session, keyring: Keyring, after_id: str
) -> tuple[str | None, RotationResult]:
    """Re-seal the secrets of up to BATCH webhooks after ``after_id`` under
    the current key: the last id handled (None: none left) and what was done."""
    result = RotationResult(keyring.current_id)
    q = select(WebhookRow).where(WebhookRow.id > after_id).order_by(WebhookRow.id).limit(BATCH)
    if session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update()
    rows = session.scalars(q).all()
    for row in rows:
        for column in sealed.COLUMNS:
            stored = getattr(row, column)
            if not keyring.needs_rotation(stored):
                result.unchanged += bool(stored)
                continue
            try:
                plain = sealed.unseal(keyring, column, row.id, stored)
            except SecretUnreadable as e:
                result.unreadable.append(Unreadable(row.id, column, str(e)))
                continue
            setattr(row, column, sealed.seal(keyring, column, row.id, plain))
            if column == "url":  # a clear URL may come from an earlier release's replica
                row.url_masked = masked_url(plain)
            result.rotated += 1
    return (rows[-1].id if rows else None), result


class SecretsAdmin:
    def __init__(self, cp: ControlPlane, keyring: Keyring | None) -> None:
        self.cp = cp
        self.keyring = keyring

    async def status(self) -> tuple[Keyring | None, Counter[str]]:
        return self.keyring, await self.cp.run(stored_key_ids)

    async def rotate(self) -> RotationResult:
        keyring = self.keyring
        if keyring is None:
            raise FailedPrecondition(f"no key is configured to rotate to: set {KEY_SETTINGS}")
        result = RotationResult(keyring.current_id)
        after = ""
        while True:

            def rotate_secrets(s: Session, start: str = after) -> tuple[str | None, RotationResult]:
                return rotate_batch(s, keyring, start)

            last, part = await self.cp.run(rotate_secrets)
            result.rotated += part.rotated
            result.unchanged += part.unchanged
            result.unreadable += part.unreadable
            if last is None:
                break
            after = last
        log.info(
            "stored secrets rotated",
            current_key_id=result.current_key_id,
            rotated=result.rotated,
            unchanged=result.unchanged,
            unreadable=len(result.unreadable),
        )
        return result


async def check_stored_secrets(cp: ControlPlane, keyring: Keyring | None) -> None:
    """At start: refuse to run without a key when webhooks are stored (none
    could be sent); log an error for values under keys not configured."""
    counts = await cp.run(stored_key_ids)
    sealed_count = sum(n for kid, n in counts.items() if kid != CLEAR)
    if keyring is None:
        if sealed_count:
            raise SecretsKeyRequired(
                f"the database holds {sealed_count} encrypted webhook secret(s) and no key "
                f"is configured: set {KEY_SETTINGS}"
            )
        return
    unknown = {kid: n for kid, n in counts.items() if kid != CLEAR and kid not in keyring.ids}
    if unknown:
        log.error(
            "stored webhook secrets are encrypted with keys this control plane does not "
            "have; their deliveries fail until the key is configured",
            unknown_key_ids=unknown,
            configured_key_ids=list(keyring.ids),
        )
    if counts.get(CLEAR):
        log.warning(
            "stored webhook secrets in clear (written by an earlier release); "
            "`spendgate secrets rotate` encrypts them",
            count=counts[CLEAR],
        )
