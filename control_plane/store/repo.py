"""Queries over the control plane's tables. Sessions are passed in; each
use case wraps one transaction around them (control_plane/runtime.py, Runtime.run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    LargeBinary,
    Select,
    case,
    cast,
    delete,
    func,
    literal_column,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, defer
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.elements import ColumnElement

from control_plane.store.models import AppliedBatchRow, PolicyRow, WindowHoldRow, WindowSpendRow
from spendgate.domain.forecast import DEFAULT_HORIZON_S, Rate
from spendgate.domain.pricing import MAX_COST_NANOS

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
WindowKey = tuple[str, str, int]  # policy_id, member, window_start


def new_policy_id() -> str:
    """Time-ordered id ("bp_" + 26 base32 characters, like a ULID), so listing
    by id lists by creation."""
    n = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[n & 31])
        n >>= 5
    return "bp_" + "".join(reversed(chars))


def get_policy(session: Session, policy_id: str) -> PolicyRow | None:
    return session.get(PolicyRow, policy_id)


def list_policies(session: Session, *, after_id: str, limit: int) -> Sequence[PolicyRow]:
    q = select(PolicyRow).where(PolicyRow.id > after_id).order_by(PolicyRow.id).limit(limit)
    return session.scalars(q).all()


# What a listed policy may take besides its description: every other field is
# bounded (name 200, target 512 characters, ...); generous on purpose.
POLICY_FIXED_BYTES = 4096
# Windows per query when discounting a batch from newer holds (bound parameters).
DISCOUNT_CHUNK = 500


def list_policies_sized(
    session: Session, *, after_id: str, limit: int, max_bytes: int
) -> tuple[Sequence[PolicyRow], bool]:
    """Up to ``limit`` policies after ``after_id`` whose messages together stay
    under about ``max_bytes`` (always at least one), and whether more follow.

    Sizes are read first (ids and description bytes), so policies with huge
    descriptions are never loaded beyond what the page takes.
    """
    d = PolicyRow.description
    nbytes = (
        func.octet_length(d)
        if session.get_bind().dialect.name == "postgresql"
        else func.length(cast(d, LargeBinary))
    )
    sizes = session.execute(
        select(PolicyRow.id, nbytes)
        .where(PolicyRow.id > after_id)
        .order_by(PolicyRow.id)
        .limit(limit + 1)
    ).all()
    ids: list[str] = []
    total = 0
    for policy_id, n in sizes[:limit]:
        total += (n or 0) + POLICY_FIXED_BYTES
        if ids and total > max_bytes:
            break
        ids.append(policy_id)
    rows = session.scalars(
        select(PolicyRow).where(PolicyRow.id.in_(ids)).order_by(PolicyRow.id)
    ).all()
    return rows, len(sizes) > len(ids)


def policies_without_description(
    session: Session, *, after_id: str, limit: int
) -> Sequence[PolicyRow]:
    """Up to ``limit`` policies after ``after_id`` in id order, their
    descriptions not loaded (read as ""): what data planes are sent."""
    rows = session.scalars(
        select(PolicyRow)
        .options(defer(PolicyRow.description))
        .where(PolicyRow.id > after_id)
        .order_by(PolicyRow.id)
        .limit(limit)
    ).all()
    for r in rows:
        set_committed_value(r, "description", "")
    return rows


def policies_by_id(
    session: Session, ids: Iterable[str], *, description: bool = True
) -> Sequence[PolicyRow]:
    """The policies of ``ids`` that exist (``description=False``: read as "")."""
    wanted = list(ids)
    if not wanted:
        return []
    q = select(PolicyRow).where(PolicyRow.id.in_(wanted))
    if description:
        return session.scalars(q).all()
    rows = session.scalars(q.options(defer(PolicyRow.description))).all()
    for r in rows:
        set_committed_value(r, "description", "")
    return rows


def would_reject_counts(session: Session, rows: Sequence[PolicyRow]) -> dict[str, int]:
    """Requests each policy that has been SHADOW would have refused, summed
    over its windows and members (policies never in shadow are not read)."""
    ids = [r.id for r in rows if r.shadow_since is not None]
    if not ids:
        return {}
    W = WindowSpendRow
    q = (
        select(W.policy_id, func.sum(W.would_reject_count))
        .where(W.policy_id.in_(ids), W.would_reject_count > 0)
        .group_by(W.policy_id)
    )
    return {pid: int(n or 0) for pid, n in session.execute(q)}


def all_policies(session: Session) -> Sequence[PolicyRow]:
    return session.scalars(select(PolicyRow).order_by(PolicyRow.id)).all()


def delete_policy(session: Session, row: PolicyRow) -> None:
    """The policy, its spend rows and its holds (nothing is left for a cleanup)."""
    session.execute(delete(WindowSpendRow).where(WindowSpendRow.policy_id == row.id))
    session.execute(delete(WindowHoldRow).where(WindowHoldRow.policy_id == row.id))
    session.delete(row)


def forget_spend(session: Session, *, ended_before: int, limit: int) -> int:
    """Delete up to ``limit`` spend rows of windows that ended before
    ``ended_before`` (Unix seconds), oldest first; how many. Bounded so that one
    transaction never holds a large delete, and each chunk costs its own rows
    only: found on ix_window_spend_window_end, deleted by physical row id (a
    join on the primary key would scan the whole table per chunk)."""
    row_id = "ctid" if session.get_bind().dialect.name == "postgresql" else "rowid"
    old = (
        f"SELECT {row_id} FROM window_spend WHERE window_end < :ended_before "
        "ORDER BY window_end LIMIT :limit"
    )
    where = f"ctid = ANY(ARRAY({old}))" if row_id == "ctid" else f"rowid IN ({old})"
    result = session.execute(
        text(f"DELETE FROM window_spend WHERE {where}"),
        {"ended_before": ended_before, "limit": limit},
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def dialect_insert(session: Session, table: type[object]) -> postgresql.Insert | sqlite.Insert:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")


def forget_batches(session: Session, applied_before: datetime) -> int:
    """Delete idempotency ids applied before ``applied_before``; how many."""
    gone = session.scalars(
        delete(AppliedBatchRow)
        .where(AppliedBatchRow.applied_at < applied_before)
        .returning(AppliedBatchRow.batch_id)
    ).all()
    return len(gone)


def claim_batch(session: Session, batch_id: str, data_plane_id: str, now: datetime) -> bool:
    """Record batch_id as applied; False if it already was (by anyone).

    With PostgreSQL a concurrent transaction inserting the same id waits for
    this one and then finds the conflict, so exactly one applies the batch.
    """
    stmt = (
        dialect_insert(session, AppliedBatchRow)
        .values(batch_id=batch_id, data_plane_id=data_plane_id, applied_at=now)
        .on_conflict_do_nothing(index_elements=["batch_id"])
        .returning(AppliedBatchRow.batch_id)
    )
    return session.execute(stmt).first() is not None


def applied_batches(session: Session, batch_ids: Sequence[str]) -> set[str]:
    """Which of ``batch_ids`` have been applied."""
    if not batch_ids:
        return set()
    return set(
        session.scalars(
            select(AppliedBatchRow.batch_id).where(AppliedBatchRow.batch_id.in_(batch_ids))
        )
    )


@dataclass(frozen=True, slots=True)
class SpendDelta:
    policy_id: str
    member: str
    window_start: int
    window_end: int
    cost_nanos: int
    request_count: int
    estimated_count: int
    would_reject: int = 0  # requests a SHADOW policy would have refused


@dataclass(frozen=True, slots=True)
class SpendTotal:
    policy_id: str
    member: str
    window_start: int
    window_end: int
    spent_nanos: int
    request_count: int
    previous_nanos: int  # spend before this apply, for crossing detection
    adjustment_seq: int = 0  # the window's adjustment_count (WindowSpend.adjustment_seq)
    would_reject: int = 0  # the window's would_reject_count after the apply
    rate: Rate | None = None  # the window's spend rate after this apply (add_spend)


# The spend rate (spendgate.domain.forecast.observe, the same arithmetic):
# a report with spend decays the stored sum to its instant (never
# backwards) and adds its cost; the first one starts it. A report without
# spend (holds only, a duplicate batch) leaves it as it is. :now is Unix ms;
# :h the configured horizon, at most a quarter of the window's length.
_PG_RATE = """
        rate_nanos = CASE
            WHEN excluded.spent_nanos <= 0 THEN w.rate_nanos
            WHEN w.rate_samples <= 0 THEN excluded.rate_nanos
            ELSE w.rate_nanos * exp(
                -GREATEST(excluded.rate_at_ms - w.rate_at_ms, 0) / 1000.0
                / GREATEST(LEAST(CAST(:h AS double precision),
                                 (w.window_end - w.window_start) / 4.0), 1.0)
            ) + excluded.rate_nanos END,
        rate_first_nanos = CASE WHEN excluded.spent_nanos > 0 AND w.rate_samples <= 0
                           THEN excluded.rate_first_nanos ELSE w.rate_first_nanos END,
        rate_since_ms = CASE WHEN excluded.spent_nanos > 0 AND w.rate_samples <= 0
                        THEN excluded.rate_since_ms ELSE w.rate_since_ms END,
        rate_at_ms = CASE WHEN excluded.spent_nanos <= 0 THEN w.rate_at_ms
                     WHEN w.rate_samples <= 0 THEN excluded.rate_at_ms
                     ELSE GREATEST(w.rate_at_ms, excluded.rate_at_ms) END,
        rate_last_ms = CASE WHEN excluded.spent_nanos <= 0 THEN w.rate_last_ms
                       WHEN w.rate_samples <= 0 THEN excluded.rate_last_ms
                       ELSE GREATEST(w.rate_last_ms, excluded.rate_last_ms) END,
        rate_samples = w.rate_samples + CASE WHEN excluded.spent_nanos > 0 THEN 1 ELSE 0 END"""

_PG_UPSERT = text(
    """
    INSERT INTO window_spend AS w (policy_id, member, window_start, window_end, spent_nanos,
                                   request_count, estimated_count, would_reject_count,
                                   updated_at, rate_nanos, rate_first_nanos, rate_at_ms,
                                   rate_since_ms, rate_last_ms, rate_samples)
    SELECT p, m, ws, we, c, r, e, wr, :now, c, c, CAST(:now_ms AS bigint), CAST(:now_ms AS bigint),
           CAST(:now_ms AS bigint),
           CASE WHEN c > 0 THEN 1 ELSE 0 END
    FROM unnest(CAST(:p AS varchar[]), CAST(:m AS varchar[]), CAST(:ws AS bigint[]),
                CAST(:we AS bigint[]), CAST(:c AS bigint[]), CAST(:r AS bigint[]),
                CAST(:e AS bigint[]), CAST(:wr AS bigint[]))
         WITH ORDINALITY AS t(p, m, ws, we, c, r, e, wr, n)
    ORDER BY n
    ON CONFLICT (policy_id, member, window_start) DO UPDATE SET
        spent_nanos = LEAST(w.spent_nanos, 9223372036854775807 - excluded.spent_nanos)
                      + excluded.spent_nanos,
        request_count = w.request_count + excluded.request_count,
        estimated_count = w.estimated_count + excluded.estimated_count,
        would_reject_count = w.would_reject_count + excluded.would_reject_count,
        updated_at = excluded.updated_at,"""
    + _PG_RATE
    + """
    RETURNING policy_id, member, window_start, spent_nanos, request_count, adjustment_count,
              would_reject_count, rate_nanos, rate_at_ms, rate_since_ms, rate_last_ms,
              rate_samples, rate_first_nanos
"""
)


def _upsert_postgres(
    session: Session, ordered: list[SpendDelta], now: datetime, horizon_s: float
) -> list[tuple[int, int, int, int, Rate]]:
    """PostgreSQL: the whole batch as seven arrays in one statement (unnest),
    far cheaper to send and parse than one VALUES row per window."""
    rows = session.execute(
        _PG_UPSERT,
        {
            "p": [d.policy_id for d in ordered],
            "m": [d.member for d in ordered],
            "ws": [d.window_start for d in ordered],
            "we": [d.window_end for d in ordered],
            "c": [d.cost_nanos for d in ordered],
            "r": [d.request_count for d in ordered],
            "e": [d.estimated_count for d in ordered],
            "wr": [d.would_reject for d in ordered],
            "now": now.astimezone(UTC).replace(tzinfo=None),
            "now_ms": _ms(now),
            "h": float(horizon_s),
        },
    ).all()
    # RETURNING order is not promised: match rows back by key.
    after = {(r[0], r[1], r[2]): (r[3], r[4], r[5], r[6], Rate(*r[7:])) for r in rows}
    return [after[(d.policy_id, d.member, d.window_start)] for d in ordered]


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def add_spend(
    session: Session,
    deltas: Iterable[SpendDelta],
    now: datetime,
    *,
    horizon_s: float = DEFAULT_HORIZON_S,
) -> list[SpendTotal]:
    """Atomically add each delta to its window row (``spent = spent + x``,
    saturating at ``MAX_COST_NANOS``; a delta is at most that much), and
    its cost to the window's spend rate (``horizon_s``: see
    spendgate.domain.forecast).

    One upsert statement executed for all rows: SQLAlchemy sends them as
    multi-row INSERT ... ON CONFLICT DO UPDATE ... RETURNING batches
    ("insertmanyvalues"), compiled once and cached, so a batch of many windows
    costs a few round trips, not one per window. Rows go in key order so two
    transactions on PostgreSQL lock them in the same order and cannot
    deadlock. Keys must be unique within ``deltas`` (callers aggregate first).
    """
    ordered = sorted(deltas, key=lambda d: (d.policy_id, d.member, d.window_start))
    if not ordered:
        return []
    if session.get_bind().dialect.name == "postgresql":
        after = _upsert_postgres(session, ordered, now, horizon_s)
    else:
        after = _upsert_sqlite(session, ordered, now, horizon_s)
    return [
        SpendTotal(
            d.policy_id,
            d.member,
            d.window_start,
            d.window_end,
            spent,
            count,
            spent - d.cost_nanos,
            adjustments,
            would_reject,
            rate,
        )
        for d, (spent, count, adjustments, would_reject, rate) in zip(ordered, after, strict=True)
    ]


def _upsert_sqlite(
    session: Session, ordered: list[SpendDelta], now: datetime, horizon_s: float
) -> list[tuple[int, int, int, int, Rate]]:
    table = WindowSpendRow.__table__
    c = table.c
    ins = dialect_insert(session, WindowSpendRow)
    x = ins.excluded
    has_spend = x.spent_nanos > 0
    first = c.rate_samples <= 0
    # The horizon is the same for every statement of this control plane:
    # a literal keeps the statement cacheable and out of each row's parameters.
    configured: ColumnElement[float] = literal_column(repr(float(horizon_s)))
    tau: ColumnElement[float] = func.max(
        func.min(configured, (c.window_end - c.window_start) / 4.0), 1.0
    )
    stmt = ins.on_conflict_do_update(
        index_elements=["policy_id", "member", "window_start"],
        set_={
            # Saturates at the int64 maximum (MAX_COST_NANOS) without overflowing.
            "spent_nanos": func.min(c.spent_nanos, MAX_COST_NANOS - x.spent_nanos) + x.spent_nanos,
            "request_count": c.request_count + x.request_count,
            "estimated_count": c.estimated_count + x.estimated_count,
            "would_reject_count": c.would_reject_count + x.would_reject_count,
            "updated_at": x.updated_at,
            # The spend rate: as _PG_RATE.
            "rate_nanos": case(
                (~has_spend, c.rate_nanos),
                (first, x.rate_nanos),
                else_=c.rate_nanos
                * func.exp(-func.max(x.rate_at_ms - c.rate_at_ms, 0) / 1000.0 / tau)
                + x.rate_nanos,
            ),
            "rate_first_nanos": case(
                (has_spend & first, x.rate_first_nanos), else_=c.rate_first_nanos
            ),
            "rate_since_ms": case((has_spend & first, x.rate_since_ms), else_=c.rate_since_ms),
            "rate_at_ms": case(
                (~has_spend, c.rate_at_ms),
                (first, x.rate_at_ms),
                else_=func.max(c.rate_at_ms, x.rate_at_ms),
            ),
            "rate_last_ms": case(
                (~has_spend, c.rate_last_ms),
                (first, x.rate_last_ms),
                else_=func.max(c.rate_last_ms, x.rate_last_ms),
            ),
            "rate_samples": c.rate_samples + case((has_spend, 1), else_=0),
        },
    ).returning(
        c.spent_nanos,
        c.request_count,
        c.adjustment_count,
        c.would_reject_count,
        c.rate_nanos,
        c.rate_at_ms,
        c.rate_since_ms,
        c.rate_last_ms,
        c.rate_samples,
        c.rate_first_nanos,
        sort_by_parameter_order=True,
    )
    at = _ms(now)
    params = [
        {
            "policy_id": d.policy_id,
            "member": d.member,
            "window_start": d.window_start,
            "window_end": d.window_end,
            "spent_nanos": d.cost_nanos,
            "request_count": d.request_count,
            "estimated_count": d.estimated_count,
            "would_reject_count": d.would_reject,
            "updated_at": now,
            "rate_nanos": float(d.cost_nanos),
            "rate_first_nanos": d.cost_nanos,
            "rate_at_ms": at,
            "rate_since_ms": at,
            "rate_last_ms": at,
            "rate_samples": 1 if d.cost_nanos > 0 else 0,
        }
        for d in ordered
    ]
    returned = session.execute(stmt, params).all()
    return [(r[0], r[1], r[2], r[3], Rate(*r[4:])) for r in returned]


def rate_of(row: WindowSpendRow) -> Rate:
    """A window's spend rate state (a row not stored, e.g. ListSpend's
    zero row of a window nobody spent in, has none: samples 0)."""
    return Rate(
        row.rate_nanos or 0.0,
        row.rate_at_ms or 0,
        row.rate_since_ms or 0,
        row.rate_last_ms or 0,
        row.rate_samples or 0,
        row.rate_first_nanos or 0,
    )


def spend_rows_query(*, active_at: int) -> Select[WindowSpendRow]:
    """Rows of windows that contain the instant ``active_at`` (Unix seconds)."""
    return select(WindowSpendRow).where(
        WindowSpendRow.window_start <= active_at, WindowSpendRow.window_end > active_at
    )


def current_spend(
    session: Session, *, active_at: int, policy_id: str = "", member: str = ""
) -> Sequence[WindowSpendRow]:
    q = spend_rows_query(active_at=active_at)
    if policy_id:
        q = q.where(WindowSpendRow.policy_id == policy_id)
    if member:
        q = q.where(WindowSpendRow.member == member)
    return session.scalars(
        q.order_by(WindowSpendRow.policy_id, WindowSpendRow.member, WindowSpendRow.window_start)
    ).all()


def open_windows_page(
    session: Session,
    *,
    active_at: int,
    after: WindowKey | None,
    limit: int,
    policy_id: str = "",
    member: str = "",
) -> Sequence[WindowSpendRow]:
    """Up to ``limit`` rows of windows containing ``active_at``, in key order
    after the key ``after`` (keyset paging on the primary key), optionally
    of one policy and / or member."""
    w = WindowSpendRow
    q = spend_rows_query(active_at=active_at)
    if policy_id:
        # A range on the primary key: the rest of the key compared after the
        # policy, and window_start kept out of ix_window_spend_top's reach
        # (``+ 0``). Otherwise SQLite read the policy's range of that index
        # and sorted all its rows for every page: 0.35 s a page at 1,000,000
        # members, 5 ms this way.
        q = select(w).where(
            w.policy_id == policy_id,
            w.window_start + 0 <= active_at,
            w.window_end > active_at,
        )
    if member:
        q = q.where(w.member == member)
    if after is not None and policy_id:
        if after[0] > policy_id:
            return []
        if after[0] == policy_id:
            q = q.where(tuple_(w.member, w.window_start) > (after[1], after[2]))
    elif after is not None:
        q = q.where(tuple_(w.policy_id, w.member, w.window_start) > after)
    return session.scalars(q.order_by(w.policy_id, w.member, w.window_start).limit(limit)).all()


def top_spenders(
    session: Session, *, policy_id: str, window_start: int, limit: int
) -> Sequence[WindowSpendRow]:
    """The ``limit`` rows of one policy's window with the most spent (most
    first, ties by member): a range of ix_window_spend_top, whatever the
    number of members."""
    w = WindowSpendRow
    return session.scalars(
        select(w)
        .where(w.policy_id == policy_id, w.window_start == window_start)
        .order_by(w.spent_nanos.desc(), w.member)
        .limit(limit)
    ).all()


def count_members(
    session: Session, *, policy_id: str, window_start: int, exceeded_at: int, alerting_at: int
) -> tuple[int, int, int]:
    """(members, members at or over ``exceeded_at``, members at or over
    ``alerting_at`` and under ``exceeded_at``) of one policy's window, counted
    by the database (on ix_window_spend_top's columns only)."""
    w = WindowSpendRow
    over = w.spent_nanos >= exceeded_at
    near = (w.spent_nanos >= alerting_at) & (w.spent_nanos < exceeded_at)
    members, exceeded, alerting = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((over, 1), else_=0)), 0),
            func.coalesce(func.sum(case((near, 1), else_=0)), 0),
        ).where(w.policy_id == policy_id, w.window_start == window_start)
    ).one()
    return int(members), int(exceeded), int(alerting)


def unnamed_open_windows(
    session: Session, *, active_at: int, policy_ids: Iterable[str]
) -> Sequence[WindowSpendRow]:
    """The member-less rows (non-wildcard policies) of ``policy_ids`` whose
    windows contain ``active_at``: primary key lookups."""
    ids = list(policy_ids)
    if not ids:
        return []
    w = WindowSpendRow
    q = spend_rows_query(active_at=active_at).where(w.policy_id.in_(ids), w.member == "")
    return session.scalars(q).all()


@dataclass(frozen=True, slots=True)
class OpenWindow:
    policy_id: str
    member: str
    window_start: int
    window_end: int
    spent_nanos: int
    request_count: int
    adjustment_count: int  # WindowSpend.adjustment_seq


def open_window_values(
    session: Session, *, active_at: int, after: WindowKey | None, limit: int
) -> list[OpenWindow]:
    """As open_windows_page, as plain values (no ORM objects: a resync reads
    every open window)."""
    w = WindowSpendRow
    q = select(
        w.policy_id,
        w.member,
        w.window_start,
        w.window_end,
        w.spent_nanos,
        w.request_count,
        w.adjustment_count,
    ).where(w.window_start <= active_at, w.window_end > active_at)
    if after is not None:
        q = q.where(tuple_(w.policy_id, w.member, w.window_start) > after)
    q = q.order_by(w.policy_id, w.member, w.window_start).limit(limit)
    return [OpenWindow(*r) for r in session.execute(q)]


def spend_rows(session: Session, keys: Iterable[tuple[str, str, int]]) -> list[WindowSpendRow]:
    out = []
    for key in keys:
        row = session.get(WindowSpendRow, key)
        if row is not None:
            out.append(row)
    return out


# ---- holds (reservations across data planes) ---------------------------------


def set_holds(
    session: Session,
    data_plane_id: str,
    seq: int,
    holds: Iterable[tuple[WindowKey, int]],
    expires_at: int,
    requests: Mapping[WindowKey, int] | None = None,
) -> None:
    """Replace ``data_plane_id``'s holds on these windows, unless a newer
    report (higher ``seq``) is already recorded. Rows go in key order, like
    add_spend, so concurrent transactions lock them in one order.
    ``requests``: how many running requests each hold includes (default 0)."""
    counts = requests or {}
    params = [
        {
            "policy_id": k[0],
            "member": k[1],
            "window_start": k[2],
            "data_plane_id": data_plane_id,
            "held_nanos": held,
            "seq": seq,
            "expires_at": expires_at,
            "requests": counts.get(k, 0),
        }
        for k, held in sorted(holds)
    ]
    if not params:
        return
    table = WindowHoldRow.__table__
    ins = dialect_insert(session, WindowHoldRow)
    stmt = ins.on_conflict_do_update(
        index_elements=["policy_id", "member", "window_start", "data_plane_id"],
        set_={
            "held_nanos": ins.excluded.held_nanos,
            "seq": ins.excluded.seq,
            "expires_at": ins.excluded.expires_at,
            "requests": ins.excluded.requests,
        },
        where=table.c.seq < ins.excluded.seq,
    )
    session.execute(stmt, params)


@dataclass(frozen=True, slots=True)
class Hold:
    data_plane_id: str
    held_nanos: int
    seq: int
    expires_at: int
    requests: int = 0


def discount_holds(
    session: Session, data_plane_id: str, seq: int, costs: Mapping[WindowKey, int]
) -> list[WindowKey]:
    """A batch of ``data_plane_id`` sent with holds report ``seq`` is being
    applied: take its usage (``costs``) out of that data plane's holds
    recorded from newer reports (higher ``seq``). Those were reported while
    the batch was in flight, so they count its usage as unapplied, and the
    batch's own, older report cannot replace them: left alone, the usage
    would count twice (spent and held) until the data plane reports again.
    Returns the windows whose holds changed."""
    h = WindowHoldRow
    keys = sorted(k for k, cost in costs.items() if cost > 0)
    newer: list[WindowKey] = []
    for i in range(0, len(keys), DISCOUNT_CHUNK):  # usually nothing: a report raced the batch
        rows = session.execute(
            select(h.policy_id, h.member, h.window_start).where(
                (h.data_plane_id == data_plane_id)
                & (h.seq > seq)
                & tuple_(h.policy_id, h.member, h.window_start).in_(keys[i : i + DISCOUNT_CHUNK])
            )
        )
        newer += ((p, m, w) for p, m, w in rows)
    for key in sorted(newer):  # in key order, like every write of these rows
        cost = costs[key]
        session.execute(
            update(h)
            .where(
                (h.policy_id == key[0])
                & (h.member == key[1])
                & (h.window_start == key[2])
                & (h.data_plane_id == data_plane_id)
                & (h.seq > seq)
            )
            .values(held_nanos=case((h.held_nanos > cost, h.held_nanos - cost), else_=0))
        )
    return sorted(newer)


def holds_by_window(
    session: Session, keys: Iterable[WindowKey] | None, now: int
) -> dict[WindowKey, list[Hold]]:
    """The unexpired holds of each window (all windows when ``keys`` is None)."""
    h = WindowHoldRow
    q = select(h).where(h.expires_at > now)
    if keys is not None:
        wanted = list(keys)
        if not wanted:
            return {}
        q = q.where(tuple_(h.policy_id, h.member, h.window_start).in_(wanted))
    out: dict[WindowKey, list[Hold]] = {}
    for r in session.scalars(q):
        out.setdefault((r.policy_id, r.member, r.window_start), []).append(
            Hold(r.data_plane_id, r.held_nanos, r.seq, r.expires_at, r.requests)
        )
    return out


def forget_holds(session: Session, now: int) -> int:
    """Delete expired holds; how many. (A zero hold is kept until it
    expires: its ``seq`` keeps an older report from reviving the hold.)"""
    gone = session.scalars(
        delete(WindowHoldRow)
        .where(WindowHoldRow.expires_at <= now)
        .returning(WindowHoldRow.data_plane_id)
    ).all()
    return len(gone)
