"""Holds across data planes: the control plane as the arbiter near a budget's
line (DataPlaneService.Reserve), and the pieces usage reports share with it.

A data plane's hold on a window is what it counts as spent there but the
control plane has not applied: the estimates of its running requests plus its
unacknowledged usage. Reports carry absolute values ordered by ``holds_seq``;
rows lapse after ``hold_ttl_s`` (control_plane/store/repo.py, window_holds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from control_plane import convert
from control_plane.errors import InvalidArgument
from control_plane.runtime import Runtime
from control_plane.store import repo
from control_plane.store.models import PolicyRow
from spendgate.domain.policies import Action
from spendgate.domain.windows import Window, window_for
from spendgate.v1 import dataplane_pb2 as dp

MAX_WINDOWS = 50_000
MAX_RESERVE_ITEMS = 10_000
WindowKey = tuple[str, str, int]
Changed = Callable[[Session, str, Sequence[WindowKey]], None]


def check_reserve(req: dp.ReserveRequest) -> None:
    """INVALID_ARGUMENT naming the field, before any transaction."""
    if not req.data_plane_id:
        raise InvalidArgument.one("data_plane_id", "is required")
    if not req.holds:
        raise InvalidArgument.one("holds", "name at least one window")
    if req.amount_nanos < 0:
        raise InvalidArgument.one("amount_nanos", "must be >= 0")
    check_holds(req.holds, "holds", req.data_plane_id)
    check_unapplied(req.unapplied)
    if len(req.items) > MAX_RESERVE_ITEMS:
        raise InvalidArgument.one("items", f"at most {MAX_RESERVE_ITEMS}")
    for i, item in enumerate(req.items):
        if item.amount_nanos < 0:
            raise InvalidArgument.one(f"items[{i}].amount_nanos", "must be >= 0")
        check_holds(item.windows, f"items[{i}].windows", req.data_plane_id)


def decide(
    s: Session, req: dp.ReserveRequest, now: datetime, hold_ttl_s: int, changed: Changed
) -> tuple[dp.ReserveResponse, list[dp.WindowSpend]]:
    """Admit the call's requests in order, in ``s``'s transaction.

    Under the locks of the requests' window rows: a request is admitted
    while, for every window, spend + the other data planes' holds + this data
    plane's holds without the requests of this call not (yet) admitted is
    below the limit (the request that crosses the line completes, as
    everywhere in spendgate). The data plane's holds, without the requests
    refused, are recorded in the same transaction.
    """
    at = int(now.timestamp())
    items = list(req.items) or [
        # One request: its windows are those of the holds (whose held_nanos
        # are the data plane's whole holds, not this request's part).
        dp.ReserveItem(
            windows=[
                dp.WindowHold(policy_id=h.policy_id, member=h.member, window_start=h.window_start)
                for h in req.holds
            ],
            amount_nanos=req.amount_nanos,
        )
    ]
    ids = {h.policy_id for h in req.holds}
    rows = {r.id: r for r in s.scalars(select(PolicyRow).where(PolicyRow.id.in_(ids)))}
    buckets = Buckets(rows)
    holds = buckets.holds(req.holds)
    totals = repo.add_spend(
        s, (repo.SpendDelta(*k, end, 0, 0, 0) for k, (_, end) in holds.items()), now
    )
    applied = buckets.without_applied(holds, req.unapplied, s)
    keys = [(t.policy_id, t.member, t.window_start) for t in totals]
    spent = {k: t.spent_nanos for k, t in zip(keys, totals, strict=True)}
    held = repo.holds_by_window(s, keys, at)
    others = {
        k: sum(h.held_nanos for h in held.get(k, ()) if h.data_plane_id != req.data_plane_id)
        for k in keys
    }
    # Ours: the newest report wins, in the decision as in the stored rows.
    # A report newer than this call's (a batch sent after it, applied
    # before it) already counts as spent the usage this call still counts as
    # held; its holds include this call's requests, reserved before the call.
    mine = {k: holds[k][0] for k in keys}
    for k in keys:
        for h in held.get(k, ()):
            if h.data_plane_id == req.data_plane_id and h.seq > req.holds_seq:
                mine[k] = h.held_nanos
    # Each request's windows, with what it holds on each (its estimate,
    # capped per window at the policy's amount by the data plane).
    windows = [
        [
            (f[0], w.held_nanos or item.amount_nanos)
            for w in item.windows
            if (f := buckets.key(*window_key(w))) and f[0] in spent
        ]
        for item in items
    ]
    # Ours without the requests of this call; each admitted one joins.
    count = buckets.requests(req.holds)
    for item_windows in windows:
        for k, amount in item_windows:
            mine[k] = max(mine[k] - amount, 0)
            count[k] = max(count.get(k, 0) - 1, 0)
    resp = dp.ReserveResponse()
    for item_windows in windows:
        verdict = dp.ReserveVerdict(admitted=True)
        for k, _ in item_windows:
            if rejects(rows[k[0]]) and spent[k] + others[k] + mine[k] >= rows[k[0]].amount_nanos:
                verdict = dp.ReserveVerdict(admitted=False, policy_id=k[0], member=k[1])
                break
        if verdict.admitted:
            for k, amount in item_windows:
                mine[k] += amount
                count[k] = count.get(k, 0) + 1
        resp.verdicts.append(verdict)
    first = resp.verdicts[0]
    resp.admitted, resp.policy_id, resp.member = first.admitted, first.policy_id, first.member
    repo.set_holds(s, req.data_plane_id, req.holds_seq, mine.items(), at + hold_ttl_s, count)
    changed(s, "spend", keys)
    messages = total_messages(totals, rows, repo.holds_by_window(s, keys, at))
    resp.spend.extend(messages)
    resp.applied_batch_ids.extend(applied)
    return resp, messages


def total_messages(
    totals: Sequence[repo.SpendTotal],
    rows: dict[str, PolicyRow],
    held: dict[tuple[str, str, int], list[repo.Hold]],
) -> list[dp.WindowSpend]:
    return [
        convert.window_spend_message(
            policy_id=t.policy_id,
            member=t.member,
            window_start=t.window_start,
            window_end=t.window_end,
            spent_nanos=t.spent_nanos,
            limit_nanos=rows[t.policy_id].amount_nanos,
            request_count=t.request_count,
            holds=held.get((t.policy_id, t.member, t.window_start), ()),
            adjustment_seq=t.adjustment_seq,
        )
        for t in totals
    ]


def window_key(h: dp.WindowHold) -> tuple[str, str, int]:
    return h.policy_id, h.member, h.window_start.seconds


def rejects(p: PolicyRow) -> bool:
    return convert.domain_policy(p).action is Action.REJECT


def check_holds(holds: Sequence[dp.WindowHold], field: str, data_plane_id: str) -> None:
    if holds and not data_plane_id:
        raise InvalidArgument.one("data_plane_id", "is required with holds")
    if len(holds) > MAX_WINDOWS:
        raise InvalidArgument.one(field, f"at most {MAX_WINDOWS}")
    for i, h in enumerate(holds):
        if not h.policy_id:
            raise InvalidArgument.one(f"{field}[{i}].policy_id", "is required")
        if h.held_nanos < 0:
            raise InvalidArgument.one(f"{field}[{i}].held_nanos", "must be >= 0")
        if h.requests < 0:
            raise InvalidArgument.one(f"{field}[{i}].requests", "must be >= 0")


def check_unapplied(batches: Sequence[dp.UnappliedBatch]) -> None:
    if len(batches) > 1000:
        raise InvalidArgument.one("unapplied", "at most 1000 batches")
    for i, b in enumerate(batches):
        if not b.batch_id or len(b.batch_id) > 80:
            raise InvalidArgument.one(f"unapplied[{i}].batch_id", "must be 1 to 80 characters")
        check_holds(b.usage, f"unapplied[{i}].usage", "-")


class Buckets:
    """Window keys as the stored policies define them now: a data plane with
    a stale snapshot never puts spend (or holds) into a window that no longer
    exists."""

    def __init__(self, rows: dict[str, PolicyRow]) -> None:
        self.rows = rows
        self.policies = {pid: convert.domain_policy(r) for pid, r in rows.items()}
        self.windows: dict[tuple[str, int], Window] = {}

    def key(
        self, policy_id: str, member: str, window_start: int
    ) -> tuple[tuple[str, str, int], int] | None:
        """((policy, member, window start), window end), or None for an unknown policy."""
        policy = self.policies.get(policy_id)
        if policy is None:
            return None
        w = self.windows.get((policy_id, window_start))
        if w is None:
            w = self.windows[(policy_id, window_start)] = window_for(
                policy.window, datetime.fromtimestamp(window_start, UTC)
            )
        return (policy_id, member if policy.is_wildcard else "", int(w.start.timestamp())), int(
            w.end.timestamp()
        )

    def requests(self, holds: Sequence[dp.WindowHold]) -> dict[tuple[str, str, int], int]:
        """key -> running requests the reported holds include."""
        out: dict[tuple[str, str, int], int] = {}
        for h in holds:
            found = self.key(h.policy_id, h.member, h.window_start.seconds)
            if found is not None and h.requests > 0:
                out[found[0]] = out.get(found[0], 0) + h.requests
        return out

    def holds(self, holds: Sequence[dp.WindowHold]) -> dict[WindowKey, tuple[int, int]]:
        """key -> (held nanos, window end); holds on unknown policies are
        dropped."""
        out: dict[WindowKey, tuple[int, int]] = {}
        for h in holds:
            found = self.key(h.policy_id, h.member, h.window_start.seconds)
            if found is not None:
                key, end = found
                out[key] = (out.get(key, (0, end))[0] + h.held_nanos, end)
        return out

    def without_applied(
        self,
        held: dict[WindowKey, tuple[int, int]],
        unapplied: Sequence[dp.UnappliedBatch],
        session: Session,
    ) -> list[str]:
        """Take out of ``held`` the usage of the batches of ``unapplied``
        applied already (the data plane counted it as held, not knowing
        yet); their ids.

        Call it once the windows' rows are locked (repo.add_spend): a batch
        applied after this check, and before the totals were read, would be
        counted twice (in the total and as held). With the rows locked, a
        batch on these windows is applied either before the totals were read
        and is seen here, or after this transaction."""
        applied = repo.applied_batches(session, [b.batch_id for b in unapplied])
        named = []
        for b in unapplied:
            if b.batch_id not in applied:
                continue
            named.append(b.batch_id)
            for u in b.usage:
                found = self.key(u.policy_id, u.member, u.window_start.seconds)
                if found is not None and found[0] in held:
                    key, end = found
                    held[key] = (max(held[key][0] - u.held_nanos, 0), end)
        return named


async def reserve(cp: Runtime, req: dp.ReserveRequest) -> dp.ReserveResponse:
    """Admit requests near a REJECT budget's line, across data planes
    (decide, above, in one transaction)."""
    check_reserve(req)
    now = cp.clock()

    def arbitrate(s: Session) -> tuple[dp.ReserveResponse, list[dp.WindowSpend]]:
        return decide(s, req, now, cp.hold_ttl_s, cp.changed)

    def publish(result: tuple[dp.ReserveResponse, list[dp.WindowSpend]]) -> None:
        # Published like a usage batch's totals (on commit, also for a caller
        # gone meanwhile), so in the order the transactions completed: a
        # batch's mark is not overtaken by a Reserve's totals that count it.
        resp, messages = result
        if messages:
            cp.hub.publish(
                dp.StateUpdate(
                    spend=messages,
                    applied_batches=[
                        dp.AppliedBatch(data_plane_id=req.data_plane_id, batch_id=b)
                        for b in resp.applied_batch_ids
                    ],
                )
            )

    resp, _ = await cp.run(arbitrate, publish)
    return resp
