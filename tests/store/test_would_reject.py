"""Would-reject counts of SHADOW policies in the control plane's store
(issue 15): summed per window exactly once per batch, one event per window
and member, totals on the policy. SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from control_plane.service import ControlPlane
from control_plane.store.models import WebhookEventRow
from spendgate.v1 import budget_pb2 as pb
from tests.store.builders import batch, inc, policy


def shadow(**kw: object) -> pb.BudgetPolicy:
    p = policy(**kw)  # type: ignore[arg-type]
    p.enforcement = pb.ENFORCEMENT_SHADOW
    return p


def events(engine: Engine) -> list[tuple[str, str, str]]:
    with Session(engine) as s:
        rows = s.execute(
            select(WebhookEventRow.kind, WebhookEventRow.policy_id, WebhookEventRow.member)
        ).all()
    return sorted((k, p, m) for k, p, m in rows if k == "budget_policy.would_reject")


async def test_counts_are_summed_once_per_batch_with_one_event_per_member(
    cp: ControlPlane, engine: Engine
) -> None:
    p = await cp.create_policy(shadow(amount="1", scope=pb.SCOPE_USER, target="*"), "admin")
    assert p.enforcement == pb.ENFORCEMENT_SHADOW and p.HasField("shadow_since")
    alice = inc(p.id, 0, member="alice", requests=0)
    alice.would_reject_count = 2
    await cp.apply_usage(batch("b1", alice))
    await cp.apply_usage(batch("b1", alice))  # a retry counts nothing
    alice.would_reject_count = 3
    bob = inc(p.id, 5, member="bob")
    bob.would_reject_count = 1
    await cp.apply_usage(batch("b2", alice, bob))
    assert (await cp.get_policy(p.id)).would_reject_count == 6
    [listed], _ = await cp.list_policies(10, "")
    assert listed.would_reject_count == 6
    entries, _ = await cp.list_spend(p.id, "", 10, "")
    assert {e.member: e.would_reject_count for e in entries} == {"alice": 5, "bob": 1}
    assert events(engine) == [
        ("budget_policy.would_reject", p.id, "alice"),
        ("budget_policy.would_reject", p.id, "bob"),
    ]


async def test_promotion_keeps_the_count_and_shadow_since(cp: ControlPlane) -> None:
    p = await cp.create_policy(shadow(amount="1"), "admin")
    one = inc(p.id, 0, requests=0)
    one.would_reject_count = 1
    await cp.apply_usage(batch("b1", one))

    def enforce(stored: pb.BudgetPolicy) -> pb.BudgetPolicy:
        stored.enforcement = pb.ENFORCEMENT_ENFORCED
        return stored

    promoted = await cp.update_policy(p.id, enforce, "", "admin")
    assert promoted.enforcement == pb.ENFORCEMENT_UNSPECIFIED  # enforced
    assert promoted.shadow_since == p.shadow_since
    assert (await cp.get_policy(p.id)).would_reject_count == 1
    enforced = await cp.create_policy(policy(amount="1"), "admin")
    assert not enforced.HasField("shadow_since") and enforced.would_reject_count == 0
