"""WatchState with ``incremental`` over the wire (SQLite and PostgreSQL): a
paged resync, numbered increments cut to size, a resync on the same stream,
and admin lists paged by size as well as count."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from spendgate.v1 import pricing_pb2_grpc
from tests.api.apiserver import (
    ADMIN,
    READ,
    TIMEOUT,
    USD,
    Api,
    Watch,
    create,
    inc,
    report,
    running_api,
)
from tests.store.builders import policy

PAGE = 4096


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[Api]:
    with running_api(db_url) as a:
        # Small pages, so a few dozen items need many of them.
        a.server.cp.hub.page_bytes = PAGE
        yield a


def read_resync(watch: Watch) -> list[dp.StateUpdate]:
    pages: list[dp.StateUpdate] = []
    while True:
        u = watch.next()
        assert u.HasField("resync"), u
        assert u.resync.page == len(pages)
        assert u.ByteSize() <= PAGE
        pages.append(u)
        if u.resync.last:
            return pages


def test_a_paged_resync_then_numbered_increments(api: Api) -> None:
    described = policy("described")
    described.description = "d" * 2000  # stays in the store; data planes do not need it
    policies = [create(api, described)] + [create(api, policy(f"p{i}")) for i in range(40)]
    users = create(api, policy("users", scope=pb.SCOPE_USER, target="*"))
    prices = pricing_pb2_grpc.PricingServiceStub(api.channel)  # type: ignore[no-untyped-call]
    o = prices.SetPriceOverride(
        pp.SetPriceOverrideRequest(
            override=pp.PriceOverride(
                model="gpt-4o", note="n" * 400, price=pp.Price(input="1", output="2")
            )
        ),
        metadata=ADMIN,
        timeout=TIMEOUT,
    )
    members = [f"user-{i:04d}-" + "x" * 60 for i in range(120)]
    report(api, "b1", *[inc(users.id, 10, member=m) for m in members])

    watch = Watch(api, incremental=True)
    try:
        pages = read_resync(watch)
        assert len(pages) > 5
        sent = [u.policy for p in pages for u in p.policy_changes.upserts]
        assert [p.id for p in sent] == sorted(p.id for p in [*policies, users])
        assert all(p.description == "" and p.created_by == "" for p in sent)
        assert {m.member for p in pages for m in p.spend} == set(members)
        [pushed_override] = [x for p in pages for x in p.price_changes.upserts]
        assert pushed_override.id == o.id and pushed_override.note == ""
        seq = pages[-1].seq
        assert seq == api.loop.call(lambda: api.server.cp.hub.seq)

        # Changes: each numbered one more than the one before.
        q = create(api, policy("new", amount="3"))
        u = watch.next()
        assert (u.seq, [(x.policy.id, x.version) for x in u.policy_changes.upserts]) == (
            seq + 1,
            [(q.id, 1)],
        )
        api.budgets.UpdateBudgetPolicy(
            pb.UpdateBudgetPolicyRequest(policy=pb.BudgetPolicy(id=q.id, amount_usd="4"),
                                         update_mask={"paths": ["amount_usd"]}),
            metadata=ADMIN, timeout=TIMEOUT,
        )  # fmt: skip
        u = watch.next()
        assert u.seq == seq + 2 and u.policy_changes.upserts[0].version == 2
        assert u.policy_changes.upserts[0].policy.amount_usd == "4.00"
        api.budgets.DeleteBudgetPolicy(
            pb.DeleteBudgetPolicyRequest(id=q.id), metadata=ADMIN, timeout=TIMEOUT
        )
        u = watch.next()
        assert (u.seq, list(u.policy_changes.deleted_ids)) == (seq + 3, [q.id])
        prices.DeletePriceOverride(
            pp.DeletePriceOverrideRequest(id=o.id), metadata=ADMIN, timeout=TIMEOUT
        )
        u = watch.next()
        assert (u.seq, list(u.price_changes.deleted_ids)) == (seq + 4, [o.id])

        # A usage batch touching many windows arrives in pieces under the limit.
        report(api, "b2", *[inc(users.id, 5 * USD, member=m) for m in members])
        pieces: list[dp.StateUpdate] = []
        while sum(len(p.spend) for p in pieces) < len(members):
            pieces.append(watch.next())
        assert len(pieces) > 1 and all(p.ByteSize() <= PAGE for p in pieces)
        assert [p.seq for p in pieces] == list(range(seq + 5, seq + 5 + len(pieces)))
        last = pieces[-1].seq

        # The control plane may resync a stream at any time (here: as after
        # its replica listener lost its connection); numbering continues.
        api.loop.call(api.server.cp.hub.request_resync)
        again = read_resync(watch)
        assert again[-1].seq == last
        assert api.server.cp.metrics.resyncs == 2  # spendgate_data_plane_resyncs_total
        assert {m.spent_nanos for p in again for m in p.spend} == {10 + 5 * USD}
        create(api, policy("after the resync"))
        assert watch.next().seq == last + 1
        assert watch.updates.empty()
    finally:
        watch.close()


def test_list_policies_pages_by_size_as_well_as_count(api: Api) -> None:
    big = [create(api, policy(f"big-{i}")) for i in range(3)]
    # Descriptions are bounded now (2,000 characters), but rows an earlier
    # release stored may be far larger: a page must still fit.
    with api.server.engine.begin() as conn:
        for i, p in enumerate(big):
            conn.execute(
                text("UPDATE budget_policies SET description = :d WHERE id = :id"),
                {"d": chr(ord("a") + i) * 1_500_000, "id": p.id},
            )
    small = [create(api, policy(f"small-{i}")) for i in range(30)]
    seen: list[str] = []
    token = ""
    sizes = []
    while True:
        resp = api.budgets.ListBudgetPolicies(
            pb.ListBudgetPoliciesRequest(page_size=1000, page_token=token),
            metadata=READ,
            timeout=TIMEOUT,
        )
        sizes.append(resp.ByteSize())
        seen += [p.id for p in resp.policies]
        for p in resp.policies:
            if p.name.startswith("big-"):
                assert len(p.description) == 1_500_000
        token = resp.next_page_token
        if not token:
            break
    assert seen == sorted(p.id for p in [*big, *small])
    assert len(sizes) >= 3
    # One oversized policy alone in its page; otherwise about 1 MiB at most.
    assert all(s < 1_600_000 for s in sizes)
