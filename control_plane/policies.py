"""Budget policies: create, read, list, update, delete (BudgetService), one
transaction each; every change is pushed to all data planes once committed."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control_plane import convert, names, statepush
from control_plane.errors import EtagMismatch, NotFound
from control_plane.runtime import LIST_PAGE_BYTES, Runtime, clamp_page_size
from control_plane.store import repo
from control_plane.store.models import PolicyRow
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp

log = structlog.get_logger("spendgate.control_plane")


async def create_policy(cp: Runtime, msg: pb.BudgetPolicy, author: str) -> pb.BudgetPolicy:
    values = convert.policy_values(msg, default_week_start=cp.default_week_start)
    now = cp.clock()

    def create(s: Session) -> PolicyRow:
        row = PolicyRow(
            id=repo.new_policy_id(),
            create_time=now,
            update_time=now,
            created_by=author,
            updated_by=author,
            version=1,
        )
        convert.apply_values(row, values, now)
        names.check_free(s, PolicyRow, "policy", row.name, row.id)
        s.add(row)
        cp.changed(s, "policies", [row.id])
        return row

    try:
        row = await cp.run(create)
    except IntegrityError:
        raise names.taken("policy", values.name) from None
    log.info("policy created", policy_id=row.id, name=row.name, author=author)
    publish_policy_changes(cp, upserts=[row])
    return convert.policy_message(row)


async def get_policy(cp: Runtime, policy_id: str) -> pb.BudgetPolicy:
    def query(s: Session) -> pb.BudgetPolicy:
        row = repo.get_policy(s, policy_id)
        if row is None:
            raise NotFound("policy", policy_id)
        counts = repo.would_reject_counts(s, [row])
        return convert.policy_message(row, counts.get(row.id, 0))

    return await cp.run(query)


async def list_policies(
    cp: Runtime, page_size: int, page_token: str
) -> tuple[list[pb.BudgetPolicy], str]:
    limit = clamp_page_size(page_size, default=50)
    tokens = await cp.page_tokens()
    after = tokens.decode("policies", page_token, 1)[0] if page_token else ""

    def query(s: Session) -> tuple[list[pb.BudgetPolicy], str, bool]:
        rows, more = repo.list_policies_sized(
            s, after_id=after, limit=limit, max_bytes=LIST_PAGE_BYTES
        )
        counts = repo.would_reject_counts(s, rows)
        last = rows[-1].id if rows else ""
        return [convert.policy_message(r, counts.get(r.id, 0)) for r in rows], last, more

    page, last, more = await cp.run(query)
    token = tokens.encode("policies", last) if more else ""
    return page, token


async def update_policy(
    cp: Runtime,
    policy_id: str,
    merge: Callable[[pb.BudgetPolicy], pb.BudgetPolicy],
    expected_etag: str,
    author: str,
) -> pb.BudgetPolicy:
    """Read, merge (``merge`` applies the field mask to the stored message),
    validate and write in one transaction; the row is locked meanwhile."""
    now = cp.clock()
    wanted = {"name": ""}  # the name written, for a concurrent writer's error

    def update(s: Session) -> PolicyRow:
        row = _locked(s, policy_id, expected_etag)
        merged = merge(convert.policy_message(row))
        values = convert.policy_values(merged, default_week_start=cp.default_week_start)
        convert.apply_values(row, values, now)
        wanted["name"] = row.name
        names.check_free(s, PolicyRow, "policy", row.name, row.id)
        row.update_time = now
        row.updated_by = author
        row.version += 1
        cp.changed(s, "policies", [row.id])
        return row

    try:
        row = await cp.run(update)
    except IntegrityError:
        raise names.taken("policy", wanted["name"]) from None
    log.info("policy updated", policy_id=row.id, author=author, version=row.version)
    publish_policy_changes(cp, upserts=[row])
    return convert.policy_message(row)


async def delete_policy(cp: Runtime, policy_id: str, expected_etag: str, author: str) -> None:
    def delete(s: Session) -> None:
        row = _locked(s, policy_id, expected_etag)
        repo.delete_policy(s, row)
        cp.changed(s, "policies", [policy_id])

    await cp.run(delete)
    log.info("policy deleted", policy_id=policy_id, author=author)
    publish_policy_changes(cp, deleted=[policy_id])


def publish_policy_changes(
    cp: Runtime, upserts: Iterable[PolicyRow] = (), deleted: Iterable[str] = ()
) -> None:
    cp.hub.publish(
        dp.StateUpdate(
            policy_changes=dp.PolicyChanges(
                upserts=[statepush.dataplane_policy(r) for r in upserts],
                deleted_ids=list(deleted),
            )
        )
    )


async def publish_policies(cp: Runtime, ids: Collection[str]) -> None:
    """Push the current state of these policies (as they are, or deleted)."""
    rows = await cp.run(lambda s: repo.policies_by_id(s, ids))
    found = {r.id for r in rows}
    publish_policy_changes(cp, rows, [i for i in ids if i not in found])


def _locked(s: Session, policy_id: str, expected_etag: str) -> PolicyRow:
    """The policy's row, locked until the transaction ends; NotFound, or
    EtagMismatch when ``expected_etag`` is set and differs."""
    row = s.get(PolicyRow, policy_id, with_for_update=True)
    if row is None:
        raise NotFound("policy", policy_id)
    if expected_etag and expected_etag != convert.etag(row):
        raise EtagMismatch(policy_id)
    return row
