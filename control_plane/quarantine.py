"""Usage records that cannot be applied: quarantined, never blocking the rest.

Two sources end up in the ``quarantined_usage`` table:

* increments of a batch this control plane cannot store (a member longer
  than the ``window_spend.member`` column, a NUL character PostgreSQL refuses,
  a missing policy id, negative values): the rest of the batch is applied in
  the same transaction and the refused increments are recorded here;
* records a data plane could not send at all (larger than a message may be,
  not encodable), reported in ``ReportUsageRequest.quarantined``.

Either way the record's cost is in no window: an operator sees it in
``spendgate status`` (``BudgetService.ListQuarantinedUsage``) and corrects the
spend by hand if it should count. Records are kept ``RETENTION``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from control_plane.runtime import Runtime, clamp_page_size
from control_plane.store.models import QuarantinedUsageRow
from control_plane.store.webhook_repo import new_id
from spendgate.domain.pricing import MAX_COST_NANOS, format_usd
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp

# What window_spend can hold (its columns' sizes).
MAX_MEMBER = 512
MAX_POLICY_ID = 40
# How much of a member a quarantine record keeps (the hash names the rest).
SHOWN_MEMBER = 256
MAX_DETAIL = 1000
REASONS = ("too_large", "unencodable", "refused", "member_too_long", "invalid")
RETENTION = timedelta(days=30)


def storable(policy_id: str, member: str) -> tuple[str, str] | None:
    """None when a window key can be stored, else (reason, detail)."""
    if not policy_id:
        return "invalid", "policy_id is required"
    if len(policy_id) > MAX_POLICY_ID or "\x00" in policy_id:
        return "invalid", f"policy_id is not a policy id ({len(policy_id)} characters)"
    if len(member) > MAX_MEMBER:
        return (
            "member_too_long",
            f"member of {len(member)} characters; at most {MAX_MEMBER} can be stored",
        )
    if "\x00" in member:
        return "invalid", "member contains a NUL character"
    return None


def check_increment(inc: dp.SpendIncrement) -> tuple[str, str] | None:
    """None when the increment can be applied, else (reason, detail)."""
    if min(inc.cost_nanos, inc.request_count, inc.estimated_count, inc.would_reject_count) < 0:
        return "invalid", "cost and counts must be >= 0"
    return storable(inc.policy_id, inc.member)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n]


def _member_fields(member: str) -> tuple[str, int, str]:
    raw = member.encode("utf-8", "surrogatepass")
    return _clip(member, SHOWN_MEMBER), len(raw), hashlib.sha256(raw).hexdigest()


def from_increment(
    inc: dp.SpendIncrement,
    reason: str,
    detail: str,
    *,
    data_plane_id: str,
    batch_id: str,
    now: datetime,
) -> QuarantinedUsageRow:
    shown, size, digest = _member_fields(inc.member)
    return QuarantinedUsageRow(
        id=new_id("qu_"),
        reason=reason,
        detail=_clip(detail, MAX_DETAIL),
        data_plane_id=_clip(data_plane_id, 200),
        batch_id=batch_id,
        policy_id=_clip(inc.policy_id.replace("\x00", ""), 64),
        member=shown.replace("\x00", "\\x00"),
        member_bytes=size,
        member_sha256=digest,
        window_start=inc.window_start.seconds,
        cost_nanos=min(max(inc.cost_nanos, -MAX_COST_NANOS), MAX_COST_NANOS),
        request_count=inc.request_count,
        quarantine_time=now,
        create_time=now,
    )


def from_report(
    rec: dp.QuarantinedRecord, *, data_plane_id: str, batch_id: str, now: datetime
) -> QuarantinedUsageRow:
    """A record a data plane quarantined (it sent a truncated member and its hash)."""
    reason = rec.reason if rec.reason in REASONS else "refused"
    when = rec.quarantine_time.ToDatetime(tzinfo=now.tzinfo) if rec.quarantine_time.seconds else now
    return QuarantinedUsageRow(
        id=new_id("qu_"),
        reason=reason,
        detail=_clip(rec.detail, MAX_DETAIL).replace("\x00", ""),
        data_plane_id=_clip(data_plane_id, 200),
        batch_id=_clip(rec.batch_id or batch_id, 80).replace("\x00", ""),
        policy_id=_clip(rec.policy_id, 64).replace("\x00", ""),
        member=_clip(rec.member, SHOWN_MEMBER).replace("\x00", "\\x00"),
        member_bytes=max(rec.member_bytes, 0),
        member_sha256=_clip(rec.member_sha256, 64).replace("\x00", ""),
        window_start=rec.window_start.seconds,
        cost_nanos=max(rec.cost_nanos, 0),
        request_count=max(rec.request_count, 0),
        quarantine_time=when,
        create_time=now,
    )


def message(row: QuarantinedUsageRow) -> pb.QuarantinedUsage:
    return pb.QuarantinedUsage(
        id=row.id,
        reason=row.reason,
        detail=row.detail,
        data_plane_id=row.data_plane_id,
        batch_id=row.batch_id,
        policy_id=row.policy_id,
        member=row.member,
        member_bytes=row.member_bytes,
        member_sha256=row.member_sha256,
        window_start=timestamp(row.window_start),
        cost_usd=format_usd(row.cost_nanos).removeprefix("$"),
        request_count=row.request_count,
        quarantine_time=timestamp(row.quarantine_time),
    )


def page(session: Session, *, before_id: str, limit: int) -> Sequence[QuarantinedUsageRow]:
    """Newest first (ids are time-ordered)."""
    q = select(QuarantinedUsageRow)
    if before_id:
        q = q.where(QuarantinedUsageRow.id < before_id)
    return session.scalars(q.order_by(QuarantinedUsageRow.id.desc()).limit(limit)).all()


def count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(QuarantinedUsageRow)) or 0)


def forget(session: Session, *, before: datetime) -> int:
    result = session.execute(
        delete(QuarantinedUsageRow).where(QuarantinedUsageRow.create_time < before)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def list_quarantined(
    cp: Runtime, page_size: int, page_token: str
) -> tuple[list[pb.QuarantinedUsage], str, int]:
    limit = clamp_page_size(page_size, default=50)
    tokens = await cp.page_tokens()
    before = tokens.decode("quarantined", page_token, 1)[0] if page_token else ""

    def query(s: Session) -> tuple[list[pb.QuarantinedUsage], bool, int]:
        rows = page(s, before_id=before, limit=limit + 1)
        return [message(r) for r in rows], len(rows) > limit, count(s)

    records, more, total = await cp.run(query)
    records = records[:limit]
    token = tokens.encode("quarantined", records[-1].id) if more and records else ""
    return records, token, total
