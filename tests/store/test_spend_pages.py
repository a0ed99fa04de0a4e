"""ListSpend read page by page (control_plane/spend_list.py): small pages
give exactly what one large page gives, in key order, zero entries of
unspent policies included, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from control_plane import spend_list
from control_plane.service import ControlPlane
from control_plane.store import repo
from spendgate.v1 import budget_pb2 as pb
from tests.harness import FakeClock
from tests.store.builders import T0, batch, inc, policy


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


async def all_top_pages(
    cp: ControlPlane, size: int, top: int, policy_id: str = ""
) -> tuple[list[pb.SpendEntry], list[pb.MemberCounts], int]:
    entries: list[pb.SpendEntry] = []
    counts: list[pb.MemberCounts] = []
    token, pages = "", 0
    while True:
        page, token, more = await cp.list_top_spend(policy_id, size, token, top)
        entries += page
        counts += more
        pages += 1
        if not token:
            return entries, counts, pages


async def test_top_members_read_whole_policies_and_count_every_member(
    cp: ControlPlane, clock: FakeClock
) -> None:
    usd = 10**9
    spent = await cp.create_policy(policy("spent"), "a")
    users = await cp.create_policy(
        policy("users", amount="1.00", scope=pb.SCOPE_USER, target="*", thresholds=(50, 100)), "a"
    )
    unspent = await cp.create_policy(policy("unspent"), "a")
    idle = await cp.create_policy(policy("idle", scope=pb.SCOPE_USER, target="*"), "a")
    # 25 members: user-00 .. user-24 spending 0.05 .. 1.25 dollars; two tie at the top.
    members = {f"user-{i:02d}": (i + 1) * usd // 20 for i in range(25)}
    members["user-99"] = members["user-24"]
    await cp.apply_usage(
        batch(
            "b1",
            inc(spent.id, 5),
            *[inc(users.id, cost, member=m) for m, cost in members.items()],
        )
    )
    entries, counts, pages = await all_top_pages(cp, 1000, 3)
    assert pages == 1
    by_policy: dict[str, list[tuple[str, str]]] = {}
    for e in entries:
        by_policy.setdefault(e.policy_id, []).append((e.member, e.spent_usd))
    assert by_policy == {
        spent.id: [("", "0.000000005")],
        unspent.id: [("", "0.00")],
        users.id: [("user-24", "1.25"), ("user-99", "1.25"), ("user-23", "1.20")],
    }
    # Exceeded: spent >= $1.00 (user-19 .. user-24 and user-99); alerting: $0.50
    # up to under $1.00 (user-09 .. user-18).
    assert sorted((c.policy_id, c.members, c.exceeded, c.alerting) for c in counts) == sorted(
        [(users.id, 26, 7, 10), (idle.id, 0, 0, 0)]
    )
    # One policy a page: the same entries, in the same order.
    paged, paged_counts, pages = await all_top_pages(cp, 1, 3)
    assert (paged, pages) == (entries, 4)
    assert paged_counts == counts
    one, one_counts, _ = await all_top_pages(cp, 10, 2, policy_id=users.id)
    assert [e.member for e in one] == ["user-24", "user-99"]
    assert [c.members for c in one_counts] == [26]

    clock.advance(timedelta(hours=1))  # a new window: nobody has spent in it yet
    later, later_counts, _ = await all_top_pages(cp, 1000, 3)
    assert sorted(e.policy_id for e in later) == sorted([spent.id, unspent.id])
    assert {(c.policy_id, c.members) for c in later_counts} == {(users.id, 0), (idle.id, 0)}


async def test_a_top_members_page_ends_after_enough_entries(cp: ControlPlane) -> None:
    a = await cp.create_policy(policy("a", scope=pb.SCOPE_USER, target="*"), "x")
    b = await cp.create_policy(policy("b", scope=pb.SCOPE_USER, target="*"), "x")
    await cp.apply_usage(
        batch("b1", *[inc(p.id, 1, member=f"m{i}") for p in (a, b) for i in range(3)])
    )
    first, second = sorted([a.id, b.id])
    page = await cp.run(
        lambda s: spend_list.top_page(
            s, policy_id="", after_id="", policies=10, top=3, now=T0, max_rows=2
        )
    )
    # The first policy whole (3 entries, past max_rows), the second on the next page.
    assert [r.policy_id for r, _ in page.rows] == [first] * 3
    assert [c[0] for c in page.counts] == [first]
    assert page.last_policy_id == first
    rest = await cp.run(
        lambda s: spend_list.top_page(
            s, policy_id="", after_id=first, policies=10, top=3, now=T0, max_rows=2
        )
    )
    assert [r.policy_id for r, _ in rest.rows] == [second] * 3
    assert rest.last_policy_id == ""


async def test_one_policy_pages_on_its_key_range(cp: ControlPlane, engine: Engine) -> None:
    """With policy_id, a page after a key of an earlier policy starts at the
    policy's first member, after a later policy's key it is empty; on SQLite
    the read is a range of the primary key (comparing the whole key made it
    sort every row of the policy for every page, through ix_window_spend_top)."""
    first = await cp.create_policy(policy("first", scope=pb.SCOPE_USER, target="*"), "a")
    second = await cp.create_policy(policy("second", scope=pb.SCOPE_USER, target="*"), "a")
    await cp.apply_usage(
        batch("b1", *[inc(p.id, 1, member=m) for p in (first, second) for m in ("u1", "u2")])
    )
    low, high = sorted([first.id, second.id])
    at = int(T0.timestamp())
    with Session(engine) as s:

        def members(after: tuple[str, str, int]) -> list[str]:
            rows = repo.open_windows_page(s, active_at=at, after=after, limit=10, policy_id=high)
            return [r.member for r in rows]

        assert members((low, "zzz", 2**62)) == ["u1", "u2"]
        assert members((high, "u1", 2**62)) == ["u2"]
        assert members((high + "z", "", 0)) == []
        if engine.dialect.name == "sqlite":
            plans: list[str] = []

            @event.listens_for(engine, "before_cursor_execute")
            def explain(conn: Any, cursor: Any, sql: str, params: Any, *_: Any) -> None:
                if "FROM window_spend" in sql and not sql.startswith("EXPLAIN"):
                    rows = cursor.connection.execute("EXPLAIN QUERY PLAN " + sql, params)
                    plans.append(" ".join(str(r[3]) for r in rows))

            members((high, "u1", 2**62))
            event.remove(engine, "before_cursor_execute", explain)
            assert plans and all("(member,window_start)>" in p for p in plans), plans
