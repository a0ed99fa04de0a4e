"""ListSpend's pages, read by key from the store (policy id, member).

A page costs a few indexed range reads, whatever the number of policies or
members: the entries after the page token are the current-window rows after
it, merged with a zero entry for each non-wildcard policy that has no row
yet (its current window exists all the same). Descriptions are never loaded.

With ``top_members`` (top_page), a page holds whole policies and a wildcard
policy brings only its top spenders and the counts of its members: what
`spendgate status` shows, read in time independent of the number of members.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from control_plane import adjustments, convert, forecasts
from control_plane.errors import NotFound
from control_plane.runtime import Runtime, clamp_page_size
from control_plane.store import repo
from control_plane.store.models import PolicyRow, WindowSpendRow
from control_plane.webhooks.events import rate_per_hour
from spendgate.domain.forecast import Forecast
from spendgate.domain.policies import Policy
from spendgate.domain.pricing import format_usd
from spendgate.domain.windows import window_for
from spendgate.v1 import budget_pb2 as pb
from spendgate.wire import timestamp

CHUNK = 1000
MAX_NANOS = 2**63 - 1  # above any spend a BIGINT column holds
# Entries after which a top_members page ends (with whole policies): about
# 0.5 MB, as LIST_PAGE_BYTES bounds the other lists.
TOP_PAGE_ROWS = 2000
_AFTER_ANY_START = 2**62  # sorts after every window start of a key


def page(
    s: Session,
    *,
    policy_id: str,
    member: str,
    after: tuple[str, str],
    limit: int,
    now: datetime,
) -> list[tuple[WindowSpendRow, PolicyRow]]:
    """Up to ``limit`` (row, policy) pairs with (policy id, member) after
    ``after``, in that order; a policy with nothing spent yet comes with a
    zero row."""
    at = int(now.timestamp())
    policies: dict[str, PolicyRow] = {}
    starts: dict[str, int] = {}

    def start_of(p: PolicyRow) -> int:
        if p.id not in starts:
            starts[p.id] = int(window_for(convert.window_spec(p), now).start.timestamp())
        return starts[p.id]

    def spent() -> Iterator[tuple[tuple[str, str], int, WindowSpendRow, PolicyRow]]:
        key: repo.WindowKey = (after[0], after[1], _AFTER_ANY_START)
        while True:
            rows = repo.open_windows_page(
                s, active_at=at, after=key, limit=CHUNK, policy_id=policy_id, member=member
            )
            missing = {r.policy_id for r in rows} - policies.keys()
            policies.update({p.id: p for p in repo.policies_by_id(s, missing, description=False)})
            for r in rows:
                p = policies.get(r.policy_id)
                # After a policy's window is changed, rows of its old windows
                # may still contain `now`: only the current window counts.
                if p is not None and r.window_start == start_of(p):
                    yield (r.policy_id, r.member), 0, r, p
            if len(rows) < CHUNK:
                return
            key = (rows[-1].policy_id, rows[-1].member, rows[-1].window_start)

    def unspent() -> Iterator[tuple[tuple[str, str], int, WindowSpendRow, PolicyRow]]:
        if member:
            return
        last = after[0]
        while True:
            if policy_id:
                rows = [p for p in repo.policies_by_id(s, [policy_id], description=False)]
                rows = [p for p in rows if p.id > last]
            else:
                rows = list(repo.policies_without_description(s, after_id=last, limit=CHUNK))
            for p in rows:
                policies.setdefault(p.id, p)
                if convert.domain_policy(p).is_wildcard:
                    continue
                yield (p.id, ""), 1, _zero(p, now), p
            if policy_id or len(rows) < CHUNK:
                return
            last = rows[-1].id

    out: list[tuple[WindowSpendRow, PolicyRow]] = []
    previous: tuple[str, str] | None = None
    # Sorted by key, a spent row (0) before the zero entry (1) of the same key.
    for key, _, row, p in heapq.merge(spent(), unspent(), key=lambda e: (e[0], e[1])):
        if key == previous:
            continue
        previous = key
        out.append((row, p))
        if len(out) >= limit:
            break
    return out


@dataclass(frozen=True, slots=True)
class TopPage:
    """A page of whole policies: each non-wildcard policy's entry (a zero row
    when nothing is spent yet), each wildcard policy's top spenders with the
    counts of all its members; ``last_policy_id`` is where the next page starts
    (empty: this was the last)."""

    rows: list[tuple[WindowSpendRow, PolicyRow]]
    counts: list[tuple[str, int, int, int]]  # (policy id, members, exceeded, alerting)
    last_policy_id: str


def top_page(
    s: Session,
    *,
    policy_id: str,
    after_id: str,
    policies: int,
    top: int,
    now: datetime,
    max_rows: int = TOP_PAGE_ROWS,
) -> TopPage:
    """Up to ``policies`` policies after ``after_id`` (or just ``policy_id``),
    fewer once the page holds ``max_rows`` entries (at least one policy a
    page): one primary-key read for the non-wildcard ones, an index range of
    at most ``top`` rows and a count per wildcard policy, whatever its members."""
    if policy_id:
        chosen = [p for p in repo.policies_by_id(s, [policy_id], description=False)]
        more = False
    else:
        chosen = list(repo.policies_without_description(s, after_id=after_id, limit=policies + 1))
        more = len(chosen) > policies
        chosen = chosen[:policies]
    at = int(now.timestamp())
    plain = {p.id: p for p in chosen if not convert.domain_policy(p).is_wildcard}
    found = {
        r.policy_id: r
        for r in repo.unnamed_open_windows(s, active_at=at, policy_ids=plain)
        if r.window_start == _start(plain[r.policy_id], now)
    }
    rows: list[tuple[WindowSpendRow, PolicyRow]] = []
    counts: list[tuple[str, int, int, int]] = []
    for i, p in enumerate(chosen):
        if len(rows) >= max_rows:  # the page stays far below gRPC's message limit
            chosen, more = chosen[:i], True
            break
        start = _start(p, now)
        if p.id in plain:
            rows.append((found.get(p.id) or _zero(p, now), p))
            continue
        rows += [
            (r, p) for r in repo.top_spenders(s, policy_id=p.id, window_start=start, limit=top)
        ]
        counts.append(
            (
                p.id,
                *repo.count_members(
                    s,
                    policy_id=p.id,
                    window_start=start,
                    exceeded_at=p.amount_nanos,
                    alerting_at=alerting_nanos(p.amount_nanos, convert.domain_policy(p)),
                ),
            )
        )
    return TopPage(rows, counts, chosen[-1].id if more and chosen else "")


def alerting_nanos(amount_nanos: int, policy: Policy) -> int:
    """The spend at which a member reaches the policy's lowest alert threshold
    below 100 % (as `spendgate status` reads percentages: whole percents,
    rounded down); past any spend when there is none."""
    below = [t for t in policy.alert_thresholds if t < 100]
    if not below:
        return MAX_NANOS
    return -(-min(below) * amount_nanos // 100)  # ceil: spent * 100 >= t * amount


def _start(p: PolicyRow, now: datetime) -> int:
    return int(window_for(convert.window_spec(p), now).start.timestamp())


def _zero(p: PolicyRow, now: datetime) -> WindowSpendRow:
    w = window_for(convert.window_spec(p), now)
    return WindowSpendRow(
        policy_id=p.id,
        member="",
        window_start=int(w.start.timestamp()),
        window_end=int(w.end.timestamp()),
        spent_nanos=0,
        request_count=0,
        estimated_count=0,
        adjusted_nanos=0,
        adjustment_count=0,
    )


async def list_spend(
    cp: Runtime, policy_id: str, member: str, page_size: int, page_token: str
) -> tuple[list[pb.SpendEntry], str]:
    limit = clamp_page_size(page_size, default=100)
    tokens = await cp.page_tokens()
    after: tuple[str, str] = ("", "")
    if page_token:
        parts = tokens.decode("spend", page_token, 2)
        after = (parts[0], parts[1])
    now = cp.clock()

    def query(s: Session) -> list[pb.SpendEntry]:
        if policy_id and not repo.policies_by_id(s, [policy_id], description=False):
            raise NotFound("policy", policy_id)
        rows = page(s, policy_id=policy_id, member=member, after=after, limit=limit + 1, now=now)
        # Unexpired holds only: a dead data plane's lapse on their own.
        keys = [(r.policy_id, r.member, r.window_start) for r, _ in rows]
        held = repo.holds_by_window(s, keys, int(now.timestamp()))
        return [
            _spend_entry(
                r,
                p,
                held.get(k),
                forecasts.forecast_of(r, p.amount_nanos, now, cp.forecast_horizon_s),
            )
            for k, (r, p) in zip(keys, rows, strict=True)
        ]

    entries = await cp.run(query)
    token = ""
    if len(entries) > limit:
        entries = entries[:limit]
        token = tokens.encode("spend", entries[-1].policy_id, entries[-1].member)
    return entries, token


async def list_top_spend(
    cp: Runtime, policy_id: str, page_size: int, page_token: str, top: int
) -> tuple[list[pb.SpendEntry], str, list[pb.MemberCounts]]:
    """ListSpend with top_members: a page of whole policies (``page_size``
    of them), a wildcard policy's ``top`` biggest spenders only; its
    entries, the next page's token and the wildcard policies' member counts."""
    policies = clamp_page_size(page_size, default=100)
    tokens = await cp.page_tokens()
    after = tokens.decode("spend-top", page_token, 1)[0] if page_token else ""
    now = cp.clock()

    def query(s: Session) -> tuple[list[pb.SpendEntry], list[pb.MemberCounts], str]:
        if policy_id and not repo.policies_by_id(s, [policy_id], description=False):
            raise NotFound("policy", policy_id)
        found = top_page(
            s, policy_id=policy_id, after_id=after, policies=policies, top=top, now=now
        )
        held = repo.holds_by_window(
            s,
            [(r.policy_id, r.member, r.window_start) for r, _ in found.rows],
            int(now.timestamp()),
        )
        entries = [
            _spend_entry(
                r,
                p,
                held.get((r.policy_id, r.member, r.window_start)),
                forecasts.forecast_of(r, p.amount_nanos, now, cp.forecast_horizon_s),
            )
            for r, p in found.rows
        ]
        counts = [
            pb.MemberCounts(policy_id=pid, members=n, exceeded=over, alerting=near)
            for pid, n, over, near in found.counts
        ]
        return entries, counts, found.last_policy_id

    entries, counts, last = await cp.run(query)
    return entries, tokens.encode("spend-top", last) if last else "", counts


def _spend_entry(
    r: WindowSpendRow,
    p: PolicyRow,
    holds: Sequence[repo.Hold] | None = None,
    forecast: Forecast | None = None,
) -> pb.SpendEntry:
    """``remaining_usd`` is the limit less what is spent; ``held_usd`` (what
    running requests hold, across data planes) is apart from both."""
    remaining = max(p.amount_nanos - r.spent_nanos, 0)
    held = sum(h.held_nanos for h in holds or ())
    entry = pb.SpendEntry(
        policy_id=p.id,
        policy_name=p.name,
        scope=convert.scope_message(convert.domain_policy(p).scope),
        target=p.target,
        member=r.member,
        action=convert.action_message(convert.domain_policy(p).action),
        window_start=timestamp(r.window_start),
        window_end=timestamp(r.window_end),
        spent_usd=format_usd(r.spent_nanos).removeprefix("$"),
        limit_usd=format_usd(p.amount_nanos).removeprefix("$"),
        remaining_usd=format_usd(remaining).removeprefix("$"),
        exceeded=r.spent_nanos >= p.amount_nanos,
        request_count=r.request_count,
        held_usd=format_usd(held).removeprefix("$"),
        held_requests=sum(h.requests for h in holds or ()),
        adjusted_usd=adjustments.usd(r.adjusted_nanos) if r.adjustment_count else "",
        adjustment_count=r.adjustment_count or 0,
        would_reject_count=r.would_reject_count or 0,
    )
    if forecast is not None:
        entry.forecast_exhaust_time.FromSeconds(forecast.exhausted_at)
        entry.forecast_rate_usd_per_hour = rate_per_hour(forecast.rate_nanos_per_s)
    return entry
