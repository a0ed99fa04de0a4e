"""Chargeback reports: hourly usage rollups, stored with usage batches and queried.

Data planes send, with each usage batch, what the batch's responses cost per
UTC hour and dimensions (route, provider, model, user, workspace, API key
hash, tags): ``UsageRollup`` rows, applied in the batch's transaction, so
they count exactly once (by batch_id) like spend increments.

Storage (table ``usage_rollups``): each rollup adds to its row with
``tag_key`` "" and to one row per tag it carries, so a report sums one kind of
row. A report grouped by a tag key reads that key's rows, and the requests
without the tag as the difference between the untagged rows and the key's
rows (empty value), so every report's groups add up to the same total.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    delete,
    func,
    literal,
    select,
    text,
    tuple_,
    union_all,
)
from sqlalchemy.orm import Session

from control_plane.errors import InvalidArgument
from control_plane.store.models import UsageRollupRow
from control_plane.store.repo import dialect_insert
from spendgate.domain.pricing import MAX_COST_NANOS, format_usd
from spendgate.v1 import reports_pb2 as rp
from spendgate.visible import first_unsafe

HOUR_S = 3600
# Rollups are kept this long unless the control plane is told otherwise
# (report_retention_days).
DEFAULT_RETENTION_DAYS = 400
# Bounds of one rollup's values (the data plane's own bounds are lower).
MAX_TEXT_CHARS = 512
MAX_PROVIDER_CHARS = 64
MAX_KEY_HASH_CHARS = 128
MAX_TAGS = 32
MAX_COUNT = MAX_COST_NANOS
# Latest hour a rollup or a query may name (year 9999).
MAX_SECONDS = 253_402_300_799
MAX_ROLLUPS_PER_BATCH = 50_000

_C = UsageRollupRow.__table__.c
# Dimension name -> column, in the order reports list them.
DIMENSIONS: dict[str, str] = {
    "hour": "hour",
    "route": "route",
    "provider": "provider",
    "model": "model",
    "user": "user_name",
    "workspace": "workspace",
    "api_key": "api_key_hash",
}
TAG_PREFIX = "tag:"
_SUMS = ("cost_nanos", "input_tokens", "output_tokens", "request_count", "estimated_count")
_TEXT_LIMITS = {
    "route": MAX_TEXT_CHARS,
    "provider": MAX_PROVIDER_CHARS,
    "model": MAX_TEXT_CHARS,
    "user": MAX_TEXT_CHARS,
    "workspace": MAX_TEXT_CHARS,
    "api_key_hash": MAX_KEY_HASH_CHARS,
}


# ---- ingest ------------------------------------------------------------------


def check(r: rp.UsageRollup) -> str | None:
    """Why ``r`` cannot be stored (names the field and the bound), or None."""
    if r.hour < 0 or r.hour > MAX_SECONDS or r.hour % HOUR_S:
        return f"hour {r.hour} is not the start of an hour (Unix seconds, 0 to {MAX_SECONDS})"
    for name, limit in _TEXT_LIMITS.items():
        value = getattr(r, name)
        if len(value) > limit:
            return f"{name} is longer than {limit} characters"
        if first_unsafe(value) is not None:
            return f"{name} has a control character"
    if len(r.tags) > MAX_TAGS:
        return f"more than {MAX_TAGS} tags ({len(r.tags)})"
    for k, v in r.tags.items():
        if not k or not v:
            return "a tag has an empty key or value"
        if len(k) > MAX_TEXT_CHARS or len(v) > MAX_TEXT_CHARS:
            return f"a tag key or value is longer than {MAX_TEXT_CHARS} characters"
        if first_unsafe(k) is not None or first_unsafe(v) is not None:
            return "a tag has a control character"
    for name in _SUMS:
        if getattr(r, name) < 0:
            return f"{name} is negative"
    if r.request_count < 1 or r.estimated_count > r.request_count:
        return "request_count must be at least 1 and at least estimated_count"
    return None


def key_hash(values: Sequence[str]) -> str:
    """The row key of a rollup's dimensions (128 bits of SHA-256)."""
    return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()[:32]


@dataclass(slots=True)
class _Row:
    hour: int
    dims: tuple[str, ...]  # route, provider, model, user, workspace, api key, tag key, value
    sums: list[int] = field(default_factory=lambda: [0] * len(_SUMS))

    def add(self, r: rp.UsageRollup) -> None:
        for i, name in enumerate(_SUMS):
            self.sums[i] = min(self.sums[i] + getattr(r, name), MAX_COUNT)


def rows_of(rollups: Iterable[rp.UsageRollup]) -> list[_Row]:
    """The table rows ``rollups`` add to (valid rollups only), summed per
    row, in key order (rows are locked in one order: no deadlocks)."""
    rows: dict[tuple[int, str], _Row] = {}
    for r in rollups:
        base = (r.route, r.provider, r.model, r.user, r.workspace, r.api_key_hash)
        for tag in (("", ""), *sorted(r.tags.items())):
            dims = (*base, *tag)
            k = (r.hour, key_hash(dims))
            row = rows.get(k)
            if row is None:
                row = rows[k] = _Row(r.hour, dims)
            row.add(r)
    return [rows[k] for k in sorted(rows)]


_PG_ADD = text("""
    INSERT INTO usage_rollups AS u (hour, key_hash, route, provider, model, user_name,
        workspace, api_key_hash, tag_key, tag_value, cost_nanos, input_tokens, output_tokens,
        request_count, estimated_count)
    SELECT * FROM unnest(CAST(:h AS bigint[]), CAST(:k AS varchar[]), CAST(:ro AS varchar[]),
        CAST(:pr AS varchar[]), CAST(:mo AS varchar[]), CAST(:us AS varchar[]),
        CAST(:ws AS varchar[]), CAST(:ak AS varchar[]), CAST(:tk AS varchar[]),
        CAST(:tv AS varchar[]), CAST(:c AS bigint[]), CAST(:i AS bigint[]),
        CAST(:o AS bigint[]), CAST(:r AS bigint[]), CAST(:e AS bigint[]))
    ON CONFLICT (hour, key_hash) DO UPDATE SET
        cost_nanos = LEAST(u.cost_nanos, 9223372036854775807 - excluded.cost_nanos)
                     + excluded.cost_nanos,
        input_tokens = LEAST(u.input_tokens, 9223372036854775807 - excluded.input_tokens)
                       + excluded.input_tokens,
        output_tokens = LEAST(u.output_tokens, 9223372036854775807 - excluded.output_tokens)
                        + excluded.output_tokens,
        request_count = LEAST(u.request_count, 9223372036854775807 - excluded.request_count)
                        + excluded.request_count,
        estimated_count = LEAST(u.estimated_count,
                                9223372036854775807 - excluded.estimated_count)
                          + excluded.estimated_count
""")
_DIM_COLUMNS = (
    "route",
    "provider",
    "model",
    "user_name",
    "workspace",
    "api_key_hash",
    "tag_key",
    "tag_value",
)


def add(session: Session, rows: Sequence[_Row]) -> None:
    """Add ``rows`` (from ``rows_of``) to the table: ``x = x + delta`` per
    row, saturating at the int64 maximum, in one statement."""
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        params: dict[str, list[object]] = {
            "h": [r.hour for r in rows],
            "k": [key_hash(r.dims) for r in rows],
        }
        for i, name in enumerate(("ro", "pr", "mo", "us", "ws", "ak", "tk", "tv")):
            params[name] = [r.dims[i] for r in rows]
        for i, name in enumerate(("c", "i", "o", "r", "e")):
            params[name] = [r.sums[i] for r in rows]
        session.execute(_PG_ADD, params)
        return
    ins = dialect_insert(session, UsageRollupRow)
    stmt = ins.on_conflict_do_update(
        index_elements=["hour", "key_hash"],
        set_={
            name: func.min(_C[name], MAX_COUNT - ins.excluded[name]) + ins.excluded[name]
            for name in _SUMS
        },
    )
    session.execute(
        stmt,
        [
            {
                "hour": r.hour,
                "key_hash": key_hash(r.dims),
                **dict(zip(_DIM_COLUMNS, r.dims, strict=True)),
                **dict(zip(_SUMS, r.sums, strict=True)),
            }
            for r in rows
        ],
    )


def forget(session: Session, before: datetime) -> int:
    """Delete the rollups of hours that started before ``before``; how many."""
    cutoff = int(before.timestamp()) // HOUR_S * HOUR_S
    result = session.execute(delete(UsageRollupRow).where(UsageRollupRow.hour < cutoff))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


# ---- queries -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """A validated QuerySpendRequest (without its page)."""

    group_by: tuple[str, ...]
    tag_key: str
    start: int  # first hour, Unix seconds
    end: int  # hours before this
    filters: tuple[tuple[str, str], ...]  # (column, value) of non-tag dimensions
    tag_filter: tuple[str, str] | None

    @property
    def columns(self) -> list[str]:
        return [*self.group_by, *((TAG_PREFIX + self.tag_key,) if self.tag_key else ())]

    def digest(self) -> str:
        """Names the query in its page tokens: a token is good for this query only."""
        return hashlib.sha256(
            json.dumps(
                [self.group_by, self.tag_key, self.start, self.end, self.filters, self.tag_filter]
            ).encode()
        ).hexdigest()[:16]


def _text_arg(field: str, value: str) -> None:
    if len(value) > MAX_TEXT_CHARS:
        raise InvalidArgument.one(field, f"must be at most {MAX_TEXT_CHARS} characters")
    if first_unsafe(value) is not None:
        raise InvalidArgument.one(field, "must not contain control characters")


def parse_query(req: rp.QuerySpendRequest, now: datetime) -> Query:
    """Validate ``req``; InvalidArgument naming the field otherwise."""
    names = list(req.group_by)
    if len(names) > len(DIMENSIONS):
        raise InvalidArgument.one("group_by", f"at most {len(DIMENSIONS)} dimensions")
    for name in names:
        if name not in DIMENSIONS:
            raise InvalidArgument.one(
                "group_by",
                f"unknown dimension {name[:40]!r}; one of: {', '.join(DIMENSIONS)}"
                " (group by a tag with tag_key)",
            )
    if len(set(names)) != len(names):
        raise InvalidArgument.one("group_by", "names a dimension twice")
    _text_arg("tag_key", req.tag_key)
    if not req.HasField("start_time"):
        raise InvalidArgument.one("start_time", "is required")
    start = req.start_time.seconds
    end = req.end_time.seconds if req.HasField("end_time") else int(now.timestamp())
    for name, value in (("start_time", start), ("end_time", end)):
        if not 0 <= value <= MAX_SECONDS:
            raise InvalidArgument.one(name, f"must be between 1970 and 9999 (got {value})")
    if end <= start:
        raise InvalidArgument.one("end_time", "must be after start_time")
    filters: list[tuple[str, str]] = []
    tag_filter: tuple[str, str] | None = None
    seen: set[str] = set()
    if len(req.filters) > len(DIMENSIONS) + 1:
        raise InvalidArgument.one("filters", f"at most {len(DIMENSIONS) + 1}")
    for n, f in enumerate(req.filters):
        where = f"filters[{n}]"
        _text_arg(f"{where}.dimension", f.dimension)
        _text_arg(f"{where}.value", f.value)
        if f.dimension in seen:
            raise InvalidArgument.one(f"{where}.dimension", "is filtered twice")
        seen.add(f.dimension)
        if f.dimension.startswith(TAG_PREFIX):
            key = f.dimension.removeprefix(TAG_PREFIX)
            if not key or not f.value:
                raise InvalidArgument.one(f"{where}", "a tag filter needs a key and a value")
            if tag_filter is not None or (req.tag_key and req.tag_key != key):
                raise InvalidArgument.one(
                    f"{where}.dimension", "a query may name one tag key (tag_key and filters)"
                )
            tag_filter = (key, f.value)
        elif f.dimension in DIMENSIONS and f.dimension != "hour":
            filters.append((DIMENSIONS[f.dimension], f.value))
        else:
            raise InvalidArgument.one(
                f"{where}.dimension",
                f"unknown dimension {f.dimension[:40]!r}; one of: "
                + ", ".join(d for d in DIMENSIONS if d != "hour")
                + ", tag:<key>",
            )
    return Query(
        group_by=tuple(names),
        tag_key=req.tag_key,
        start=start // HOUR_S * HOUR_S,
        end=end,
        filters=tuple(filters),
        tag_filter=tag_filter,
    )


def _source(q: Query, tag_key: str, value: ColumnElement[str], sign: int) -> Select[Any]:
    """The rows with ``tag_key`` in range and filtered, as the group's
    columns plus the sums (times ``sign``)."""
    conds = [_C.hour >= q.start, _C.hour < q.end, _C.tag_key == tag_key]
    conds += [_C[col] == v for col, v in q.filters]
    if q.tag_filter is not None and tag_key:
        conds.append(_C.tag_value == q.tag_filter[1])
    cols: list[ColumnElement[Any]] = [_C[DIMENSIONS[d]].label(d) for d in q.group_by]
    cols.append(value.label("tag_value"))
    cols += [(_C[s] * sign if sign < 0 else _C[s]).label(s) for s in _SUMS]
    return select(*cols).where(and_(*conds))


def query_page(
    session: Session, q: Query, after: Sequence[str | int] | None, limit: int
) -> list[rp.SpendGroup]:
    """Up to ``limit`` groups after the group ``after`` (its values), in order."""
    if q.tag_filter is not None:
        # Only the requests with that tag value: the tag's rows.
        parts = [_source(q, q.tag_filter[0], _C.tag_value, 1)]
    elif q.tag_key:
        empty = literal("")
        parts = [
            _source(q, "", empty, 1),
            _source(q, q.tag_key, empty, -1),
            _source(q, q.tag_key, _C.tag_value, 1),
        ]
    else:
        parts = [_source(q, "", literal(""), 1)]
    sub = (parts[0] if len(parts) == 1 else union_all(*parts)).subquery()
    keys: list[ColumnElement[Any]] = [sub.c[d] for d in q.group_by]
    if q.tag_key:
        keys.append(sub.c.tag_value)
    stmt = select(*keys, *(func.sum(sub.c[s]) for s in _SUMS))
    if keys:
        stmt = stmt.group_by(*keys).order_by(*keys)
        if after is not None:
            stmt = stmt.where(tuple_(*keys) > tuple_(*(literal(v) for v in after)))
    # Groups of no request: the tag's residue when every request had the tag.
    stmt = stmt.having(func.sum(sub.c.request_count) != 0).limit(limit)
    groups = []
    for row in session.execute(stmt):
        values = [
            _hour_text(v) if name == "hour" else str(v)
            for name, v in zip(q.columns, row[: len(keys)], strict=True)
        ]
        sums = [min(int(str(v or 0)), MAX_COUNT) for v in row[len(keys) :]]
        groups.append(
            rp.SpendGroup(
                values=values,
                cost_nanos=sums[0],
                cost_usd=format_usd(sums[0]).removeprefix("$"),
                input_tokens=sums[1],
                output_tokens=sums[2],
                request_count=sums[3],
                estimated_count=sums[4],
            )
        )
    return groups


def position(q: Query, group: rp.SpendGroup) -> list[str | int]:
    """A group's values as the query orders them (for the next page's start)."""
    pairs = zip(q.columns, group.values, strict=True)
    return [_hour_of(v) if name == "hour" else v for name, v in pairs]


def _hour_text(seconds: object) -> str:
    return datetime.fromtimestamp(int(str(seconds)), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hour_of(text_value: str) -> int:
    return int(datetime.strptime(text_value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
