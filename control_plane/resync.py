"""A full resync of one data plane, read from the store in pages.

Every policy, every price override and every window open now, as
StateUpdate pages of at most PAGE_BYTES (control_plane/statepush.py), the
last one marked and carrying the hub's change counter. The store is read in
chunks of ROWS_PER_READ rows, one short transaction each, so neither memory
nor a transaction grows with the state. Chunks read at different moments
are consistent enough: the caller subscribed to the hub before the first
read, so every change committed meanwhile also reaches the data plane as an
increment after the last page, and increments are idempotent (policy
versions, deletions that stick, spend totals that only grow).

snapshot and policy_snapshot are the whole state in one message, for data
planes of earlier releases.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence

from sqlalchemy.orm import Session

from control_plane import convert, statepush
from control_plane.pricing import PricingAdmin
from control_plane.runtime import Runtime
from control_plane.store import repo
from control_plane.store.models import PolicyRow, WindowSpendRow
from spendgate.v1 import dataplane_pb2 as dp

ROWS_PER_READ = 2000


async def pages(
    cp: Runtime, pricing: PricingAdmin, seq: int, limit: int = statepush.PAGE_BYTES
) -> AsyncIterator[dp.StateUpdate]:
    """The resync's pages in order; ``seq``: the hub's counter when it began."""
    pager = statepush.Pager(limit)
    number = 0

    def numbered(page: dp.StateUpdate) -> dp.StateUpdate:
        nonlocal number
        page.resync.page = number
        number += 1
        return page

    limits: dict[str, int] = {}  # policy id -> amount (nanos), for the windows
    after = ""
    while True:
        rows = await cp.run(functools.partial(_resync_policies, after_id=after))
        for r in rows:
            limits[r.id] = r.amount_nanos
            pager.policy(statepush.dataplane_policy(r))
        for page in pager.take():
            yield numbered(page)
        if len(rows) < ROWS_PER_READ:
            break
        after = rows[-1].id

    for o in await pricing.dataplane_overrides():
        pager.override(o)

    at = int(cp.clock().timestamp())
    key: repo.WindowKey | None = None
    while True:
        chunk, key = await cp.run(
            functools.partial(_resync_windows, at=at, after=key, limits=limits)
        )
        for ws in chunk:
            pager.spend(ws)
        for page in pager.take():
            yield numbered(page)
        if key is None:
            break

    *full, last = pager.finish()
    for page in full:
        yield numbered(page)
    last.resync.last = True
    last.seq = seq
    last.server_time.FromDatetime(cp.clock())
    yield numbered(last)


def _resync_policies(s: Session, *, after_id: str) -> Sequence[PolicyRow]:
    return repo.policies_without_description(s, after_id=after_id, limit=ROWS_PER_READ)


def _resync_windows(
    s: Session, *, at: int, after: repo.WindowKey | None, limits: dict[str, int]
) -> tuple[list[dp.WindowSpend], repo.WindowKey | None]:
    """One chunk of open windows with their holds, and the key to continue
    after (None when this was the last chunk)."""
    rows = repo.open_window_values(s, active_at=at, after=after, limit=ROWS_PER_READ)
    keys = [(r.policy_id, r.member, r.window_start) for r in rows]
    held = repo.holds_by_window(s, keys, at) if keys else {}
    out = [
        convert.window_spend_message(
            policy_id=r.policy_id,
            member=r.member,
            window_start=r.window_start,
            window_end=r.window_end,
            spent_nanos=r.spent_nanos,
            limit_nanos=limits[r.policy_id],
            request_count=r.request_count,
            holds=held.get(k, ()),
            adjustment_seq=r.adjustment_count,
        )
        for r, k in zip(rows, keys, strict=True)
        # A policy created after its chunk was read comes as an increment,
        # with its windows.
        if r.policy_id in limits
    ]
    return out, (keys[-1] if len(rows) == ROWS_PER_READ else None)


async def snapshot(cp: Runtime) -> dp.StateUpdate:
    """Every policy and the spend of every window open now, in one message:
    streams of data planes of earlier releases only (resync above
    pages it for the others)."""
    at = int(cp.clock().timestamp())

    def query(s: Session) -> dp.StateUpdate:
        rows = repo.all_policies(s)
        by_id = {r.id: r for r in rows}
        held = repo.holds_by_window(s, None, at)
        spend = [
            _spend_message(r, by_id[r.policy_id], held)
            for r in repo.current_spend(s, active_at=at)
            if r.policy_id in by_id
        ]
        return dp.StateUpdate(
            policies=dp.PolicySnapshot(policies=[convert.policy_message(r) for r in rows]),
            spend=spend,
            full_snapshot=True,
        )

    update = await cp.run(query)
    update.server_time.FromDatetime(cp.clock())
    return update


async def policy_snapshot(cp: Runtime) -> dp.PolicySnapshot:
    """Every policy in one message (streams of data planes of earlier
    releases only: it grows with the policy set)."""
    rows = await cp.run(repo.all_policies)
    return dp.PolicySnapshot(policies=[convert.policy_message(r) for r in rows])


def _spend_message(
    r: WindowSpendRow, p: PolicyRow, held: dict[tuple[str, str, int], list[repo.Hold]]
) -> dp.WindowSpend:
    return convert.window_spend_message(
        policy_id=r.policy_id,
        member=r.member,
        window_start=r.window_start,
        window_end=r.window_end,
        spent_nanos=r.spent_nanos,
        limit_nanos=p.amount_nanos,
        request_count=r.request_count,
        holds=held.get((r.policy_id, r.member, r.window_start), ()),
        adjustment_seq=r.adjustment_count,
    )
