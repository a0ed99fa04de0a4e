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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from control_plane import convert
from control_plane.store import repo
from control_plane.store.models import PolicyRow, WindowSpendRow
from spendgate.domain.policies import Policy
from spendgate.domain.windows import window_for

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
