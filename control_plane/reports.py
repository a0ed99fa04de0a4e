"""Chargeback reports: hourly usage rollups, stored with usage batches and queried.

Data planes send, with each usage batch, what the batch's responses cost per
UTC hour and dimensions (route, provider, model, user, workspace, API key
hash, tags): ``UsageRollup`` rows, applied in the batch's transaction, so
they count exactly once (by batch_id) like spend increments.

Storage: table ``usage_rollups`` has one row per hour, dimensions and tag
set; ``rollup_tags`` the tags of each tag set (written once per set). A
report grouped by a tag key joins the key's tag of each row's set: requests
without the tag form the group of the empty value, so every report's groups
add up to the same total. One row per rollup keeps ingest as cheap as
spend increments (the ingest benchmark, bench/ingest.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import ColumnElement, and_, delete, func, literal, select, text, tuple_
from sqlalchemy.orm import Session

from control_plane.errors import InvalidArgument
from control_plane.runtime import LIST_PAGE_BYTES, Runtime, clamp_page_size
from control_plane.store.models import RollupTagRow, UsageRollupRow
from control_plane.store.repo import dialect_insert
from spendgate.domain.pricing import MAX_COST_NANOS, format_usd
from spendgate.v1 import reports_pb2 as rp
from spendgate.visible import first_unsafe

HOUR_S = 3600
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
_TAGS = RollupTagRow.__table__
_T = _TAGS.c
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
    """Why ``r`` cannot be stored (names the field and the bound), or None.
    ``rows_of`` checks the same for a whole batch, faster; this names the
    problem of a rollup it found one in."""
    if r.hour < 0 or r.hour > MAX_SECONDS or r.hour % HOUR_S:
        return f"hour {r.hour} is not the start of an hour (Unix seconds, 0 to {MAX_SECONDS})"
    texts = [r.route, r.provider, r.model, r.user, r.workspace, r.api_key_hash]
    for value, (name, limit) in zip(texts, _TEXT_LIMITS.items(), strict=True):
        if len(value) > limit:
            return f"{name} is longer than {limit} characters"
    tags = r.tags
    if len(tags) > MAX_TAGS:
        return f"more than {MAX_TAGS} tags ({len(tags)})"
    for k, v in tags.items():
        if not k or not v:
            return "a tag has an empty key or value"
        if len(k) > MAX_TEXT_CHARS or len(v) > MAX_TEXT_CHARS:
            return f"a tag key or value is longer than {MAX_TEXT_CHARS} characters"
        texts += (k, v)
    if first_unsafe("".join(texts)) is not None:
        names = [*_TEXT_LIMITS, *["a tag"] * (len(texts) - 6)]
        for value, name in zip(texts, names, strict=True):
            if first_unsafe(value) is not None:
                return f"{name} has a control character"
    if min(r.cost_nanos, r.input_tokens, r.output_tokens, r.estimated_count) < 0:
        return "cost_nanos, input_tokens, output_tokens and estimated_count must not be negative"
    if r.request_count < 1 or r.estimated_count > r.request_count:
        return "request_count must be at least 1 and at least estimated_count"
    return None


def _md5(text_value: str) -> str:
    return hashlib.md5(text_value.encode(), usedforsecurity=False).hexdigest()


def tag_set_of(tags: Iterable[tuple[str, str]]) -> str:
    """The id of a set of tags ("" for none): MD5 (an identifier, not a
    secret) of its sorted key/value pairs joined by U+001E and U+001F, which
    no checked value contains."""
    pairs = sorted(tags)
    return _md5("\x1f".join(f"{k}\x1e{v}" for k, v in pairs)) if pairs else ""


def key_hash(dims: Sequence[str]) -> str:
    """The row key of a rollup's dimensions and tag set: MD5 of the values
    joined by U+001F, as PostgreSQL computes it in ``add``."""
    return _md5("\x1f".join(dims))


# One table row: (hour, route, provider, model, user, workspace, api key hash,
# tag set) -> [cost, input tokens, output tokens, requests, estimated]
RowKey = tuple[int, str, str, str, str, str, str, str]


@dataclass(slots=True)
class Rows:
    """What a batch's rollups add: table rows summed per key, in key order
    (rows are locked in one order: no deadlocks), and their tag sets."""

    rows: list[tuple[RowKey, list[int]]]
    tag_sets: dict[str, list[tuple[str, str]]]


def rows_of(rollups: Sequence[rp.UsageRollup]) -> tuple[Rows, list[str]]:
    """The rows the valid ``rollups`` add to, and why each invalid one was
    left out (``check``).

    The ingest path of every batch: each field is read once, and the text of
    the whole batch is scanned for control characters at once; only when it
    has one is each rollup checked on its own."""
    rows: dict[RowKey, list[int]] = {}
    sets: dict[str, list[tuple[str, str]]] = {}
    texts: list[str] = []
    problems: list[str] = []
    seen_sets: dict[tuple[tuple[str, str], ...], str] = {}
    for r in rollups:
        hour, route, provider, model = r.hour, r.route, r.provider, r.model
        user, workspace, api_key = r.user, r.workspace, r.api_key_hash
        add = [r.cost_nanos, r.input_tokens, r.output_tokens, r.request_count, r.estimated_count]
        tags = r.tags
        if (
            hour % HOUR_S
            or not 0 <= hour <= MAX_SECONDS
            or min(add) < 0
            or add[3] < 1
            or add[4] > add[3]
            or len(route) > MAX_TEXT_CHARS
            or len(provider) > MAX_PROVIDER_CHARS
            or len(model) > MAX_TEXT_CHARS
            or len(user) > MAX_TEXT_CHARS
            or len(workspace) > MAX_TEXT_CHARS
            or len(api_key) > MAX_KEY_HASH_CHARS
            or len(tags) > MAX_TAGS
        ):
            problems.append(check(r) or "invalid")
            continue
        tag_set = ""
        if tags:
            pairs = tuple(sorted(tags.items()))
            found = seen_sets.get(pairs)
            if found is None:
                if not all(
                    0 < len(k) <= MAX_TEXT_CHARS and 0 < len(v) <= MAX_TEXT_CHARS for k, v in pairs
                ):
                    problems.append(check(r) or "invalid")
                    continue
                found = seen_sets[pairs] = tag_set_of(pairs)
                sets[found] = list(pairs)
                texts.extend(k + v for k, v in pairs)
            tag_set = found
        texts += (route, provider, model, user, workspace, api_key)
        key = (hour, route, provider, model, user, workspace, api_key, tag_set)
        into = rows.get(key)
        if into is None:
            rows[key] = add
        else:
            for i in range(5):
                into[i] = min(into[i] + add[i], MAX_COUNT)
    if first_unsafe("".join(texts)) is not None:
        good = [r for r in rollups if check(r) is None]
        return rows_of(good)[0], [p for r in rollups if (p := check(r)) is not None]
    return Rows(sorted(rows.items()), sets), problems


# PostgreSQL reads the rows as one JSON array, parsed once (jsonb): far cheaper
# for both sides than an array per column; it computes the key hash itself, as
# key_hash does.
_PG_ADD = text("""
    INSERT INTO usage_rollups AS u (hour, key_hash, route, provider, model, user_name,
        workspace, api_key_hash, tag_set, cost_nanos, input_tokens, output_tokens,
        request_count, estimated_count)
    SELECT (x->>0)::bigint, md5(concat_ws(chr(31), x->>1, x->>2, x->>3, x->>4, x->>5, x->>6,
                                          x->>7)),
        x->>1, x->>2, x->>3, x->>4, x->>5, x->>6, x->>7, (x->>8)::bigint, (x->>9)::bigint,
        (x->>10)::bigint, (x->>11)::bigint, (x->>12)::bigint
    FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS t(x, n)
    ORDER BY n
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
_DIM_COLUMNS = ("route", "provider", "model", "user_name", "workspace", "api_key_hash", "tag_set")


def add(session: Session, rows: Rows, known_sets: Collection[str] = ()) -> list[str]:
    """Add ``rows`` (from ``rows_of``) to the tables: ``x = x + delta`` per
    row, saturating at the int64 maximum, in one statement; and the tag
    sets not in ``known_sets`` (already stored). Returns the tag sets written."""
    new_sets = sorted(t for t in rows.tag_sets if t not in known_sets)
    if new_sets:
        tags = dialect_insert(session, RollupTagRow).on_conflict_do_nothing(
            index_elements=["tag_set", "tag_key"]
        )
        session.execute(
            tags,
            [
                {"tag_set": t, "tag_key": k, "tag_value": v}
                for t in new_sets
                for k, v in rows.tag_sets[t]
            ],
        )
    if not rows.rows:
        return new_sets
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_PG_ADD, {"rows": orjson.dumps([(*k, *v) for k, v in rows.rows]).decode()})
        return new_sets
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
                "hour": k[0],
                "key_hash": key_hash(k[1:]),
                **dict(zip(_DIM_COLUMNS, k[1:], strict=True)),
                **dict(zip(_SUMS, v, strict=True)),
            }
            for k, v in rows.rows
        ],
    )
    return new_sets


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
    # False when end is the time of the first page (no end_time): the next
    # pages keep that end (their tokens carry it).
    end_given: bool = True

    @property
    def columns(self) -> list[str]:
        return [*self.group_by, *((TAG_PREFIX + self.tag_key,) if self.tag_key else ())]

    def digest(self) -> str:
        """Names the query in its page tokens: a token is good for this query only."""
        return hashlib.sha256(
            json.dumps(
                [
                    self.group_by,
                    self.tag_key,
                    self.start,
                    self.end if self.end_given else None,
                    self.filters,
                    self.tag_filter,
                ]
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
        end_given=req.HasField("end_time"),
    )


def query_page(
    session: Session, q: Query, after: Sequence[str | int] | None, limit: int
) -> list[rp.SpendGroup]:
    """Up to ``limit`` groups after the group ``after`` (its values), in order."""
    conds = [_C.hour >= q.start, _C.hour < q.end]
    conds += [_C[col] == v for col, v in q.filters]
    keys: list[ColumnElement[Any]] = [_C[DIMENSIONS[d]] for d in q.group_by]
    source: Any = UsageRollupRow.__table__
    tag_key = q.tag_filter[0] if q.tag_filter is not None else q.tag_key
    if tag_key:
        on = and_(_T.tag_set == _C.tag_set, _T.tag_key == tag_key)
        if q.tag_filter is not None:
            # Only the requests with that tag value.
            source = source.join(_TAGS, and_(on, _T.tag_value == q.tag_filter[1]))
        else:
            # Requests without the tag: the group of the empty value.
            source = source.outerjoin(_TAGS, on)
        if q.tag_key:
            keys.append(func.coalesce(_T.tag_value, ""))
    if session.get_bind().dialect.name == "sqlite":
        # SQLite's SUM fails on an int64 overflow (PostgreSQL's is exact):
        # sum the high and the low 32 bits apart, each far from overflowing.
        sums: list[ColumnElement[Any]] = []
        for name in _SUMS:
            sums += (func.sum(_C[name].op(">>")(32)), func.sum(_C[name].op("&")(0xFFFFFFFF)))
    else:
        sums = [func.sum(_C[name]) for name in _SUMS]
    stmt = select(*keys, *sums).select_from(source).where(*conds)
    if keys:
        stmt = stmt.group_by(*keys).order_by(*keys)
        if after is not None:
            stmt = stmt.having(tuple_(*keys) > tuple_(*(literal(v) for v in after)))
    else:
        # One total: none when there is no usage at all.
        stmt = stmt.having(func.count() > 0)
    groups = []
    for row in session.execute(stmt.limit(limit)):
        values = [
            _hour_text(v) if name == "hour" else str(v)
            for name, v in zip(q.columns, row[: len(keys)], strict=True)
        ]
        found = [int(str(v or 0)) for v in row[len(keys) :]]
        if len(found) > len(_SUMS):  # SQLite: high and low halves
            found = [(hi << 32) + lo for hi, lo in zip(found[::2], found[1::2], strict=True)]
        totals = [min(v, MAX_COUNT) for v in found]
        groups.append(
            rp.SpendGroup(
                values=values,
                cost_nanos=totals[0],
                cost_usd=format_usd(totals[0]).removeprefix("$"),
                input_tokens=totals[1],
                output_tokens=totals[2],
                request_count=totals[3],
                estimated_count=totals[4],
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


async def query_spend(cp: Runtime, req: rp.QuerySpendRequest) -> rp.QuerySpendResponse:
    """ReportService.QuerySpend: a page of groups (control_plane/py)."""
    q = parse_query(req, cp.clock())
    limit = clamp_page_size(req.page_size, default=100)
    tokens = await cp.page_tokens()
    kind = "report-" + q.digest()
    after: list[str | int] | None = None
    if req.page_token:
        encoded, end = tokens.decode(kind, req.page_token, 2)
        after = json.loads(encoded)
        # Every page of a query without end_time ends where the first did.
        q = dataclasses.replace(q, end=int(end))
    groups = await cp.run(lambda s: query_page(s, q, after, limit + 1))
    token = ""
    # A page ends at page_size groups or at about LIST_PAGE_BYTES.
    size, kept = 0, 0
    for g in groups[:limit]:
        size += g.ByteSize()
        kept += 1
        if size >= LIST_PAGE_BYTES:
            break
    if kept < len(groups):
        groups = groups[:kept]
        token = tokens.encode(kind, json.dumps(position(q, groups[-1])), str(q.end))
    return rp.QuerySpendResponse(columns=q.columns, groups=groups, next_page_token=token)
