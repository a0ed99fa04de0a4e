"""Spend adjustments: an administrator's signed correction of one window's
spend (BudgetService.CreateSpendAdjustment), the way a wrong provider number
is put right without deleting history.

An adjustment is kept as its own record (spend_adjustments, never changed or
deleted) and applied to the policy's current window in the same transaction:
the window row is locked, its spend moved by the amount, and the crossings
the new total reaches are recorded through the outbox exactly as usage would
record them. A window's spend may not become negative or exceed
MAX_COST_NANOS: such an adjustment is refused (INVALID_ARGUMENT on
``adjustment.amount_usd``, saying how far it may go), never clamped, so the
sum of a window's adjustment records is always what was applied to it.

Every adjustment bumps the window's ``adjustment_count``; data planes receive
it as WindowSpend.adjustment_seq and so accept a lowered total (a negative
adjustment re-admits a blocked member at once) while ignoring stale ones.
"""

from __future__ import annotations

import os
import re
import threading
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control_plane import convert, holds
from control_plane.errors import InvalidArgument, NotFound
from control_plane.runtime import Runtime, clamp_page_size, log_recorded
from control_plane.store import repo
from control_plane.store.models import PolicyRow, SpendAdjustmentRow, WindowSpendRow
from control_plane.webhooks.outbox import OutboxResult, record_crossings
from spendgate.domain import limits
from spendgate.domain.members import MemberInvalid, canonical
from spendgate.domain.policies import (
    IDENTITY_SCOPES,
    WILDCARD,
    FieldViolation,
    Policy,
    Scope,
    hash_api_key,
)
from spendgate.domain.pricing import MAX_COST_NANOS, format_usd, parse_usd
from spendgate.domain.windows import window_for
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp

log = structlog.get_logger("spendgate.control_plane")
MAX_REASON_CHARS = limits.MAX_REASON_CHARS
MAX_AMOUNT_TEXT = limits.MAX_AMOUNT_TEXT_CHARS
MAX_MEMBER_INPUT = limits.MAX_MEMBER_INPUT_CHARS
MAX_POLICY_ID = 40
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_id_lock = threading.Lock()
_last_id = 0
FIELD = "adjustment"
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_ID = re.compile(r"sa_[0-9a-z]{26}")
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{limits.MAX_REQUEST_ID_CHARS}}}")


def new_id() -> str:
    """Time-ordered id ("sa_" + 26 base32 characters), so newest first is by
    id; strictly increasing within a process, also within one millisecond."""
    global _last_id
    n = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    with _id_lock:
        n = max(n, _last_id + 1)
        _last_id = n
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[n & 31])
        n >>= 5
    return "sa_" + "".join(reversed(chars))


def is_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


def usd(nanos: int) -> str:
    """Signed decimal dollars without the sign character: "-12.50", "0.00"."""
    return format_usd(nanos).replace("$", "")


@dataclass(frozen=True, slots=True)
class Wanted:
    """A checked request: amount and reason valid; member as given (its form
    depends on the policy's scope, checked in the transaction)."""

    policy_id: str
    member: str
    amount_nanos: int
    reason: str
    request_id: str = ""


def check(msg: pb.SpendAdjustment, request_id: str = "") -> Wanted:
    """Every violation of the fields that need no database, at once."""
    violations = []
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        violations.append(("request_id", "must be 1 to 80 of A-Z a-z 0-9 . _ : - (e.g. a UUID)"))
    if not msg.policy_id:
        violations.append((f"{FIELD}.policy_id", "is required"))
    elif len(msg.policy_id) > MAX_POLICY_ID:
        violations.append((f"{FIELD}.policy_id", f"is at most {MAX_POLICY_ID} characters"))
    if len(msg.member) > MAX_MEMBER_INPUT:
        violations.append((f"{FIELD}.member", f"is at most {MAX_MEMBER_INPUT} characters"))
    amount = 0
    if not msg.amount_usd:
        violations.append((f"{FIELD}.amount_usd", 'is required (signed US dollars, e.g. "-12.50")'))
    elif len(msg.amount_usd) > MAX_AMOUNT_TEXT:
        violations.append((f"{FIELD}.amount_usd", f"is at most {MAX_AMOUNT_TEXT} characters"))
    else:
        try:
            amount = parse_usd(msg.amount_usd)
        except ValueError:
            violations.append(
                (
                    f"{FIELD}.amount_usd",
                    'is not a decimal dollar amount with at most 9 decimal places (e.g. "-12.50")',
                )
            )
        else:
            if amount == 0:
                violations.append((f"{FIELD}.amount_usd", "must not be zero"))
            elif abs(amount) > MAX_COST_NANOS:
                violations.append(
                    (
                        f"{FIELD}.amount_usd",
                        f"must be at most {usd(MAX_COST_NANOS)} in absolute value",
                    )
                )
    reason_problem = _reason_problem(msg.reason)
    if reason_problem:
        violations.append((f"{FIELD}.reason", reason_problem))
    if violations:
        raise InvalidArgument([FieldViolation(f, d) for f, d in violations])
    return Wanted(msg.policy_id, msg.member, amount, msg.reason.strip(), request_id)


def _reason_problem(reason: str) -> str | None:
    text = reason.strip()
    if not text:
        return "is required (why the spend is corrected, e.g. 'provider double-reported')"
    if len(text) > MAX_REASON_CHARS:
        return f"is at most {MAX_REASON_CHARS} characters (got {len(text)})"
    for ch in text:
        category = unicodedata.category(ch)
        if category[0] == "C" or category in ("Zl", "Zp"):
            return (
                f"contains a control or invisible character (U+{ord(ch):04X}); "
                "write it on one line of visible text"
            )
    return None


def member_of(policy: Policy, member: str) -> str:
    """The window member ``member`` names for ``policy``, in the form the data
    plane charges (spendgate.domain.members for identity scopes)."""
    field = f"{FIELD}.member"
    if not policy.is_wildcard:
        if member.strip():
            raise InvalidArgument.one(
                field,
                f"must be empty: policy {policy.id} has one budget "
                "(only '*' policies have members)",
            )
        return ""
    value = member.strip()
    if not value:
        raise InvalidArgument.one(
            field, f"is required: policy {policy.id} has a budget per member ('*')"
        )
    if value == WILDCARD:
        raise InvalidArgument.one(field, "must name one member, not '*'")
    scope = policy.scope
    if scope is Scope.API_KEY:
        return value if _SHA256.fullmatch(value) else hash_api_key(value)
    if scope in (Scope.MODEL, Scope.PROVIDER):
        value = value.lower()
    elif scope in IDENTITY_SCOPES:
        try:
            value = canonical(value, field)
        except MemberInvalid as e:
            raise InvalidArgument.one(field, e.description) from None
    if any(unicodedata.category(c)[0] == "C" for c in value):
        raise InvalidArgument.one(field, "contains a control character")
    if len(value.encode()) > MAX_MEMBER_INPUT:
        raise InvalidArgument.one(field, f"is longer than {MAX_MEMBER_INPUT} bytes (UTF-8)")
    return value


@dataclass(frozen=True, slots=True)
class Applied:
    """``total`` is None for a retry answered with the adjustment already made."""

    row: SpendAdjustmentRow
    policy: PolicyRow | None
    total: repo.SpendTotal | None


def replayed(s: Session, wanted: Wanted) -> Applied | None:
    """The adjustment made earlier with ``wanted.request_id``, if any; refused
    when that request id was used for different fields."""
    if not wanted.request_id:
        return None
    row = s.scalars(
        select(SpendAdjustmentRow).where(SpendAdjustmentRow.request_id == wanted.request_id)
    ).one_or_none()
    if row is None:
        return None
    policy = s.get(PolicyRow, row.policy_id)
    try:
        member = member_of(convert.domain_policy(policy), wanted.member) if policy else None
    except InvalidArgument:
        member = None
    if (row.policy_id, row.member, row.amount_nanos, row.reason) != (
        wanted.policy_id,
        member,
        wanted.amount_nanos,
        wanted.reason,
    ):
        raise InvalidArgument.one(
            "request_id", f"was used for another adjustment ({row.id}); use a new one"
        )
    return Applied(row, None, None)


def apply(s: Session, wanted: Wanted, now: datetime, author: str) -> Applied:
    """Record ``wanted`` and move its window's spend, in ``s``'s transaction.

    The window row is created if missing and locked (``FOR UPDATE`` on
    PostgreSQL; SQLite has one writer), so concurrent usage is added before
    or after, never lost. A retry of a request id already used returns
    that adjustment and changes nothing.
    """
    earlier = replayed(s, wanted)
    if earlier is not None:
        return earlier
    policy_row = s.get(PolicyRow, wanted.policy_id)
    if policy_row is None:
        raise NotFound("policy", wanted.policy_id)
    policy = convert.domain_policy(policy_row)
    member = member_of(policy, wanted.member)
    window = window_for(policy.window, now)
    start, end = int(window.start.timestamp()), int(window.end.timestamp())
    key = (policy.id, member, start)
    s.execute(
        repo.dialect_insert(s, WindowSpendRow)
        .values(
            policy_id=policy.id,
            member=member,
            window_start=start,
            window_end=end,
            spent_nanos=0,
            request_count=0,
            estimated_count=0,
            updated_at=now,
            adjusted_nanos=0,
            adjustment_count=0,
        )
        .on_conflict_do_nothing(index_elements=["policy_id", "member", "window_start"])
    )
    row = s.scalars(
        select(WindowSpendRow)
        .where(
            WindowSpendRow.policy_id == key[0],
            WindowSpendRow.member == key[1],
            WindowSpendRow.window_start == key[2],
        )
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
    before = row.spent_nanos
    after = before + wanted.amount_nanos
    if after < 0:
        raise InvalidArgument.one(
            f"{FIELD}.amount_usd",
            f"would make the window's spend negative: it is ${usd(before)}, "
            f"so at most -{usd(before)} can be subtracted",
        )
    if after > MAX_COST_NANOS:
        raise InvalidArgument.one(
            f"{FIELD}.amount_usd",
            f"would take the window's spend past the maximum {usd(MAX_COST_NANOS)}: "
            f"it is ${usd(before)}, so at most {usd(MAX_COST_NANOS - before)} can be added",
        )
    row.spent_nanos = after
    row.adjusted_nanos = row.adjusted_nanos + wanted.amount_nanos
    row.adjustment_count = row.adjustment_count + 1
    row.updated_at = now
    record = SpendAdjustmentRow(
        id=new_id(),
        policy_id=policy.id,
        policy_name=policy_row.name,
        member=member,
        window_start=start,
        window_end=end,
        amount_nanos=wanted.amount_nanos,
        spent_before_nanos=before,
        spent_after_nanos=after,
        reason=wanted.reason,
        created_by=author[:200],
        create_time=now,
        request_id=wanted.request_id or None,
    )
    s.add(record)
    s.flush()
    total = repo.SpendTotal(
        policy.id,
        member,
        start,
        end,
        after,
        row.request_count,
        before,
        row.adjustment_count,
    )
    return Applied(record, policy_row, total)


def message(r: SpendAdjustmentRow) -> pb.SpendAdjustment:
    return pb.SpendAdjustment(
        id=r.id,
        policy_id=r.policy_id,
        policy_name=r.policy_name,
        member=r.member,
        amount_usd=usd(r.amount_nanos),
        reason=r.reason,
        window_start=timestamp(r.window_start),
        window_end=timestamp(r.window_end),
        spent_before_usd=usd(r.spent_before_nanos),
        spent_after_usd=usd(r.spent_after_nanos),
        created_by=r.created_by,
        create_time=timestamp(r.create_time),
        request_id=r.request_id or "",
    )


def page(
    s: Session, *, policy_id: str, member: str, before_id: str, limit: int
) -> list[SpendAdjustmentRow]:
    """Newest first, ids below ``before_id`` when given."""
    q = select(SpendAdjustmentRow)
    if policy_id:
        q = q.where(SpendAdjustmentRow.policy_id == policy_id)
    if member:
        q = q.where(SpendAdjustmentRow.member == member)
    if before_id:
        q = q.where(SpendAdjustmentRow.id < before_id)
    return list(s.scalars(q.order_by(SpendAdjustmentRow.id.desc()).limit(limit)))


async def create_adjustment(
    cp: Runtime, msg: pb.SpendAdjustment, author: str, request_id: str = ""
) -> pb.SpendAdjustment:
    """Record a correction and apply it to the policy's current window in
    one transaction (check and apply above), with the events the
    new total reaches; then push the window to every data plane. A retry
    with the same ``request_id`` returns the adjustment already made."""
    wanted = check(msg, request_id)
    now = cp.clock()

    def create(
        s: Session,
    ) -> tuple[Applied, OutboxResult, list[dp.WindowSpend]]:
        applied = apply(s, wanted, now, author)
        t, policy = applied.total, applied.policy
        if t is None or policy is None:  # a retry: nothing changes
            return applied, OutboxResult(), []
        keys = [(t.policy_id, t.member, t.window_start)]
        cp.changed(s, "spend", keys)
        outbox = record_crossings(s, [(policy, t)], now, cp.known_events)
        held = repo.holds_by_window(s, keys, int(now.timestamp()))
        spend = holds.total_messages([t], {policy.id: policy}, held)
        return applied, outbox, spend

    try:
        applied, outbox, spend = await cp.run(create)
    except IntegrityError:
        # The same request id committed by a concurrent call in between:
        # answer with that one (or refuse different fields).
        applied, outbox, spend = await cp.run(create)
    r = applied.row
    if applied.total is None:
        log.info("spend adjustment retried", adjustment_id=r.id, request_id=request_id)
        return message(r)
    cp.known_events.add(outbox.seen, now)
    cp.metrics.spend_adjusted(wanted.amount_nanos, [e.kind for e in outbox.recorded])
    log.info(
        "spend adjusted",
        adjustment_id=r.id,
        policy_id=r.policy_id,
        member=r.member[:256] or None,
        amount_usd=usd(r.amount_nanos),
        spent_before_usd=usd(r.spent_before_nanos),
        spent_after_usd=usd(r.spent_after_nanos),
        reason=r.reason,
        author=r.created_by,
    )
    log_recorded(outbox, adjustment_id=r.id)
    if outbox.deliveries:
        cp.deliveries_ready.set()
    cp.hub.publish(dp.StateUpdate(spend=spend))
    return message(r)


async def list_adjustments(
    cp: Runtime, policy_id: str, member: str, page_size: int, page_token: str
) -> tuple[list[pb.SpendAdjustment], str]:
    """Newest first. ``member`` is matched as stored (canonical), after
    canonicalising it for ``policy_id``'s scope when that policy exists."""
    limit = clamp_page_size(page_size, default=50)
    tokens = await cp.page_tokens()
    before = tokens.decode("adjustments", page_token, 1)[0] if page_token else ""
    if before and not is_id(before):
        raise InvalidArgument.one("page_token", "is not a token this server returned")

    def query(s: Session) -> list[pb.SpendAdjustment]:
        wanted = member
        if member and policy_id:
            row = repo.get_policy(s, policy_id)
            if row is not None and convert.domain_policy(row).is_wildcard:
                try:
                    wanted = member_of(convert.domain_policy(row), member)
                except InvalidArgument as e:
                    raise InvalidArgument.one("member", e.violations[0].description) from None
        rows = page(s, policy_id=policy_id, member=wanted, before_id=before, limit=limit + 1)
        return [message(r) for r in rows]

    found = await cp.run(query)
    token = tokens.encode("adjustments", found[limit - 1].id) if len(found) > limit else ""
    return found[:limit], token
