"""Names unique per kind (policies, webhooks) and the `spendgate apply`
marker: checks shared by the services that write them.

The check in the transaction gives the clear answer (which object has the
name); the unique index (migration 0015) is the backstop when two writers
race, mapped to the same error by ``taken``.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from control_plane.errors import AlreadyExists
from control_plane.store.models import PolicyRow, WebhookRow
from spendgate.domain.limits import MAX_APPLY_MARKER_CHARS
from spendgate.domain.policies import FieldViolation, text_violations

Named = type[PolicyRow] | type[WebhookRow]


def check_free(s: Session, model: Named, kind: str, name: str, own_id: str) -> None:
    """AlreadyExists when another ``kind`` than ``own_id`` is named ``name``."""
    with s.no_autoflush:  # the row being written must not hit the index first
        other = s.scalars(select(model.id).where(model.name == name, model.id != own_id)).first()
    if other is not None:
        raise AlreadyExists("name", f"a {kind} named {name!r} already exists ({other})")


def taken(kind: str, name: str) -> AlreadyExists:
    """The error for a unique-index violation on the name (a concurrent writer)."""
    return AlreadyExists("name", f"a {kind} named {name!r} already exists")


def marker_violations(field: str, value: str) -> list[FieldViolation]:
    return text_violations(field, value, MAX_APPLY_MARKER_CHARS)
