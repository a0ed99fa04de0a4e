"""ListSpend read page by page (control_plane/spend_list.py): small pages
give exactly what one large page gives, in key order, zero entries of
unspent policies included, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from control_plane.service import ControlPlane
from spendgate.v1 import budget_pb2 as pb
from tests.harness import FakeClock
from tests.store.builders import batch, inc, policy


async def all_pages(cp: ControlPlane, size: int, **kw: str) -> tuple[list[pb.SpendEntry], int]:
    entries: list[pb.SpendEntry] = []
    token, pages = "", 0
    while True:
        page, token = await cp.list_spend(
            kw.get("policy_id", ""), kw.get("member", ""), size, token
        )
        entries += page
        pages += 1
        if not token:
            return entries, pages


async def test_small_pages_add_up_to_one_large_page(cp: ControlPlane, clock: FakeClock) -> None:
    spent = await cp.create_policy(policy("spent"), "a")
    users = await cp.create_policy(policy("users", scope=pb.SCOPE_USER, target="*"), "a")
    unspent = await cp.create_policy(policy("unspent"), "a")
    members = [f"user-{i:02d}" for i in range(25)]
    await cp.apply_usage(
        batch(
            "b1", inc(spent.id, 5), *[inc(users.id, i + 1, member=m) for i, m in enumerate(members)]
        )
    )
    whole, _ = await cp.list_spend("", "", 1000, "")
    keys = [(e.policy_id, e.member) for e in whole]
    assert keys == sorted(keys)
    assert len(whole) == 2 + len(members)
    assert {e.policy_id for e in whole if e.spent_usd == "0.00"} == {unspent.id}

    paged, pages = await all_pages(cp, 4)
    assert paged == whole and pages == 7
    one, _ = await all_pages(cp, 3, policy_id=users.id)
    assert [e.member for e in one] == members
    only, _ = await all_pages(cp, 3, member="user-07")
    assert [(e.policy_id, e.member, e.request_count) for e in only] == [(users.id, "user-07", 1)]

    clock.advance(timedelta(hours=1))  # a new window: nothing spent in it yet
    later, _ = await all_pages(cp, 2)
    assert sorted(e.policy_id for e in later) == sorted([spent.id, unspent.id])
